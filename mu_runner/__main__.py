"""python -m mu_runner [overrides]  |  python -m mu_runner -m method=finetune,retrain forget.k=1,2"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mu_runner.errors import MuRunnerError
from mu_runner.utils import gpus  # registers the launcher presets' resolvers (visible_gpus, ...)

log = logging.getLogger("mu_runner")


def _mkdir(path: str) -> str:
    """`${mkdir:DIR}`: DIR, created if missing (e.g. the Optuna study's sqlite folder, which must
    exist before the sweeper opens its storage)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


_ITEM = re.compile(r",(?=[+~]*[A-Za-z_][\w.@/-]*=)")  # a comma that starts the next key=value (not one inside [3,4])


def _dirname(name: str, limit: int = 120, cut: int = 200) -> str:
    """`${dirname:NAME}`: NAME (Hydra's `override_dirname`, `key=value` items joined by ',') as a
    directory name, within file-system limits (255 bytes). A long list first drops each key's
    dotted prefix (`method.optimizer.lr=0.1` -> `lr=0.1`), so that every swept *value* stays
    visible; if that is still longer than `cut` bytes it keeps the first `cut`. Either way a short
    hash of the whole is added, so the name stays unique and a restarted sweep finds the same
    directory again."""
    from mu_runner.utils.redact import redact
    name = redact(name).replace("/", "_")  # no credential typed into an override becomes a directory name
    if len(name.encode()) <= limit:
        return name
    import hashlib
    digest = "~" + hashlib.sha1(name.encode()).hexdigest()[:10]
    items = _ITEM.split(name)
    short = ",".join(re.sub(r"^([+~]*)[^=]*\.", r"\1", item) if "=" in item else item for item in items)
    return short.encode()[:cut].decode(errors="ignore") + digest


OmegaConf.register_new_resolver("mkdir", _mkdir, replace=True)
OmegaConf.register_new_resolver("dirname", _dirname, replace=True)
# conf/hydra/launcher/*.yaml are complete presets named like the plugins' configs (hydra/launcher=ray...);
# Hydra still checks them against the plugins' schemas and says that this check is deprecated
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


_HYDRA_DETAIL = ("full_key:", "object_type=", "reference_type=")


def one_line(message: str) -> str:
    """Hydra's multi-line refusal as one line: its lines joined, a list of options comma-separated,
    OmegaConf's detail lines (full_key, object_type) dropped."""
    parts: list[str] = []
    listing = False
    for raw in message.splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):  # Hydra's search path listing: not the user's mistake
            break
        if not line or line.startswith(_HYDRA_DETAIL) or line.startswith("Set the environment variable"):
            continue
        if listing and raw.startswith(("\t", " ")):  # an option under "Available options in '<group>':"
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.startswith("Available options")
        parts.append(line[0].lower() + line[1:] if listing else line)
    return "; ".join(p.rstrip(".") for p in parts)


def _one_line_hydra_errors() -> None:
    """Hydra's own refusals of a command line — an option a group does not have (`method=nope`), a key
    nothing has (`data.nope=3`), override syntax — end like every other bad input: one line, exit
    code 2, nothing run (docs/design.md, Failure behaviour). HYDRA_FULL_ERROR=1 keeps Hydra's report.

    Hydra reports them in `hydra._internal.utils.run_and_report`, around the whole command (a
    multirun's jobs included); this wraps the function it is handed, so any other error is reported
    by Hydra as before.
    """
    from hydra._internal import utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    original = hydra_utils.run_and_report
    if getattr(original, "mu_runner", False):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                cause = err.__cause__
                text = str(err) + (f"\n{cause}" if cause is not None and str(cause) not in str(err) else "")
                from mu_runner.utils.redact import redact
                print(f"mu_runner: error: {redact(one_line(text))}", file=sys.stderr)
                sys.exit(2)
        return original(guarded)

    run_and_report.mu_runner = True
    hydra_utils.run_and_report = run_and_report


_one_line_hydra_errors()


def _to_log_files(level: int, message: str) -> None:
    """Log `message` to the run's log file(s) only: on the terminal the error is said once, below."""
    from mu_runner.utils.redact import redact
    record = log.makeRecord(log.name, level, __file__, 0, redact(message), None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="pkg://mu_runner.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns avg_gap so that a Hydra sweeper can minimise it.

    A user error ends a single run with one line and exit code 2. In a multirun it ends only
    that job (its directory gets `error.txt`, no metrics.json, so a restart retries it) and the
    sweep goes on: one diverging method must not cost the other jobs.
    """
    from mu_runner.run import run  # heavy imports after Hydra has parsed the command line
    from mu_runner.utils.console import quiet_libraries
    from mu_runner.utils.redact import protect_run, redact

    quiet_libraries()
    protect_run()  # no credential in Hydra's files, the log or W&B's record of the command line

    try:
        gpus.assign_job_gpu(cfg)  # a parallel job that sees several GPUs takes its own (utils/gpus.py)
        if cfg.get("tune") is not None:  # experiment=tune: one Optuna trial over the tuning seeds
            from mu_runner.tuning import tune
            return tune(cfg)
        metrics = run(cfg)
    except MuRunnerError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # the traceback, as Hydra gives it for other errors
        _to_log_files(logging.ERROR, str(err))  # the run's log keeps it; the terminal gets the lines below
        for line in str(err).splitlines():  # one line per problem (validate.py collects them all)
            print(f"mu_runner: error: {redact(line)}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            out = Path(HydraConfig.get().runtime.output_dir)
            with contextlib.suppress(OSError):  # a full disk must not turn the one line into a traceback
                (out / "error.txt").write_text(redact(f"{type(err).__name__}: {err}\n"))
            return None
        sys.exit(2)
    return metrics.get("summary/avg_gap")


def cli() -> None:
    """`python -m mu_runner` and the `mu-runner` command: `main`, then the process ends without
    the interpreter's seconds of module teardown (mu_runner/utils/fastexit.py)."""
    from mu_runner.utils.fastexit import exit_now
    try:
        main()
    except SystemExit as done:  # Hydra's and ours: the status it carries
        exit_now(done.code)
    exit_now(0)


if __name__ == "__main__":
    cli()
