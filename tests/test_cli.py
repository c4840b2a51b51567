"""The command line as a user types it: errors, one-line messages, a Hydra multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli_runs import SMALL
from conftest import TINY


def mu_runner(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mu_runner", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_unknown_option_lists_the_allowed_ones(tmp_path):
    res = mu_runner("method=nope", cwd=tmp_path)
    assert res.returncode != 0
    assert "Could not find 'method/nope'" in res.stderr
    assert "finetune" in res.stderr and "retrain" in res.stderr  # the options
    assert not (tmp_path / "outputs" / "cache").exists()


def test_bad_value_is_one_line_and_exit_code_2(tmp_path):
    res = mu_runner(*TINY, "forget.k=10", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mu_runner: error:")]
    assert len(lines) == 1 and "forget.k=10" in lines[0] and "10 classes" in lines[0]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("*.safetensors"))


def test_multirun_gives_each_job_its_own_metrics_and_restarts_skip_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, *SMALL, "method=finetune,original", "forget.k=1,2",  # after TINY's method; small data
            f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"]
    res = mu_runner(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = {}
    for path in sweep.rglob("metrics.json"):
        m = json.loads(path.read_text())
        jobs[(m["method"], len(m["forget_classes"]))] = m
    assert set(jobs) == {("finetune", 1), ("finetune", 2), ("original", 1), ("original", 2)}
    assert set(jobs["finetune", 1]["forget_classes"]) < set(jobs["finetune", 2]["forget_classes"])  # nested
    assert jobs["original", 1]["original"] == jobs["finetune", 1]["original"]  # one cached original
    cache = tmp_path / "outputs" / "cache"
    assert len(list(cache.glob("original/*.safetensors"))) == 1
    assert len(list(cache.glob("retrain/*.safetensors"))) == 2
    stamps = {p: p.stat().st_mtime_ns for p in sweep.rglob("metrics.json")}
    again = mu_runner(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("metrics.json")} == stamps
