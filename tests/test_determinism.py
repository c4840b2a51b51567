"""Fixed seed, trainer.deterministic=true (trainer=tiny, like trainer=cpu): metrics.json is identical
from run to run except for what records time and provenance, whether the original and reference are
trained in the run or read back from the cache, and whether the run is alone or a job of a multirun
(the second job, after another one in the same process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runs import SMALL, run_cli

pytestmark = pytest.mark.slow  # real runs in subprocesses (about a minute on one free core)

# augmentation on, so that its random draws are part of what must repeat
SETTINGS = (*SMALL, "data.augment.pad=1", "data.augment.flip=true", "forget.k=1")

# Not results: wall-clock times, whether an entry came from the cache (and whether a method's one-off
# preparation was timed now or when its entry was made), and the code's version and git commit.
NOT_RESULTS = {"cache_hits", "prep_cached", "git_commit", "mu_runner_version"}


def not_a_result(key: str) -> bool:
    return key in NOT_RESULTS or "_seconds" in key  # unlearn_seconds, eval_seconds_during_unlearning, ...


def differences(a, b, path: str = "") -> list[str]:
    """Paths where two metrics.json differ, keys that are not results left out (at any depth)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) if not not_a_result(k)
                for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_trainer_tiny_and_cpu_are_deterministic():
    conf = Path(__file__).resolve().parents[1] / "conf" / "trainer"
    for name in ("tiny", "cpu"):
        assert "deterministic: true" in (conf / f"{name}.yaml").read_text()


def test_reruns_cache_hits_and_multirun_jobs_give_identical_metrics(tmp_path):
    a = run_cli(tmp_path, *SETTINGS, f"hydra.run.dir={tmp_path}/alone")
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(tmp_path, *SETTINGS, f"hydra.run.dir={tmp_path}/again")
    assert b.returncode == 0, b.stderr[-3000:]
    alone, again = metrics(tmp_path / "alone" / "metrics.json"), metrics(tmp_path / "again" / "metrics.json")
    assert alone["cache_hits"] == {"original": False, "retrain": False}
    assert again["cache_hits"] == {"original": True, "retrain": True}  # read back from the cache
    assert differences(alone, again) == []

    # a multirun with its own cache: the k=1 job runs second, after the k=2 job in the same process;
    # it reads the original that job trained and trains its own reference
    sweep = tmp_path / "sweep"
    m = run_cli(tmp_path, "-m", *SETTINGS[:-1], "forget.k=2,1", f"paths.cache_dir={tmp_path}/cache_m",
                f"hydra.sweep.dir={sweep}")
    assert m.returncode == 0, m.stderr[-3000:]
    jobs = [metrics(p) for p in sweep.rglob("metrics.json")]
    job = next(j for j in jobs if len(j["forget_classes"]) == 1)
    assert len(jobs) == 2 and job["cache_hits"] == {"original": True, "retrain": False}
    assert differences(alone, job) == []
    # what was left out really is time and provenance only
    assert {k for k in alone if not_a_result(k)} == {
        "unlearn_seconds", "prep_seconds", "eval_seconds_during_unlearning", "eval_seconds", "cache_hits",
        "prep_cached", "git_commit", "mu_runner_version"}
