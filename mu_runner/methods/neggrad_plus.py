"""NegGrad+: descend on the retained data while ascending on the forget data, in one loss.

Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning",
NeurIPS 2023, arXiv:2302.09880 (introduces NegGrad+).

Per step, a retain batch (the anchor: one pass over D_r per epoch) is paired with a cycled forget
batch and L = β·CE(x_r, y_r) − (1−β)·CE(x_f, y_f). Design choices: a term whose weight is 0 is not
computed at all (no forward, so no BatchNorm statistics move for it): β = 1 is then exactly
`finetune` and β = 0 exactly `grad_ascent`. "retain" comes first in the data plan (paired batches,
retain the anchor), so its loader has the same seed, hence the same order, as finetune's. `bn_mode` is explicit (default `train`;
the DeepUnlearn port trains in eval mode, which is `bn_mode: eval` here).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import batchnorm_eval, negative_cross_entropy
from mu_runner.methods.grad_ascent import check_bn_mode


class NegGradPlus(UnlearningModule):
    """β·CE on D_r − (1−β)·CE on D_f, one pass over D_r per epoch with D_f cycled."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 10, batch_size: int = 256,
                 seed: int = 0, beta: float = 0.95, forget_batch_size: int | None = None,
                 bn_mode: str = "train") -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if not 0.0 <= float(beta) <= 1.0:
            raise ConfigError(f"method.beta={beta}: allowed 0 <= beta <= 1")
        if forget_batch_size is not None and int(forget_batch_size) <= 0:
            raise ConfigError(f"method.forget_batch_size={forget_batch_size}: "
                              "need > 0 (or null: batch_size)")
        self.beta, self.bn_mode = float(beta), check_bn_mode(bn_mode)
        self.forget_batch_size = int(forget_batch_size or batch_size)

    def data_plan(self) -> DataPlan:
        # retain first: its loader seed (seed + position) and so its order equal finetune's
        return DataPlan((SplitSpec("retain", self.batch_size), SplitSpec("forget", self.forget_batch_size)),
                        anchor="retain")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.bn_mode == "eval":
            batchnorm_eval(self.net)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        terms = []
        if self.beta > 0:
            x, y = batch["retain"]
            terms.append(self.beta * F.cross_entropy(self.net(x), y))
        if self.beta < 1:
            x, y = batch["forget"]
            terms.append((1.0 - self.beta) * negative_cross_entropy(self.net(x), y))
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
