"""A run killed (SIGKILL) at any point leaves nothing a later run would trust, and the same command
run again completes.

The kill points are exact: MU_RUNNER_TEST_PAUSE=<phase>:<marker> (mu_runner/utils/crashpoint.py)
makes the run write the marker and sleep there, after the first optimizer step of the original's,
the reference's or the unlearning's training, or with every output file but metrics.json written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_runs import SMALL, command, env, run_cli

from mu_runner.cache import read_entry

pytestmark = pytest.mark.slow  # real runs in subprocesses (about a minute on one free core)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One root (and cache) for the file: later kill points find the earlier trainings cached."""
    return tmp_path_factory.mktemp("crash")


def entries(root: Path) -> dict[str, set[Path]]:
    """The cache's entries by kind; each must be whole (its SHA-256 checks out)."""
    found: dict[str, set[Path]] = {}
    for path in (root / "cache").rglob("*.safetensors"):
        read_entry(path)  # raises if damaged
        found.setdefault(path.parent.name, set()).add(path)
    return found


def kill_at(root: Path, phase: str, run_dir: Path, *overrides: str) -> None:
    """Start the run, wait until it pauses at `phase`, SIGKILL it."""
    marker = root / f"{run_dir.name}.{phase}.paused"
    proc = subprocess.Popen(command(root, *SMALL, *overrides, run_dir=run_dir), cwd=root,
                            env=env(MU_RUNNER_TEST_PAUSE=f"{phase}:{marker}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the run ended before pausing at {phase}: {proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {phase} in 300 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# One command for every step; each step starts it again after the previous step's kill, so every
# restart shows that the same command gets past the point where the previous run was killed.
RUN = ("logger=csv", "save_model=true")


def test_killed_while_training_the_original(root):
    kill_at(root, "original", root / "run", *RUN)
    assert not (root / "run" / "metrics.json").exists()
    assert entries(root).get("original", set()) == set()  # no entry for the half-trained original


def test_killed_while_training_the_reference(root):
    kill_at(root, "reference", root / "run", *RUN)
    assert not (root / "run" / "metrics.json").exists()
    found = entries(root)
    assert len(found["original"]) == 1  # the restart trained the original whole
    assert found.get("retrain", set()) == set()  # and left no entry for the half-trained reference


def test_killed_while_unlearning(root):
    kill_at(root, "finetune", root / "run", *RUN)
    assert not (root / "run" / "metrics.json").exists()
    assert {k: len(v) for k, v in entries(root).items()} == {"original": 1, "retrain": 1}


def test_killed_while_writing_outputs(root):
    run_dir = root / "run"
    kill_at(root, "outputs", run_dir, *RUN)
    assert not (run_dir / "metrics.json").exists()  # every other file is there: the run is not done
    assert (run_dir / "config.yaml").exists() and (run_dir / "model.safetensors").exists()
    assert not list(run_dir.glob("*.tmp"))


def test_the_same_command_then_completes(root):
    run_dir = root / "run"
    cached = {k: len(v) for k, v in entries(root).items()} == {"original": 1, "retrain": 1}
    res = run_cli(root, *SMALL, *RUN, f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run"] >= 1 and (run_dir / "logs" / "metrics.csv").exists()
    if cached:  # after the kills above: what they trained in full is trusted and reused
        assert metrics["cache_hits"] == {"original": True, "retrain": True}
    read_entry(run_dir / "model.safetensors")  # whole, its SHA-256 checks out
