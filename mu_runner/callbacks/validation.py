"""Watches the unlearning stage from outside: `val/forget_acc` and `val/acc` after every
`every_n_epochs` epochs (for early stopping and the curves). The final scores of every model come
from `mu_runner.evaluation.Evaluator` after the stage, not from here."""

from __future__ import annotations

import time

import lightning as L
import torch

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import predict


class EpochValidation(L.Callback):
    def __init__(self, data: InMemoryData, split: ForgetSplit, every_n_epochs: int = 1,
                 max_forget: int = 1000) -> None:
        self.data, self.split = data, split
        self.every, self.max_forget = int(every_n_epochs), int(max_forget)
        self.epoch_seconds = 0.0  # spent scoring during training; not part of unlearn_seconds

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
        pl_module.log_dict(metrics, prog_bar=True, sync_dist=True)  # DDP: every rank scores the same images
