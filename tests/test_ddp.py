"""trainer=ddp on CPU: 2 processes (gloo), in subprocesses, with the tiny config.

A cold cache completes (the cache trainings run on one device before any process group; a
deadlock would hit the timeout), exactly one metrics.json is written (rank 0's), a warm cache is
only read and repeats the numbers bit for bit, and the numbers are a single process's within TOL.

TOL: DDP changes nothing but the order of float sums (batch sizes are global, each rank takes its
share of every batch and its augmentation; BatchNorm statistics are the global batch's). Measured on
2026-12-01 with this test's config (finetune, one epoch, test ResNet): DDP on 2 CPU processes vs one
process on 1 thread moved retain accuracy by 0.006, test accuracy by 0 and the weight change by
0.02 %; one process on 2 threads instead of 1 moved them by 0.006, 0.003 and 0.04 %. TOL leaves
5x that (docs/design.md, Running at scale).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from omegaconf import OmegaConf

from mu_runner import ddp

TOL = 0.03  # accuracies of the unlearned model, DDP vs one process (module docstring)
ACCURACIES = ("forget_acc", "retain_acc", "test_acc", "test_forget_acc")
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "trainer.deterministic=true", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
ARGS = [*TINY, "train.epochs=1", "save_model=true"]  # finetune, one epoch of everything
TIMEOUT = 420  # a deadlock fails the test instead of hanging it


def mu_runner(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mu_runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: DDP on a cold cache; B: one process on the cache A made (in this process: what is compared
    is the numbers, not the command line); C: DDP again (warm cache)."""
    from conftest import compose_config

    from mu_runner.run import run

    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for name in ("a", "b", "c"):
        if name == "b":
            cfg = compose_config([*ARGS, f"paths.cache_dir={root}/outputs/cache"], root)
            cfg.paths.output_dir = str(root / "b")
            run(cfg)
            continue
        res = mu_runner(*ARGS, *DDP, f"paths.root_dir={root}", f"hydra.run.dir={root}/{name}", cwd=root)
        assert res.returncode == 0, f"run {name}: {res.stderr[-3000:]}"
        out[name] = res
    return root, out


@pytest.mark.slow  # real runs in subprocesses (the fixture's DDP runs: about a minute)
def test_ddp_on_a_cold_cache_completes_and_rank_0_alone_writes(runs):
    root, res = runs
    log = res["a"].stdout + res["a"].stderr
    assert log.count("cache miss: building original") == 1  # by the launching process, on one device
    assert log.count("cache miss: building retrain") == 1
    assert log.count("unlearning took") == 1  # one results table: rank 1 prints none
    assert [p.parent.name for p in root.rglob("metrics.json")].count("a") == 1
    assert not (root / "outputs" / "runs").exists()  # rank 1 made no run directory of its own
    assert "[rank 1]" not in log  # rank 1 says nothing when nothing goes wrong


@pytest.mark.slow  # real runs in subprocesses (the fixture's DDP runs: about a minute)
def test_ddp_numbers_are_a_single_process_numbers_within_tolerance(runs):
    root, _ = runs
    a, b = _metrics(root / "a"), _metrics(root / "b")
    assert a["original"] == b["original"] and a["retrain"] == b["retrain"]  # the same cache entries
    assert a["n_forget"] == b["n_forget"] and a["optimizer_steps"] == b["optimizer_steps"]  # global batches
    for key in ACCURACIES:
        if b[key] is None:
            assert a[key] is None
        else:
            assert abs(a[key] - b[key]) <= TOL, (key, a[key], b[key])
    assert abs(a["weight_change"] - b["weight_change"]) <= 0.01 * b["weight_change"]


@pytest.mark.slow  # real runs in subprocesses (the fixture's DDP runs: about a minute)
def test_ddp_on_a_warm_cache_only_reads_it_and_repeats_the_numbers(runs):
    root, res = runs
    log = res["c"].stdout + res["c"].stderr
    assert "cache miss" not in log
    assert "original: from the cache" in log
    a, c = _metrics(root / "a"), _metrics(root / "c")
    assert c["cache_hits"] == {"original": True, "retrain": True}
    same = {k for k in a if "seconds" not in k and k not in ("cache_hits", "git_commit")}
    assert {k: c[k] for k in same} == {k: a[k] for k in same}
    from safetensors.torch import load_file
    wa, wc = load_file(root / "a" / "model.safetensors"), load_file(root / "c" / "model.safetensors")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)  # bit for bit: gloo's sums are deterministic


@pytest.mark.slow  # real runs in subprocesses (the fixture's DDP runs: about a minute)
def test_ddp_batch_size_that_does_not_split_among_the_processes_is_one_line(runs):
    from conftest import compose_config

    from mu_runner.errors import ConfigError
    from mu_runner.run import build

    root, _ = runs
    cfg = compose_config([*ARGS, *DDP, "method.batch_size=127", f"paths.cache_dir={root}/outputs/cache"], root)
    cfg.paths.output_dir = str(root / "odd")
    with pytest.raises(ConfigError) as err:  # before any rank is started
        build(cfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and "127" in lines[0] and "multiple of 2" in lines[0]
    assert not (root / "odd" / "metrics.json").exists()


# --------------------------------------------------------------------------- no subprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
        net = ddp.GlobalBatchNormSync().apply(net)
        model = torch.nn.parallel.DistributedDataParallel(net)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(10, 3, 8, 8, generator=gen) * 3 + 1, torch.randint(0, 3, (10,), generator=gen)
        torch.nn.functional.cross_entropy(model(x[rank::2]), y[rank::2]).backward()  # a rank's share
        net = ddp.GlobalBatchNormSync().revert(net)
        if rank == 0:
            torch.save({"grads": {k: p.grad for k, p in net.named_parameters()}, "state": net.state_dict(),
                        "bn": type(net[1]).__name__}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes that import torch and Lightning (10-30 s)
def test_global_batchnorm_on_two_cpu_processes_is_batchnorm_over_the_global_batch(tmp_path):
    """CPU processes get sync_batchnorm through GlobalBatchNorm (torch's SyncBatchNorm refuses CPU
    modules): gradients and running statistics equal one process's on the whole batch."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_bn_rank, args=(_free_port(), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, 8, 8, generator=gen) * 3 + 1, torch.randint(0, 3, (10,), generator=gen)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    got = torch.load(out)
    assert got["bn"] == "BatchNorm2d"  # given back as it was
    for name, p in net.named_parameters():
        assert torch.allclose(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6), name
    for name, t in net.state_dict().items():
        assert torch.allclose(got["state"][name].float(), t.float(), rtol=1e-5, atol=1e-6), name


def test_cache_trainings_get_one_device_and_no_process_group():
    cfg = OmegaConf.create({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "sync_batchnorm": True})
    assert ddp.multi_process(cfg)
    assert ddp.single_device(cfg) == {"devices": 1, "strategy": "auto", "num_nodes": 1, "sync_batchnorm": False}
    listed = OmegaConf.create({"accelerator": "gpu", "devices": [2, 3], "strategy": "ddp"})
    assert ddp.single_device(listed)["devices"] == [2]  # this process's own (local rank 0)
    for single in ({"devices": 1}, {"devices": [3]}, {"devices": "auto", "accelerator": "cpu"}):
        assert not ddp.multi_process(OmegaConf.create(single))
        assert ddp.single_device(OmegaConf.create(single)) == {}


def test_plan_of_two_cpu_processes_starts_the_other_rank_itself():
    cfg = OmegaConf.create({"_target_": "lightning.Trainer", "accelerator": "cpu", "devices": 2, "strategy": "ddp",
                            "sync_batchnorm": True})
    launch = ddp.plan(cfg)
    assert (launch.world_size, launch.local, launch.spawn, launch.cpu_sync_batchnorm) == (2, 2, True, True)
    assert ddp.plan(OmegaConf.create({"_target_": "lightning.Trainer", "accelerator": "cpu"})) == ddp.Launch()
