"""One sweep command, every launcher: `-m hydra/launcher=<L> forget.k=1,2` (conf/hydra/launcher/).

Each launcher runs the 2 jobs in processes of their own, at the same time (joblib: 2 workers;
submitit_local: every job at once; ray: 2 logical CPUs, one per job), and each gives 2
metrics.json; the original the 2 jobs share is trained once (one "cache miss: building original"
in the jobs' logs, one "from the cache"): the cache's file lock holds across processes. Also:
the per-job GPU rule (mu_runner/utils/gpus.py) and the presets' resolvers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import SMALL
from conftest import TINY
from omegaconf import OmegaConf

SWEEP = [*TINY, *SMALL, "reference=none", "forget.k=1,2"]  # small generated data: the launchers are tested
LAUNCHERS = {
    "joblib": ["hydra.launcher.n_jobs=2"],
    "submitit_local": [],
    "ray": ["+hydra.launcher.ray.init.num_cpus=2"],  # 2 logical CPUs, one per job: both jobs at once
}
PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher",
           "ray": "hydra_plugins.hydra_ray_launcher"}


def mu_runner(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "mu_runner", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.mark.slow  # 2 jobs in processes of their own: 40-90 s each on 2 busy cores (ray: + its start)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_the_same_sweep_on_each_launcher_gives_two_runs_and_trains_the_original_once(tmp_path, launcher):
    pytest.importorskip(PLUGINS[launcher])  # installed by make setup / make test (the [cluster] extra)
    sweep = tmp_path / "sweep"
    res = mu_runner("-m", f"hydra/launcher={launcher}", *SWEEP, *LAUNCHERS[launcher], f"paths.root_dir={tmp_path}",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert sorted(len(m["forget_classes"]) for m in runs) == [1, 2]
    logs = [p.read_text() for p in sweep.rglob("mu_runner.log")]
    assert len(logs) == 2
    assert sum(log.count("cache miss: building original") for log in logs) == 1
    assert sum(log.count("original: from the cache") for log in logs) == 1
    assert len(list((tmp_path / "outputs" / "cache").glob("original/*.safetensors"))) == 1


# --------------------------------------------------------------------------- one GPU per job


def test_job_gpu_is_the_job_number_modulo_the_visible_gpus():
    from mu_runner.utils.gpus import job_gpu
    assert [job_gpu(n, 4) for n in range(6)] == [0, 1, 2, 3, 0, 1]


def test_a_parallel_job_takes_its_own_gpu_when_it_sees_several(monkeypatch):
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mu_runner.utils import gpus

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    hydra = OmegaConf.create({"mode": RunMode.MULTIRUN, "job": {"num": 6}})
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra))
    cfg = OmegaConf.create({"trainer": {"accelerator": "auto", "devices": 1}})
    assert gpus.assign_job_gpu(cfg) == 2 and cfg.trainer.devices == [2] and chosen == [2]
    for trainer in ({"accelerator": "gpu", "devices": [0]}, {"accelerator": "cpu", "devices": 1},
                    {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}):
        cfg = OmegaConf.create({"trainer": trainer})
        assert gpus.assign_job_gpu(cfg) is None and cfg.trainer == OmegaConf.create(trainer)  # as configured
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpus.assign_job_gpu(OmegaConf.create({"trainer": {"devices": 1}})) is None  # the launcher's one GPU


def test_launcher_presets_resolve_without_gpus(monkeypatch):
    import torch

    from mu_runner.utils import gpus  # noqa: F401 - registers the resolvers
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    conf = Path(__file__).resolve().parents[1] / "conf" / "hydra" / "launcher"
    assert OmegaConf.load(conf / "joblib.yaml").n_jobs == -1  # every core
    assert OmegaConf.load(conf / "submitit_local.yaml").gpus_per_node == 0
    assert OmegaConf.load(conf / "ray.yaml").ray.remote.num_gpus == 0
    assert OmegaConf.load(conf / "ray.yaml").ray.init.address is None  # Ray on this machine
    slurm = OmegaConf.load(conf / "submitit_slurm.yaml")
    assert slurm.gpus_per_task == 1 and slurm.timeout_min > 0 and slurm.cpus_per_task > 0 and slurm.mem_gb > 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert OmegaConf.load(conf / "joblib.yaml").n_jobs == 4  # one job per GPU
    assert OmegaConf.load(conf / "ray.yaml").ray.remote.num_gpus == 1
