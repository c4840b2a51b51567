"""Test-only crash points (tests/test_crash_safety.py): where a kill must leave nothing trusted.

`MU_RUNNER_TEST_PAUSE=<phase>:<marker file>` makes the process write its pid to the marker file and
sleep at that point, so that a test can SIGKILL it exactly there. Phases: a training's phase name
(`original`, `reference`, the method's name for the unlearning stage), paused after its first
optimizer step, and `outputs`, paused after every run-directory file but metrics.json is written.
Unset (always, outside those tests) it does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L

ENV = "MU_RUNNER_TEST_PAUSE"


def requested() -> str | None:
    """The phase a test asked to pause at, if any."""
    spec = os.environ.get(ENV)
    return spec.partition(":")[0] if spec else None


def pause_if(phase: str) -> None:
    spec = os.environ.get(ENV)
    if not spec or spec.partition(":")[0] != phase:
        return
    Path(spec.partition(":")[2]).write_text(f"{os.getpid()}\n")
    while True:  # until the test kills the process
        time.sleep(60)


class PausePoint(L.Callback):
    """Pauses the training of `phase` after its first optimizer step."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pause_if(self.phase)
