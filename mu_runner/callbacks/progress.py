"""Progress bars that say which phase runs: "original 2/2", "reference 1/2", "salun 1/3" instead of
Lightning's "Epoch 0/1" for all three trainings of a run."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


def _label(phase: str, trainer) -> str:
    total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
    return f"{phase} {trainer.current_epoch + 1}{total}"


class PhaseRichBar(RichProgressBar):
    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def _get_train_description(self, current_epoch: int) -> str:
        return _label(self.phase, self.trainer)


class PhaseTQDMBar(TQDMProgressBar):
    def __init__(self, phase: str) -> None:
        super().__init__()
        self.phase = phase

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_label(self.phase, trainer))


def phase_bar(phase: str):
    """The progress bar Lightning would pick (rich when installed), labelled with the phase."""
    return PhaseRichBar(phase) if _RICH_AVAILABLE else PhaseTQDMBar(phase)
