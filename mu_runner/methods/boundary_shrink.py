"""Boundary Shrink: relabel each forget sample to the class its FGSM neighbour falls into.

Chen, Gao, Liu, Peng, Wang, "Boundary Unlearning: Rapid Forgetting of Deep Networks via Shifting
the Decision Space", CVPR 2023, arXiv:2303.11570 (shrink variant).

Only D_f is read (data plan: forget, paired with nothing). A frozen eval-mode copy of the original (the probe) finds, per forget batch,
x' = clip_[0,1](x + ε·sign ∇_x CE(probe(x), y)) quantised to 1/255, and its nearest-but-incorrect
label y_nbi = argmax probe(x'); the network then takes a step on CE(net(x), y_nbi) with the clean x.
Deviation [design fix, docs/methods.md]: `mask_forget_classes: true` masks y and all forget classes out
of the argmax (a failed attack would otherwise return y and teach the model to keep the class, and
a target inside C_F is no forgetting); `false` is the code-faithful plain argmax.
Deviation [design, as grad_ascent's card]: `bn_mode: eval` keeps BatchNorm running statistics frozen,
since forget-only batches in train mode would overwrite them with the forget classes' statistics;
`train` is code-faithful. The class defaults are the card's (ε 0.1); the yaml's digits defaults
(ε 0.05, SGD lr 3e-4, batch 16, 1 epoch) were chosen on the validation split (see the yaml).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import batchnorm_eval, frozen_copy, nearest_wrong_labels
from mu_runner.methods.grad_ascent import check_bn_mode


def fgsm(probe: nn.Module, x: Tensor, y: Tensor, epsilon: float) -> Tensor:
    """One signed-gradient step in pixel space, clipped to [0, 1] and quantised to 1/255 (G4)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.cross_entropy(probe(x.float()), y)
        (grad,) = torch.autograd.grad(loss, x)
    adv = (x.detach() + epsilon * grad.sign()).clamp(0, 1)
    return adv.mul(255).round().div(255)  # an image again: |x' - x| <= ε + 1/255


class BoundaryShrink(UnlearningModule):
    """CE towards the probe's nearest wrong class of an FGSM neighbour, on D_f only."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 1, batch_size: int = 128, seed: int = 0, epsilon: float = 0.1,
                 mask_forget_classes: bool = True, bn_mode: str = "eval") -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if not 0 < float(epsilon) <= 1:
            raise ConfigError(f"method.epsilon={epsilon}: the FGSM step in pixel space needs 0 < epsilon <= 1")
        self.epsilon, self.mask_forget_classes = float(epsilon), bool(mask_forget_classes)
        self.bn_mode = check_bn_mode(bn_mode)

    def data_plan(self) -> DataPlan:
        return DataPlan((SplitSpec("forget", self.batch_size),), anchor="forget")

    @property
    def probe(self) -> nn.Module:
        return self._probe[0]

    def on_train_start(self) -> None:
        self._probe = [frozen_copy(self.net)]

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self.bn_mode == "eval":  # re-applied each batch: evaluation callbacks toggle modes
            batchnorm_eval(self.net)

    def boundary_targets(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x', y_nbi): the FGSM neighbour and the probe's class for it (masked per the option)."""
        adv = fgsm(self.probe, x, y, self.epsilon)
        with torch.no_grad():
            logits = self.probe(adv).float()
        if not self.mask_forget_classes:
            return adv, logits.argmax(1)
        return adv, nearest_wrong_labels(logits, y, self.data.forget_classes)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["forget"]
        _, y_nbi = self.boundary_targets(x, y)
        return F.cross_entropy(self.net(x), y_nbi)
