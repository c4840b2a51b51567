"""Credentials never reach a run's files, logs or reports.

A credential is the value of an environment variable named WANDB_API_KEY or ending in _KEY, _TOKEN,
_SECRET or _PASSWORD (values of at least MIN_LENGTH characters: shorter ones are flags, not
secrets, and replacing them everywhere would mangle the outputs). Wherever mu_runner writes text
(the run directory and cache through `atomic_write_bytes`, Hydra's `.hydra/` files, the log file,
the console's error line, the logger's config and the command line W&B records) each such value
becomes `<redacted:NAME>`; a config value under a key named like a credential (`api_key`,
`token`, `password`, `secret`, `*_api_key`, ...) becomes `<redacted>`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

SECRET_ENV = re.compile(r"(^WANDB_API_KEY$|_(KEY|TOKEN|SECRET|PASSWORD)$)", re.IGNORECASE)
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
MIN_LENGTH = 8


def secrets() -> list[tuple[str, str]]:
    """(variable name, value) of every credential in the environment, longest value first."""
    found = [(k, v) for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_LENGTH]
    return sorted(found, key=lambda kv: -len(kv[1]))


def redact(text: str) -> str:
    for name, value in secrets():
        if value in text:
            text = text.replace(value, f"<redacted:{name}>")
    return text


def redact_bytes(data: bytes) -> bytes:
    for name, value in secrets():
        raw = value.encode()
        if raw in data:
            data = data.replace(raw, f"<redacted:{name}>".encode())
    return data


def redact_obj(obj):
    """A copy of a JSON-like object (dicts, lists, strings) with credentials replaced."""
    if isinstance(obj, dict):
        return {k: "<redacted>" if isinstance(k, str) and SECRET_KEY.search(k) and isinstance(v, str) and v
                else redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    if isinstance(obj, str):
        return redact(obj)
    return obj


class RedactFilter(logging.Filter):
    """A handler filter: the formatted message (and a traceback's text) with credentials replaced."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_filter() -> None:
    """Every handler of the root logger (Hydra's console and log file) redacts what it writes."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


def scrub_files(paths: Iterable[Path]) -> None:
    """Rewrite text files written by others (Hydra's .hydra/*.yaml) without credentials."""
    from mu_runner.cache import atomic_write_bytes  # it redacts what it writes

    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if redact_bytes(data) != data:
            atomic_write_bytes(Path(path), data)


def scrub_argv(argv: list[str]) -> None:
    """The command line, in place: W&B records sys.argv in its run metadata."""
    argv[:] = [redact(a) for a in argv]


def protect_run() -> None:
    """At the start of a Hydra job: redacting log handlers, a redacted sys.argv, and Hydra's own
    files (.hydra/config.yaml, overrides.yaml, hydra.yaml; a sweep's multirun.yaml) rewritten."""
    import sys

    install_log_filter()
    scrub_argv(sys.argv)
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized() or not secrets():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    files = list((out / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
    if hc.sweep.dir:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    scrub_files(files)
