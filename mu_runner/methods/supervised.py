"""Supervised training with a recipe: the original model, the retrained reference, `retrain`.

Retraining is exact unlearning: a fresh network from the original's initialisation seed, trained
with the original's recipe unchanged (epochs included) on the retain set only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule


class SupervisedTraining(UnlearningModule):
    """Cross-entropy on the retain split (for the original model: the whole training pool)."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 10, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)

    def data_plan(self) -> DataPlan:
        return DataPlan((SplitSpec("retain", self.batch_size),), anchor="retain")

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        return F.cross_entropy(self.net(x), y)
