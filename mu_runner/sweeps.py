"""A sweep does not hide its failures: registered as a Hydra callback (conf/hydra/default.yaml).

A multirun job that ends with a user error writes `error.txt` and no metrics.json (__main__.py), and
the sweep goes on, so the finished jobs' results stand. At the end of the multirun, `FailedJobs`
lists every job of this multirun that wrote an `error.txt`, with its overrides and its error line,
on stderr and in `<sweep dir>/failed_jobs.txt`, and ends the process with exit code 1:

    mu_runner: 1 of 2 jobs failed:
      forget.k=99: ConfigError: forget.k=99: must be an integer in 1..9 (...)

Jobs are found on disk (`<job dir>/.hydra/overrides.yaml`, written when a job starts), not through
in-process hooks, so it also holds for launchers that run the jobs in other processes. Only files
written since the multirun started count: a restarted sweep is not failed by an old job's error.
Kept free of heavy imports: Hydra loads it before every run.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> tuple[list[tuple[str, str]], int]:
    """([(overrides, error line), ...], jobs run) for the jobs under `sweep_dir` started at or after
    `since`; a job is named by its overrides that not every job shares (the swept ones)."""
    jobs = []
    for overrides in sorted(Path(sweep_dir).glob("**/.hydra/overrides.yaml")):
        if overrides.stat().st_mtime >= since:
            jobs.append((overrides.parent.parent, [str(o) for o in OmegaConf.load(overrides)]))
    shared = set.intersection(*(set(o) for _, o in jobs)) if len(jobs) > 1 else set()
    failed = []
    for job, items in jobs:
        error = job / "error.txt"
        if error.is_file() and error.stat().st_mtime >= since:
            name = " ".join(o for o in items if o not in shared) or job.name
            failed.append((name, "; ".join(ln for ln in error.read_text().splitlines() if ln.strip())))
    return failed, len(jobs)


class FailedJobs(Callback):
    """`on_multirun_end`: the failed jobs' summary and exit code 1 (module docstring)."""

    def __init__(self) -> None:
        self.start = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time() - 1.0  # file-system timestamps may be coarser than the clock

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        failed, total = failed_jobs(sweep, self.start)
        if not failed:
            return
        lines = [f"{len(failed)} of {total} jobs failed:", *(f"  {name}: {error}" for name, error in failed)]
        with contextlib.suppress(OSError):
            (sweep / "failed_jobs.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(f"mu_runner: {line}" if not line.startswith("  ") else line for line in lines),
              file=sys.stderr)
        raise SystemExit(1)  # BaseException: Hydra's callback runner lets it through, the process exits 1
