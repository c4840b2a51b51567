"""A user's own checkpoint (`original_checkpoint`): tensors only, never code.

safetensors files, or `torch.load(weights_only=True)` (whose unpickler admits tensors and plain
containers only). Anything else (a text file, a truncated file, a pickle of arbitrary objects, a
dict without tensors) is one `CheckpointError` line; a crafted pickle's payload never runs.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import torch

from mu_runner.errors import CheckpointError, ConfigError


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict in `path` (a Lightning checkpoint's `state_dict` if it has one)."""
    if not Path(path).is_file():
        raise ConfigError(f"original_checkpoint={path!r}: file not found")
    try:
        state = _load(Path(path))
    except Exception as err:  # noqa: BLE001 - every way a file can fail to be tensors is the same answer
        raise CheckpointError(f"original_checkpoint={path!r}: not a safetensors / weights-only checkpoint "
                              f"({_reason(err)})") from None
    return state


class _NotTensors(ValueError):
    """The file loaded (or was sniffed) and is not a state dict: the message is the whole reason."""


def _load(path: Path) -> dict[str, torch.Tensor]:
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path, head):
        from safetensors.torch import load_file
        state = load_file(str(path))
    elif not head:
        raise _NotTensors("the file is empty")
    elif not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise _NotTensors(f"neither safetensors, a torch zip archive nor a pickle: it starts with {head[:8]!r}")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _NotTensors(f"it holds a {type(state).__name__}, not a dict of tensors")
    if not state:
        raise _NotTensors("it holds no tensors")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise _NotTensors(f"{key!r} is a {type(value).__name__}, not a tensor")
    return state


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file whatever its name: 8-byte little-endian header size, then a JSON object."""
    if len(head) < 9:
        return False
    size = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 2 <= size <= path.stat().st_size - 8


def _reason(err: BaseException) -> str:
    """The first informative line of a loader's error, short."""
    text = str(err).strip()
    if isinstance(err, _NotTensors):
        return text
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:  # torch's weights-only unpickler names the refused object
        return f"it pickles {found.group(1)}, which a weights-only load refuses"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
