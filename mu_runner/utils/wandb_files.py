"""Read the metrics an offline W&B run left in its local `.wandb` file (no account, no network).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
records, each `crc32c(4) length(2, little-endian) type(1) payload`, where type 1 is a whole
record and 2/3/4 are the first/middle/last pieces of one split across blocks. Each record is a
`wandb_internal_pb2.Record` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

BLOCK, HEADER, RECORD_HEADER = 32 * 1024, 7, 7


def records(path: str | Path) -> Iterator[bytes]:
    """The payloads of a `.wandb` file, pieces joined."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER:  # block tail too short for a record: zero padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:
            break
        payload = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            yield pending
            pending = b""


def _parsed(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    out = []
    for payload in records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - the service is still writing this record: read again later
            break
        out.append(record)
    return out


def offline_history(run_dir: str | Path, timeout: float = 30.0) -> dict[str, list]:
    """{metric key: [values in logging order]} from every offline run under `run_dir`.

    W&B's service writes the file after `finish()` returns, so each file is read again (up to
    `timeout` seconds) until it ends with its run's exit record.
    """
    found: dict[str, list] = {}
    for path in sorted(Path(run_dir).rglob("offline-run-*/*.wandb")):
        deadline = time.monotonic() + timeout
        parsed = _parsed(path)
        while not any(r.WhichOneof("record_type") == "exit" for r in parsed) and time.monotonic() < deadline:
            time.sleep(0.2)
            parsed = _parsed(path)
        for record in parsed:
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    found.setdefault(key, []).append(json.loads(item.value_json))
    return found


def offline_run_info(run_dir: str | Path, timeout: float = 30.0) -> list[dict]:
    """Name, tags, group and job type of every offline run under `run_dir` (its `run` record)."""
    out = []
    for path in sorted(Path(run_dir).rglob("offline-run-*/*.wandb")):
        deadline = time.monotonic() + timeout
        runs = [r.run for r in _parsed(path) if r.WhichOneof("record_type") == "run"]
        while not runs and time.monotonic() < deadline:
            time.sleep(0.2)
            runs = [r.run for r in _parsed(path) if r.WhichOneof("record_type") == "run"]
        for run in runs[:1]:
            out.append({"name": run.display_name, "tags": list(run.tags), "group": run.run_group,
                        "job_type": run.job_type})
    return out
