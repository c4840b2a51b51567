"""`python -m mu_runner` in a subprocess with the tiny settings, as a user starts it (helpers, not tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

# A small generated data set for runs whose numbers do not matter (files, credentials).
SMALL = ("data=synthetic", "data.source.n_train=200", "data.source.n_test=100", "train.epochs=1")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
            "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "PYTHONPATH": str(ROOT), **extra}


def command(tmp: Path, *overrides: str, run_dir: Path | None = None) -> list[str]:
    """TINY + overrides, everything under `tmp` (run directory `tmp/run` unless given); flags (-m) first."""
    flags = [o for o in overrides if o.startswith("-")]
    return [sys.executable, "-m", "mu_runner", *flags, *TINY, f"paths.root_dir={tmp}", f"paths.cache_dir={tmp}/cache",
            f"hydra.run.dir={run_dir or tmp / 'run'}", *(o for o in overrides if not o.startswith("-"))]


def run_cli(tmp: Path, *overrides: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp, *overrides), cwd=tmp, env=env(**extra_env), capture_output=True, text=True,
                          timeout=timeout, check=False)
