"""The artifact cache: content keys, one build per key across processes, nothing half-written."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from mu_runner.cache import Cache, atomic_write_json, cache_key


def test_key_depends_on_content_not_on_key_order():
    assert cache_key({"a": 1, "b": {"c": 2}}) == cache_key({"b": {"c": 2}, "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


def test_second_request_is_a_hit_and_does_not_build(tmp_path):
    cache, builds = Cache(tmp_path), []
    def build():
        return (builds.append(1), {"w": torch.arange(3.0)})[1]
    first, hit1 = cache.get_or_create("original", {"seed": 0}, build)
    second, hit2 = cache.get_or_create("original", {"seed": 0}, build)
    assert (hit1, hit2) == (False, True) and len(builds) == 1
    assert torch.equal(first["w"], second["w"])
    cache.get_or_create("original", {"seed": 1}, build)
    assert len(builds) == 2


def test_a_failed_build_leaves_no_entry(tmp_path):
    cache = Cache(tmp_path)

    def boom():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.get_or_create("original", {"seed": 0}, boom)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.tmp"))


def _slow_build_worker(root: str, log: str) -> None:
    def build():
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to arrive and wait on the lock
        return {"w": torch.ones(2)}

    Cache(root).get_or_create("original", {"seed": 0}, build)


def test_parallel_jobs_build_an_entry_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build_worker, args=(str(tmp_path / "c"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text().count("built") == 1
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 1


def test_atomic_json_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write_json(target, {"x": Unserialisable()})
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))
    atomic_write_json(target, {"x": 1})
    assert target.read_text().strip().startswith("{")


@pytest.mark.parametrize("limit", ["+trainer.max_steps=3", "+trainer.limit_train_batches=2",
                                   "+trainer.accumulate_grad_batches=2"])
def test_trainer_limits_reach_the_unlearning_stage_but_never_a_cached_original(tiny, tmp_path, limit):
    """A cache entry is keyed by its recipe, not by trainer.*: were `trainer.max_steps=3` to cut the
    original's training, every later run with the same recipe would read a half-trained original."""
    from conftest import same_state

    from mu_runner.run import build

    plain = build(tiny("reference=none", tmp=tmp_path / "a"))
    limited = build(tiny("reference=none", limit, tmp=tmp_path / "b"))
    assert same_state(plain.original, limited.original)
    knob = limit.split(".")[1].split("=")[0]
    assert getattr(limited.trainer, knob) != getattr(plain.trainer, knob)  # the unlearning stage has it
