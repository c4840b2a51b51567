"""Cache entries carry the SHA-256 of their tensors: a damaged entry is rebuilt, never used."""

from __future__ import annotations

import errno
import json
import logging
import struct

import pytest
import torch
from safetensors.torch import save_file

from mu_runner import cache as cache_module
from mu_runner.cache import Cache, CacheError, _atomic_save_tensors, read_entry, tensor_digest

SPEC = {"seed": 0}


class Builds:
    """A build function that counts its calls; each build returns the same known tensors."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.n += 1
        return {"w": torch.arange(256.0).reshape(16, 16), "b": torch.ones(3, dtype=torch.bfloat16),
                "steps": torch.tensor(7)}


def _entry(tmp_path) -> tuple[Cache, Builds, object]:
    cache, builds = Cache(tmp_path), Builds()
    cache.get_or_create("original", SPEC, builds)
    return cache, builds, cache.path("original", SPEC)


def _damage_warnings(caplog, path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"cache entry {path} is damaged (" in r.getMessage()
            and r.getMessage().endswith("): rebuilding it")]


def _rebuilt_once(cache, builds, path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="mu_runner"):
        tensors, hit = cache.get_or_create("original", SPEC, builds)
    assert (hit, builds.n) == (False, 2)
    assert torch.equal(tensors["w"], Builds()()["w"])
    assert len(_damage_warnings(caplog, path)) == 1
    tensors, hit = cache.get_or_create("original", SPEC, builds)  # the rebuilt entry is whole again
    assert (hit, builds.n) == (True, 2) and torch.equal(tensors["w"], Builds()()["w"])


def test_an_intact_entry_is_a_hit_without_rebuild_or_warning(tmp_path, caplog):
    cache, builds, _ = _entry(tmp_path)
    with caplog.at_level(logging.INFO, logger="mu_runner"):
        tensors, hit = cache.get_or_create("original", SPEC, builds)
    assert (hit, builds.n) == (True, 1)
    assert all(torch.equal(tensors[k], v) for k, v in Builds()().items())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_hash_covers_names_dtypes_shapes_and_bytes():
    base = {"w": torch.zeros(2, 3)}
    digests = {tensor_digest(t) for t in (base, {"v": torch.zeros(2, 3)}, {"w": torch.zeros(2, 3, dtype=torch.float64)},
                                          {"w": torch.zeros(3, 2)}, {"w": torch.tensor([[0, 0, 0], [0, 0, 1e-30]])})}
    assert len(digests) == 5
    assert tensor_digest(base) == tensor_digest({"w": torch.zeros(2, 3)})


def test_a_truncated_entry_is_rebuilt(tmp_path, caplog):
    cache, builds, path = _entry(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    _rebuilt_once(cache, builds, path, caplog)


def test_a_zero_byte_entry_is_rebuilt(tmp_path, caplog):
    cache, builds, path = _entry(tmp_path)
    path.write_bytes(b"")
    _rebuilt_once(cache, builds, path, caplog)


def test_flipped_bytes_in_a_tensor_are_detected_and_rebuilt(tmp_path, caplog):
    cache, builds, path = _entry(tmp_path)
    raw = bytearray(path.read_bytes())
    header = struct.unpack("<Q", raw[:8])[0]
    layout = json.loads(raw[8:8 + header])
    start, _ = layout["w"]["data_offsets"]
    raw[8 + header + start + 5] ^= 0xFF  # header intact, one byte of w's data changed
    path.write_bytes(bytes(raw))
    with pytest.raises(cache_module.Damaged, match="do not match the SHA-256"):
        read_entry(path)
    _rebuilt_once(cache, builds, path, caplog)
    assert "do not match the SHA-256" in _damage_warnings(caplog, path)[0]


def test_an_unreadable_entry_that_cannot_be_removed_is_one_line(tmp_path):
    cache = Cache(tmp_path)
    path = cache.path("original", SPEC)
    path.mkdir(parents=True)  # a directory where the entry should be: unreadable, and unlink refuses it
    with pytest.raises(CacheError) as err:
        cache.get_or_create("original", SPEC, Builds())
    assert str(err.value).startswith(f"cache entry {path} is damaged (") and "delete it by hand" in str(err.value)
    assert "\n" not in str(err.value)


def test_entries_written_before_the_hash_still_load(tmp_path):
    cache, builds = Cache(tmp_path), Builds()
    path = cache.path("original", SPEC)
    path.parent.mkdir(parents=True)
    save_file(builds(), str(path), metadata={"kind": "original"})  # the old format: no sha256
    tensors, hit = cache.get_or_create("original", SPEC, builds)
    assert (hit, builds.n) == (True, 1) and torch.equal(tensors["w"], Builds()()["w"])


def test_a_rejected_entry_is_rebuilt(tmp_path, caplog):
    """`check` raising a MuRunnerError (the run's: does not fit the backbone) means rebuild."""
    from mu_runner.errors import CheckpointError

    cache, builds, path = _entry(tmp_path)
    seen = []

    def check(tensors):
        seen.append(1)
        if len(seen) <= 2:  # the fast path and the locked path both judge the stored entry
            raise CheckpointError("it does not fit the backbone: size mismatch for w")

    with caplog.at_level(logging.INFO, logger="mu_runner"):
        _, hit = cache.get_or_create("original", SPEC, builds, check=check)
    assert (hit, builds.n, len(seen)) == (False, 2, 2)
    assert "it does not fit the backbone" in _damage_warnings(caplog, path)[0]
    assert cache.get_or_create("original", SPEC, builds, check=check)[1] is True


def test_a_disk_full_write_leaves_no_entry_and_no_temp_file(tmp_path, monkeypatch):
    cache, builds = Cache(tmp_path), Builds()
    real = cache_module.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # half a file on disk, then the disk is full
        with open(filename, "r+b") as f:
            f.truncate(50)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", full)
    with pytest.raises(CacheError) as err:
        cache.get_or_create("original", SPEC, builds)
    path = cache.path("original", SPEC)
    assert str(err.value).startswith(f"cache entry {path} could not be written (No space left on device)")
    assert not path.exists() and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(cache_module, "save_file", real)
    assert cache.get_or_create("original", SPEC, builds)[1] is False and builds.n == 2
    assert cache.get_or_create("original", SPEC, builds)[1] is True


def test_a_killed_writers_temp_file_is_never_trusted_and_is_cleaned_up(tmp_path):
    cache, builds = Cache(tmp_path), Builds()
    path = cache.path("original", SPEC)
    path.parent.mkdir(parents=True)
    stale = path.parent / f".{path.name}.x1y2.tmp"
    _atomic_save_tensors(stale, {"w": torch.zeros(1)}, {})  # complete but under a temp name
    tensors, hit = cache.get_or_create("original", SPEC, builds)
    assert hit is False and builds.n == 1 and torch.equal(tensors["w"], Builds()()["w"])
    assert not stale.exists()


def test_a_cached_original_that_does_not_fit_the_backbone_is_rebuilt(tiny, tmp_path, caplog):
    """The run's own cache entries are rebuilt when they do not fit; a user's checkpoint is an error."""
    from mu_runner import run as run_module
    from mu_runner.errors import CheckpointError

    cfg = tiny("train.epochs=1", "reference=none")
    data = run_module.load_data(cfg)
    cache = Cache(cfg.paths.cache_dir)
    trainings = []

    def counting_fit(cfg, data, retain, net, phase="train", **kwargs):  # no training: the fresh net's state
        trainings.append(phase)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(run_module, "fit_supervised", counting_fit)
    try:
        first, hit = run_module.get_original(cfg, data, cache)
        assert hit is False and trainings == ["original"]
        path = next((tmp_path / "cache" / "original").glob("*.safetensors"))
        wrong = {"fc.weight": torch.zeros(3, 3)}  # a whole, hashed entry of another model
        _atomic_save_tensors(path, wrong, {"kind": "original"})
        with caplog.at_level(logging.INFO, logger="mu_runner"):
            again, hit = run_module.get_original(cfg, data, cache)
        assert hit is False and trainings == ["original", "original"]
        assert "does not fit the backbone" in _damage_warnings(caplog, path)[0]
        assert run_module.get_original(cfg, data, cache)[1] is True and len(trainings) == 2
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    finally:
        monkeypatch.undo()
    save_file(wrong, str(tmp_path / "mine.safetensors"))
    with pytest.raises(CheckpointError, match=r"original_checkpoint=.*mine\.safetensors.* does not fit the backbone"):
        run_module.get_original(tiny("train.epochs=1", f"original_checkpoint={tmp_path}/mine.safetensors"),
                                data, cache)
