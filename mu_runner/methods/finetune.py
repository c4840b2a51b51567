"""FT: fine-tune on the retained data only, so that the forgotten data fades.

Warnecke, Pirch, Wressnegger, Rieck, "Machine Unlearning of Features and Labels", NDSS 2023,
arXiv:2108.11577 (the FT baseline of SalUn, arXiv:2310.12508).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.methods.base import Batch, UnlearningModule


class Finetune(UnlearningModule):
    """E epochs of cross-entropy on D_r from the original weights; D_f is never read."""

    def data_plan(self) -> DataPlan:
        return DataPlan((SplitSpec("retain", self.batch_size),), anchor="retain")

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        return F.cross_entropy(self.net(x), y)
