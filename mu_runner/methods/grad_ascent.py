"""GA / NegGrad: gradient ascent on the forget data, i.e. minimise −CE(f_θ(x_f), y_f).

Thudi, Deza, Chandrasekaran, Papernot, "Unrolling SGD: Understanding Factors Influencing Machine
Unlearning", IEEE EuroS&P 2022, arXiv:2109.13398 (the GA baseline of SalUn, arXiv:2310.12508).

Only D_f is read. The objective is unbounded: keep the learning rate small, or stop early with the
runner's `callbacks.forget_target`. With `bn_mode: eval` (default, our design) BatchNorm layers
stay in eval mode during the forget passes, so forget-only batches cannot overwrite the running
statistics that the retained classes rely on.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import batchnorm_eval, negative_cross_entropy

BN_MODES = ("eval", "train")


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise ConfigError(f"method.bn_mode={bn_mode!r}: allowed {', '.join(BN_MODES)}")
    return bn_mode


class GradAscent(UnlearningModule):
    """E epochs of −CE over D_f from the original weights; D_r is never read."""

    anchor = "forget"

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 5, batch_size: int = 128,
                 seed: int = 0, bn_mode: str = "eval") -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        self.bn_mode = check_bn_mode(bn_mode)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole model in train mode at every epoch start: undo it for BN here.
        if self.bn_mode == "eval":
            batchnorm_eval(self.net)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["forget"]
        return negative_cross_entropy(self.net(x), y)
