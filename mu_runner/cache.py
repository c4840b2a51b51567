"""Content-addressed artifact cache: originals, retrained references, and the like.

An entry's key is the SHA-256 of exactly the configuration that determines it (plus
CACHE_VERSION). Entries are written to a temporary file and renamed into place under a file lock,
so parallel jobs of a sweep never corrupt or duplicate one, and a killed job leaves nothing that a
later run would trust.

Each entry carries the SHA-256 of its tensors (names, dtypes, shapes, bytes) in its safetensors
metadata, checked on every load: a truncated, empty, unreadable or altered entry is logged as a
warning, removed and rebuilt, never used. Entries written before the hash existed load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

from mu_runner.errors import MuRunnerError, OutputError
from mu_runner.utils.redact import redact_bytes

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when training code changes what an identical config produces


def cache_key(spec: dict) -> str:
    """Stable hash of a JSON-able spec (key order does not matter)."""
    blob = json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_failed(path: Path, err: OSError) -> OutputError:
    """The one line for a file that could not be written (disk full, permissions, ...)."""
    why = err.strerror or str(err) or type(err).__name__
    return OutputError(f"{path} could not be written ({why}); free space or fix permissions there")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing.

    A failed write (disk full, permissions) leaves neither `path` nor the temporary file and
    raises OutputError naming `path`. Credentials in `data` are redacted (utils/redact.py).
    """
    path, data, tmp = Path(path), redact_bytes(data), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name says they are there
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, err) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


class CacheError(OutputError):
    """A cache entry cannot be written or removed (disk full, permissions): one line naming it."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def atomic_save_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """safetensors written like `atomic_write_bytes` (all or nothing), the tensors' SHA-256 in its
    metadata; a failed write raises OutputError naming `path`."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={**{k: str(v) for k, v in (meta or {}).items()},
                                          "sha256": tensor_digest(tensors)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, err) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


_atomic_save_tensors = atomic_save_file


class Damaged(Exception):
    """A cache entry that must not be used; the message says why."""


def read_entry(path: Path) -> dict[str, torch.Tensor]:
    """The entry's tensors, checked against the SHA-256 it was written with (raises Damaged)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as err:  # noqa: BLE001 - truncated, empty, unreadable: safetensors and the OS raise many kinds
        line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        raise Damaged(f"{type(err).__name__}: {line}" if line else type(err).__name__) from None
    expected = meta.get("sha256")
    if expected is not None and tensor_digest(tensors) != expected:
        raise Damaged("its tensors do not match the SHA-256 they were written with")
    return tensors


class Cache:
    """`get_or_create(kind, spec, build)` returns the stored tensors, building them once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / f"{cache_key(spec)[:24]}.safetensors"

    def get_or_create(self, kind: str, spec: dict, build: Callable[[], dict[str, torch.Tensor]],
                      check: Callable[[dict[str, torch.Tensor]], None] | None = None,
                      ) -> tuple[dict[str, torch.Tensor], bool]:
        """(tensors, hit). `build` runs at most once per key across concurrent processes.

        A stored entry that is damaged, or that `check` rejects with a MuRunnerError (e.g. its
        tensors do not fit the backbone), is removed and rebuilt with a warning naming it.
        """
        path = self.path(kind, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # fast path: complete entries only ever appear by rename
            try:
                return self._read(path, check), True
            except Damaged:
                pass  # judged again under the lock: another job may be rebuilding it right now
        with FileLock(str(path) + ".lock"):
            if path.exists():  # built by another job while we waited
                try:
                    return self._read(path, check), True
                except Damaged as why:
                    self._remove(path, str(why))
                    log.warning("cache entry %s is damaged (%s): rebuilding it", path, why)
            for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's leftovers
                stale.unlink(missing_ok=True)
            log.info("cache miss: building %s %s", kind, path.name)
            tensors = build()
            try:
                atomic_write_json(path.with_suffix(".json"), spec)  # what the entry is (for people)
                atomic_save_file(path, tensors, {"kind": kind})  # last: its presence means complete
            except OutputError as err:
                raise CacheError(f"cache entry {err}") from None
        return tensors, False

    @staticmethod
    def _read(path: Path, check) -> dict[str, torch.Tensor]:
        tensors = read_entry(path)
        if check is not None:
            try:
                check(tensors)
            except MuRunnerError as err:
                raise Damaged(str(err)) from None
        return tensors

    @staticmethod
    def _remove(path: Path, why: str) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise CacheError(f"cache entry {path} is damaged ({why}) and cannot be removed "
                             f"({err.strerror or err}): delete it by hand") from None
