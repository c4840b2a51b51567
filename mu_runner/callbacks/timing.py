"""Wall time of the unlearning step alone (`unlearn_seconds`)."""

from __future__ import annotations

import time

import lightning as L
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UnlearnTimer(L.Callback):
    """Brackets on_train_start ... on_train_end; listed first, so it opens before the module's
    set-up work (masks, relabelling, one-shot edits) and closes before any evaluation."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start
