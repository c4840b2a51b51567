"""Resumable trainings of the original and the reference (docs/design.md, Cache).

A long training (a 50-epoch CIFAR-100 original) checkpoints its whole state — weights, optimizer,
scheduler, loop counters — every `checkpoint.every_n_epochs` epochs into `<cache entry>.partial.ckpt`,
next to the cache entry it will become, by a temporary file and a rename (a kill never leaves a
half-written checkpoint). Running the same command again resumes from it; once the finished entry
is in the cache the checkpoint is deleted. The path carries the entry's content key, so a
checkpoint can only be resumed by the configuration that wrote it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("mu_runner")


def partial_path(entry: Path) -> Path:
    """Where the training of cache entry `entry` keeps its checkpoint."""
    return entry.with_name(entry.name.removesuffix(".safetensors") + ".partial.ckpt")


class EpochCheckpoint(L.Callback):
    """Writes the trainer's full checkpoint to `path` every `every_n_epochs` epochs, atomically."""

    def __init__(self, path: Path, every_n_epochs: int = 1) -> None:
        self.path, self.every = Path(path), int(every_n_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every <= 0 or (trainer.current_epoch + 1) % self.every:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the whole state: optimizer, loops (resumable)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def resumable(path: Path | None, phase: str) -> Path | None:
    """The checkpoint to resume from, if one is there and readable (weights-only load); a damaged
    one is reported and removed, and the training starts from the beginning."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        epoch = int(state["epoch"])
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means: start over
        log.warning("%s: checkpoint %s is unreadable (%s): training from the beginning", phase, path,
                    str(err).splitlines()[0][:120])
        path.unlink(missing_ok=True)
        return None
    log.info("%s: resuming from %s (%d epochs done)", phase, path, epoch + 1)
    return path
