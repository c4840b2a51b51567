"""GA / NegGrad: gradient ascent on the forget data, i.e. minimise −CE(f_θ(x_f), y_f).

Thudi, Deza, Chandrasekaran, Papernot, "Unrolling SGD: Understanding Factors Influencing Machine
Unlearning", IEEE EuroS&P 2022, arXiv:2109.13398 (the GA baseline of SalUn, arXiv:2310.12508).

Only D_f is trained on (data plan: forget; plus the validation images, read only for the sample
forgetting target below, when `stop_forget_acc` is set). The objective is unbounded and on digits no fixed (lr, epochs) forgets every class
without wrecking others (validation, classes 4/5/8: lr 4e-4 × 2 epochs left class 5 at 0.54 on D_f
while costing class 4's run 22 points; lr 3e-4 × 3 epochs forgot all three at 10-63 points), so
`stop_forget_acc` [design] ends the run at the first step where the forget accuracy — scored on the
logits the steps compute anyway, before their updates, over at least `batch_size` samples (a 3-sample
remainder batch is pooled with the next one) — is at most this (that step is not taken);
null runs every epoch. Sample forgetting stops instead at the original's validation accuracy (the
forget set should look like unseen data, which is where the retrained model puts it; a fixed 0.1
let GA run 5 epochs on random 10 % and cost 36 retain points). The runner's
`callbacks.forget_target` is the epoch-level version.

With `bn_mode: eval` (default, our design) BatchNorm layers stay in eval mode during the forget
passes, so forget-only batches cannot overwrite the running statistics that the retained classes
rely on. With `bn_mode: train` the logits use one-class batch statistics, so the stopping rule may
fire at once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
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

    @classmethod
    def validation_use(cls, method_cfg, forget_kind: str) -> str | None:
        if method_cfg.get("stop_forget_acc") is not None and forget_kind != "classes":
            return ("stops sample forgetting at the original's validation accuracy "
                    "(or set method.stop_forget_acc=null)")
        return None

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 5, batch_size: int = 128,
                 seed: int = 0, bn_mode: str = "eval", stop_forget_acc: float | None = None) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        self.bn_mode = check_bn_mode(bn_mode)
        if stop_forget_acc is not None and not 0 <= float(stop_forget_acc) < 1:
            raise ConfigError(f"method.stop_forget_acc={stop_forget_acc}: need 0 <= value < 1, or null")
        self.stop_forget_acc = None if stop_forget_acc is None else float(stop_forget_acc)
        self.stopped_at_step: int | None = None  # the step the rule ended the run at
        self._window = [0, 0]  # correct, seen: forget predictions since the last decision
        self.target: float | None = self.stop_forget_acc  # samples: the original's validation accuracy

    def data_plan(self) -> DataPlan:
        """D_f in batches; with the stopping rule also D_val (read for sample forgetting only)."""
        val = (SplitSpec("val"),) if self.stop_forget_acc is not None else ()
        return DataPlan((SplitSpec("forget", self.batch_size), *val), anchor="forget")

    def on_train_start(self) -> None:
        if self.stop_forget_acc is not None and self.data.forget_classes is None:
            self.target = self.data.accuracy(self.net, self.data.indices("val"))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the whole model in train mode at every epoch start: undo it for BN here.
        if self.bn_mode == "eval":
            batchnorm_eval(self.net)

    def unlearning_loss(self, batch: Batch) -> Tensor | None:
        x, y = batch["forget"]
        logits = self.net(x)
        if self.stop_forget_acc is not None and self.forgotten(int((logits.argmax(1) == y).sum()), len(y)):
            self.stopped_at_step = self.global_step
            self.trainer.should_stop = True
            return None  # this step is not taken
        return negative_cross_entropy(logits, y)

    def forgotten(self, correct: int, seen: int) -> bool:
        """The stopping rule, decided once at least `batch_size` forget predictions are pooled.

        Under DDP the counts are summed over the ranks first (`batch_size` is the global batch): every
        rank decides the same, at the step a single process would.
        """
        if self._trainer is not None and self.trainer.world_size > 1:
            both = self.trainer.strategy.reduce(torch.tensor([correct, seen], device=self.device), reduce_op="sum")
            correct, seen = (int(v) for v in both.tolist())
        self._window = [self._window[0] + correct, self._window[1] + seen]
        if self._window[1] < self.batch_size:
            return False
        (correct, seen), self._window = self._window, [0, 0]
        return correct / seen <= self.target

    def choices(self) -> dict:
        return {"stopped_at_step": self.stopped_at_step, "stop_forget_acc": self.target}
