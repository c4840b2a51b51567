"""Scores the stage from outside: the model before, after each epoch, and after unlearning."""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.metrics import functional as MF
from mu_runner.metrics.suite import evaluate, predict


class UnlearningEvaluation(L.Callback):
    """`before` / `after` hold the metric suite of the original and the unlearned model;
    `val/forget_acc` and `val/acc` are logged every `every_n_epochs` (for early stopping)."""

    def __init__(self, data: InMemoryData, split: ForgetSplit, seed: int = 0, mia: str = "confidence",
                 every_n_epochs: int = 1, max_forget: int = 1000, original: nn.Module | None = None) -> None:
        self.data, self.split, self.seed, self.mia = data, split, seed, mia
        self.original = original  # scored as "before" (a from-scratch method starts elsewhere)
        self.every, self.max_forget = int(every_n_epochs), int(max_forget)
        self.before: dict | None = None
        self.after: dict | None = None
        self.epoch_seconds = 0.0  # spent scoring during training; not part of unlearn_seconds

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = evaluate(self.original or pl_module.net, self.data, self.split, self.seed, self.mia)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every <= 0 or (trainer.current_epoch + 1) % self.every:
            return
        start = time.perf_counter()
        self._log_val(pl_module)
        self.epoch_seconds += time.perf_counter() - start

    def _log_val(self, pl_module: L.LightningModule) -> None:
        forget = self.split.forget[: self.max_forget]
        labels = self.data.labels.cpu()
        acc_f = MF.accuracy(predict(pl_module.net, self.data.images, forget).argmax(1), labels[forget])
        val = self.data.val
        if self.split.classes is not None:  # validation accuracy on the retained classes
            val = val[~torch.isin(labels[val], torch.tensor(self.split.classes))]
        acc_v = MF.accuracy(predict(pl_module.net, self.data.images, val).argmax(1), labels[val])
        metrics = {k: v for k, v in {"val/forget_acc": acc_f, "val/acc": acc_v}.items() if v is not None}
        pl_module.log_dict(metrics, prog_bar=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after = evaluate(pl_module.net, self.data, self.split, self.seed, self.mia)
        if trainer.logger is not None:  # self.log is refused in on_train_end
            scores = {f"{scope}/{k}": v for scope, d in (("original", self.before), ("unlearned", self.after))
                      for k, v in d.items() if v is not None}
            trainer.logger.log_metrics(scores, step=trainer.global_step)
