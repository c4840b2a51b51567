"""What a run prints to the terminal: each phase announces itself (and whether it was a cache hit),
each line once, no library tips or deprecation warnings; the results table is in the log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cli_runs import SMALL
from conftest import TINY

STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]")  # Hydra's log-line prefix


def _run(tmp_path: Path, out: str) -> tuple[list[str], Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "mu_runner", *TINY, *SMALL, f"paths.root_dir={tmp_path}",
                          f"hydra.run.dir={tmp_path / out}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return (res.stdout + res.stderr).splitlines(), tmp_path / out


def test_a_run_announces_each_phase_once_without_library_noise(tmp_path):
    lines, out = _run(tmp_path, "cold")
    text = "\n".join(lines)
    for phase in ("original: training 1 epochs", "original: trained in", "reference: training 1 epochs",
                  "reference: trained in", "finetune: unlearning", "finetune: done in", "evaluation: done in"):
        assert sum(phase in ln for ln in lines) == 1, f"{phase!r} not announced exactly once:\n{text}"
    assert text.count("cache miss: building") == 2  # original and reference were trained here
    logged = [STAMP.sub("", ln) for ln in lines if STAMP.match(ln)]
    assert len(logged) == len(set(logged)), f"a line printed twice:\n{text}"
    for noise in ("Tip:", "litlogger", "Deprecat", "UserWarning", "GPU available", "weights_only", "Epoch 0"):
        assert noise not in text, f"{noise!r} in the terminal output:\n{text}"
    assert len(lines) <= 22, f"{len(lines)} lines:\n{text}"
    log = (out / "mu_runner.log").read_text()
    assert "unlearned" in log and "retrained" in log and "original" in log  # the results table

    lines, _ = _run(tmp_path, "warm")  # same config again: both models come from the cache
    text = "\n".join(lines)
    assert "original: from the cache" in text and "reference: from the cache" in text
    assert "training" not in text and "cache miss" not in text


def test_a_one_shot_method_prints_no_lightning_notice_about_its_missing_optimizer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "HYDRA_FULL_ERROR")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "mu_runner", *TINY, *SMALL, "method=ssd", "reference=none",
                          f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'ssd'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout + res.stderr
    assert "ssd: unlearning (one-shot)" in text
    for noise in ("configure_optimizers", "eval mode", "Warning"):
        assert noise not in text, f"{noise!r} in the terminal output:\n{text}"
