"""A killed original (or reference) training resumes from its last epoch checkpoint, which sits
next to its cache entry and is replaced by the finished entry (callbacks/resume.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import same_state

from mu_runner import run as R
from mu_runner.cache import Cache
from mu_runner.callbacks.resume import EpochCheckpoint, partial_path


class Killed(Exception):
    pass


def _epochs_recorder(monkeypatch, kill_after: int | None = None) -> list[int]:
    """Epoch indices whose checkpoint was written; raise right after `kill_after`'s (a kill)."""
    done: list[int] = []
    real = EpochCheckpoint.on_train_epoch_end

    def record(self, trainer, module):
        real(self, trainer, module)
        done.append(int(trainer.current_epoch))
        if kill_after is not None and trainer.current_epoch == kill_after:
            raise Killed

    monkeypatch.setattr(EpochCheckpoint, "on_train_epoch_end", record)
    return done


def test_a_killed_original_training_resumes_from_its_last_epoch(tiny, tmp_path, monkeypatch):
    cfg = tiny("train.epochs=3", f"paths.cache_dir={tmp_path / 'cache'}")
    data = R.load_data(cfg)
    cache = Cache(cfg.paths.cache_dir)
    spec = {"kind": "original", **R._recipe_spec(cfg)}
    entry, partial = cache.path("original", spec), partial_path(cache.path("original", spec))

    done = _epochs_recorder(monkeypatch, kill_after=1)
    with pytest.raises(Killed):
        R.get_original(cfg, data, cache)
    assert done == [0, 1] and partial.exists() and not entry.exists()  # two epochs kept, no entry

    monkeypatch.undo()
    done = _epochs_recorder(monkeypatch)
    resumed, hit = R.get_original(cfg, data, cache)
    assert not hit and done == [2]  # only the third epoch was trained
    assert entry.exists() and not partial.exists()  # the finished entry replaced the checkpoint

    monkeypatch.undo()  # the same training, never interrupted, in its own cache
    whole, _ = R.get_original(cfg, data, Cache(tmp_path / "other"))
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in
               zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True))
    assert same_state(resumed, whole), f"resumed weights differ from an uninterrupted training by {diff}"


def test_an_unreadable_checkpoint_is_reported_and_training_starts_over(tiny, tmp_path, monkeypatch, caplog):
    cfg = tiny("train.epochs=2", f"paths.cache_dir={tmp_path / 'cache'}")
    data = R.load_data(cfg)
    cache = Cache(cfg.paths.cache_dir)
    partial = partial_path(cache.path("original", {"kind": "original", **R._recipe_spec(cfg)}))
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"not a checkpoint")
    done = _epochs_recorder(monkeypatch)
    with caplog.at_level("WARNING", logger="mu_runner"):
        R.get_original(cfg, data, cache)
    assert done == [0, 1] and not partial.exists()
    assert f"checkpoint {partial} is unreadable" in caplog.text


def test_checkpoint_every_0_writes_none(tiny, tmp_path, monkeypatch):
    cfg = tiny("train.epochs=1", "checkpoint.every_n_epochs=0", f"paths.cache_dir={tmp_path / 'cache'}")
    writes = []
    monkeypatch.setattr(torch, "save", lambda *a, **k: writes.append(a[1]))  # Lightning saves through torch.save
    R.get_original(cfg, R.load_data(cfg), Cache(cfg.paths.cache_dir))
    assert not [w for w in writes if str(w).endswith(".tmp")]
