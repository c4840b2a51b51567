"""Content-addressed artifact cache: originals, retrained references, and the like.

An entry's key is the SHA-256 of exactly the configuration that determines it (plus
CACHE_VERSION). Entries are written to a temporary file and renamed into place under a file lock,
so parallel jobs of a sweep never corrupt or duplicate one, and a killed job leaves nothing that a
later run would trust.
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
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when training code changes what an identical config produces


def cache_key(spec: dict) -> str:
    """Stable hash of a JSON-able spec (key order does not matter)."""
    blob = json.dumps({"v": CACHE_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Cache:
    """`get_or_create(kind, spec, build)` returns the stored tensors, building them once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / f"{cache_key(spec)[:24]}.safetensors"

    def get_or_create(self, kind: str, spec: dict,
                      build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
        """(tensors, hit). `build` runs at most once per key across concurrent processes."""
        path = self.path(kind, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # fast path: complete entries only ever appear by rename
            return load_file(path), True
        with FileLock(str(path) + ".lock"):
            if path.exists():  # built by another job while we waited
                return load_file(path), True
            log.info("cache miss: building %s %s", kind, path.name)
            tensors = build()
            _atomic_save_tensors(path, tensors, {"kind": kind})
            atomic_write_json(path.with_suffix(".json"), spec)
        return tensors, False
