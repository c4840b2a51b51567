"""Stopping at equal forgetting: `callbacks.forget_target=retrain` (or a number).

At each check (every `every_n_steps` optimizer steps, and at every epoch end) the unlearning model
scores the *check images*: for class forgetting the validation images of the forgotten classes
(never trained on by anyone, so the rule is not fitted to D_f), for sample forgetting a seeded
stratified half of D_f (`check_indices`). The run stops at the first check where that accuracy is
at or below the target: the retrained model's accuracy on the same images (`retrain`), or a fixed
number. The trainer's `max_epochs` is the budget cap (`callbacks.max_epochs`, else the method's
epochs); a run that reaches the cap without the target says so (`reached_target: false`). A method
whose forgetting is a one-off edit followed by repair (weight_reset) is judged only after its own
repair epochs (`UnlearningModule.target_min_epochs`).
See docs/design.md#stopping-at-equal-forgetting.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.errors import ConfigError
from mu_runner.metrics.scoring import accuracy_on, half_split


def check_indices(data: InMemoryData, split: ForgetSplit, seed: int = 0) -> Tensor:
    """Training-set indices the rule scores: validation images of the forget classes, or half of D_f."""
    labels = data.labels.cpu()
    if split.classes:
        val = data.val.cpu()
        held_out = val[torch.isin(labels[val], torch.tensor(split.classes))]
        if len(held_out) == 0:
            raise ConfigError(f"callbacks.forget_target needs validation images of the forget classes "
                              f"{split.classes}: data.val_fraction={len(val) / max(1, len(labels)):.3g} leaves none")
        return held_out
    forget = split.forget.cpu()
    if len(forget) < 2:
        raise ConfigError(f"callbacks.forget_target needs at least 2 forget samples (have {len(forget)})")
    _, score = half_split(torch.zeros(len(forget), dtype=torch.long), seed)
    return forget[score]


class ForgetTarget(L.Callback):
    """Stops the unlearning stage at the first check with forget accuracy <= target."""

    def __init__(self, data: InMemoryData, split: ForgetSplit, target: float | str,
                 reference: nn.Module | None = None, every_n_steps: int = 0, seed: int = 0,
                 min_epochs: int = 0) -> None:
        self.data, self.every, self.min_epochs = data, int(every_n_steps), int(min_epochs)
        self.indices = check_indices(data, split, seed)
        if target == "retrain":
            if reference is None:
                raise ConfigError("callbacks.forget_target=retrain needs the retrained model: set reference=retrain")
            self.target = accuracy_on(reference, data, self.indices)
        else:
            self.target = float(target)
        self.reached = False
        self.stopped_at: int | None = None  # optimizer steps taken when the target was reached
        self.stopped_epoch: float | None = None  # the same in epochs (fractional for step checks)
        self.last_acc: float | None = None
        self.checks: list[tuple[int, float]] = []  # (step, forget accuracy on the check images)
        self.seconds = 0.0  # spent checking; reported apart from unlearn_seconds

    def _check(self, trainer: L.Trainer, module: L.LightningModule, log: bool = True) -> None:
        step = int(trainer.global_step)
        if self.reached or (self.checks and self.checks[-1][0] == step):
            return
        start = time.perf_counter()
        acc = accuracy_on(module.net, self.data, self.indices)
        self.seconds += time.perf_counter() - start
        self.checks.append((step, acc))
        self.last_acc = acc
        if log:
            module.log("val/check_forget_acc", acc, sync_dist=True)  # DDP: every rank scores the same images
        if acc <= self.target + 1e-9:
            batches = trainer.num_training_batches
            per_epoch = batches if isinstance(batches, int) and batches > 0 else None
            self.reached, self.stopped_at = True, step
            self.stopped_epoch = step / per_epoch if per_epoch else float(trainer.current_epoch)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (self.every > 0 and trainer.global_step > 0 and trainer.global_step % self.every == 0
                and trainer.current_epoch >= self.min_epochs):
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.min_epochs:
            self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        """One-shot methods (and a cap reached between checks) are scored once at the end."""
        self._check(trainer, pl_module, log=False)

    def summary(self) -> dict:
        return {"forget_target": self.target, "reached_target": self.reached, "stopped_at": self.stopped_at,
                "stopped_epoch": self.stopped_epoch, "check_forget_acc": self.last_acc,
                "n_check": len(self.indices)}


def stop_at_target(target: float | str | None, every_n_steps: int = 0, *, data: InMemoryData, split: ForgetSplit,
                   reference: nn.Module | None = None, seed: int = 0, min_epochs: int = 0) -> ForgetTarget | None:
    """conf/callbacks/forget_target.yaml: the stopping rule, or None when `callbacks.forget_target` is null."""
    if target is None:
        return None
    return ForgetTarget(data, split, target, reference, int(every_n_steps), int(seed), int(min_epochs))
