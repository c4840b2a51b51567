"""Writing safely: every run-directory file is all or nothing, metrics.json is the last one, and a
full disk is one line naming the file, leaving nothing that a later run would trust."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from mu_runner import cache as cache_module
from mu_runner.cache import atomic_write_bytes
from mu_runner.errors import MuRunnerError, OutputError

# A small generated data set: these tests are about files, not about the numbers.
SMALL = ("data=synthetic", "data.source.n_train=200", "data.source.n_test=100", "train.epochs=1")


class _FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, data) -> int:
        self.f.write(data[: len(data) // 2])  # part of it reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


def full_disk_for(monkeypatch, name: str) -> None:
    """Writes of the file `name` (through atomic_write_bytes) fail with ENOSPC."""
    real = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real(fd, *args, **kwargs)
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        return _FullDisk(f) if target.startswith(f".{name}.") else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_full_disk_leaves_neither_the_file_nor_a_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    full_disk_for(monkeypatch, "metrics.json")
    with pytest.raises(OutputError) as err:
        atomic_write_bytes(target, b"{}")
    assert str(err.value) == f"{target} could not be written (No space left on device); free space or fix permissions there"
    assert isinstance(err.value, MuRunnerError)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_whole_or_kept(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    full_disk_for(monkeypatch, "config.yaml")
    with pytest.raises(OutputError):
        atomic_write_bytes(target, b"new: 2\n")
    assert target.read_text() == "old: 1\n" and list(tmp_path.iterdir()) == [target]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny run up to its outputs: (stage, evaluation result), from which tests write run directories."""
    from conftest import TINY, compose_config

    from mu_runner.run import build

    tmp = tmp_path_factory.mktemp("finished")
    stage = build(compose_config([*TINY, *SMALL, "logger=csv", "save_model=true"], tmp))
    stage.fit()
    return stage, stage.evaluate()


def _untrusted_leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name == "metrics.json" or p.suffix == ".tmp"]


def test_a_full_disk_at_metrics_json_is_one_line_and_a_second_write_completes(finished, monkeypatch):
    from mu_runner.outputs import write_outputs

    stage, result = finished
    out = Path(stage.cfg.paths.output_dir)
    with monkeypatch.context() as mp:
        full_disk_for(mp, "metrics.json")
        with pytest.raises(OutputError) as err:
            write_outputs(stage, result, out)
    assert str(err.value).startswith(f"{out / 'metrics.json'} could not be written (No space left on device)")
    assert "\n" not in str(err.value)
    assert _untrusted_leftovers(out) == [] and (out / "model.safetensors").exists()
    write_outputs(stage, result, out)
    assert (out / "metrics.json").exists() and not list(out.rglob("*.tmp"))
    # metrics.json is the last file of the run directory (the CSV logger's files included)
    done = (out / "metrics.json").stat().st_mtime_ns
    assert (out / "logs" / "metrics.csv").exists()
    assert [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime_ns > done] == []


@pytest.mark.parametrize("name", ["config.yaml", "forget_split.json"])
def test_a_full_disk_at_any_file_writes_no_metrics(finished, tmp_path, monkeypatch, name):
    from mu_runner.outputs import write_outputs

    stage, result = finished
    full_disk_for(monkeypatch, name)
    with pytest.raises(OutputError, match=f"{tmp_path / name} could not be written"):
        write_outputs(stage, result, tmp_path)
    assert _untrusted_leftovers(tmp_path) == [] and not (tmp_path / name).exists()


def test_a_full_disk_at_the_model_leaves_no_model_and_no_metrics(finished, tmp_path, monkeypatch):
    from mu_runner.outputs import write_outputs

    stage, result = finished
    real = cache_module.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.truncate(filename, 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module, "save_file", full)
    with pytest.raises(OutputError, match=r"model\.safetensors could not be written \(No space left on device\)"):
        write_outputs(stage, result, tmp_path)
    assert not (tmp_path / "model.safetensors").exists() and _untrusted_leftovers(tmp_path) == []


def test_the_saved_model_is_whole_and_carries_its_hash(finished, tmp_path):
    from mu_runner.cache import read_entry
    from mu_runner.outputs import write_outputs

    stage, result = finished
    write_outputs(stage, result, tmp_path)
    saved = read_entry(tmp_path / "model.safetensors")  # checks the SHA-256 in its metadata
    assert all(torch.equal(v, saved[k]) for k, v in stage.module.net.state_dict().items())
