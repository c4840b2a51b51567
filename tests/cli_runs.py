"""`python -m mu_runner` in a subprocess with the tiny settings, as a user starts it (helpers, not tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def main_in_process(*args: str, cwd: Path, **extra_env: str) -> Ran:
    """`python -m mu_runner ARGS` run by `main()` in this process, its output captured: for command lines
    that are refused before any work, where a new interpreter would only add its 10 s of imports (the
    process boundary itself is tested by test_cli's subprocess runs). Everything it changes for the
    process (working directory, environment, argv, logging handlers, Hydra's global state) is put back."""
    import contextlib
    import io
    import logging
    import traceback

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from mu_runner.__main__ import main
    from mu_runner.utils.fastexit import exit_code

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    try:
        os.chdir(cwd)
        os.environ.update({"HYDRA_FULL_ERROR": "0", **extra_env})
        sys.argv = ["mu_runner", *args]
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as done:
                code = exit_code(done.code)
            except Exception:  # noqa: BLE001 - as the interpreter reports an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[2])
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return Ran(code, out.getvalue(), err.getvalue())
