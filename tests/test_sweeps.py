"""A sweep does not hide its failures: a summary of the failed jobs and a non-zero exit code, while the
finished jobs' results stand (mu_runner/sweeps.py, a Hydra callback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import SMALL
from conftest import TINY
from omegaconf import OmegaConf

from mu_runner.sweeps import FailedJobs, failed_jobs

K99 = "ConfigError: forget.k=99: must be an integer in 1..9 (the data has 10 classes and one must remain)"


def test_a_multirun_with_a_failed_job_ends_with_its_summary_and_exit_code_1(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "mu_runner", "-m", *TINY, *SMALL, "method=original",
                          "reference=none", "forget.k=1,99", f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    tail = res.stderr.rstrip().splitlines()[-2:]
    assert tail == ["mu_runner: 1 of 2 jobs failed:", f"  forget.k=99: {K99}"]
    assert "Traceback" not in res.stderr
    assert (sweep / "failed_jobs.txt").read_text() == f"1 of 2 jobs failed:\n  forget.k=99: {K99}\n"
    finished = list(sweep.rglob("metrics.json"))
    assert len(finished) == 1 and len(json.loads(finished[0].read_text())["forget_classes"]) == 1  # k=1 stands
    assert not list(finished[0].parent.glob("error.txt"))


def _job(sweep: Path, name: str, overrides: list[str], error: str | None = None) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if error is not None:
        (job / "error.txt").write_text(error + "\n")
    return job


def test_jobs_are_named_by_what_they_sweep_and_only_this_multiruns_errors_count(tmp_path):
    old = _job(tmp_path, "a", ["data=digits", "seed=0"], "ConfigError: an old failure")
    os.utime(old / "error.txt", (time.time() - 3600,) * 2)  # a restarted sweep: fixed since
    _job(tmp_path, "b", ["data=digits", "seed=1"], "DivergedError: method grad_ascent diverged at step 2: loss = nan\n")
    _job(tmp_path, "c", ["data=digits", "seed=2"])
    failed, total = failed_jobs(tmp_path, since=time.time() - 60)
    assert total == 3 and failed == [("seed=1", "DivergedError: method grad_ascent diverged at step 2: loss = nan")]


def test_the_callback_exits_1_only_when_a_job_failed(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = FailedJobs()
    callback.on_multirun_start(config)
    _job(tmp_path, "ok", ["seed=0"])
    callback.on_multirun_end(config)  # nothing failed: returns
    _job(tmp_path, "bad", ["seed=1"], "ConfigError: seed=1.5: allowed an integer in 0..4294967295")
    with pytest.raises(SystemExit) as stop:
        callback.on_multirun_end(config)
    assert stop.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "mu_runner: 1 of 2 jobs failed:", "  seed=1: ConfigError: seed=1.5: allowed an integer in 0..4294967295"]
