"""One GPU per job of a parallel sweep (docs/design.md, Running at scale).

Launchers that give each job its own GPU (submitit_slurm's `gpus_per_task`, Ray's `num_gpus`) make
it the only one the job's process sees. Where a job's process sees several (joblib's workers,
submitit_local, the basic launcher), `assign_job_gpu` picks GPU `hydra.job.num mod count` for a
job whose trainer asks for one device (`trainer.devices=1`, the default): its Trainer gets
`devices=[that GPU]` and it becomes the process's current CUDA device. Jobs 0..count-1 of a sweep
then run on different GPUs; with more parallel jobs than GPUs, GPUs are shared round robin. A job
with `trainer.devices` set otherwise (a list, several, DDP) is left as configured.

The resolvers for the launcher presets (conf/hydra/launcher/*.yaml), registered on import:
`${visible_gpus:}` (their count, 0 without CUDA), `${gpus_per_job:}` (1 where GPUs are visible, else
0) and `${parallel_jobs:}` (the GPU count, or -1, every CPU core, without GPUs). Kept free of heavy
imports: torch is imported only when one of them is resolved.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("mu_runner")


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA). `torch.cuda.device_count()` does not
    initialise CUDA, so a launcher's process can ask before it starts the jobs."""
    import torch
    return int(torch.cuda.device_count())


def gpus_per_job() -> int:
    return 1 if visible_gpus() > 0 else 0


def parallel_jobs() -> int:
    return visible_gpus() or -1


OmegaConf.register_new_resolver("visible_gpus", visible_gpus, replace=True)
OmegaConf.register_new_resolver("gpus_per_job", gpus_per_job, replace=True)
OmegaConf.register_new_resolver("parallel_jobs", parallel_jobs, replace=True)


def job_gpu(job_num: int, count: int) -> int:
    return int(job_num) % int(count)


def assign_job_gpu(cfg: DictConfig) -> int | None:
    """In a multirun: the GPU this job takes (module docstring), or None where nothing is changed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    trainer = cfg.get("trainer") or {}
    if trainer.get("devices", 1) not in (1, "1") or str(trainer.get("accelerator", "auto")) not in ("auto", "gpu", "cuda"):
        return None
    if str(trainer.get("strategy", "auto")) not in ("auto", "single_device"):
        return None
    count = visible_gpus()
    if count < 2:
        return None
    num = HydraConfig.get().job.get("num")
    if num is None:
        return None
    gpu = job_gpu(num, count)
    with open_dict(cfg):
        cfg.trainer.devices = [gpu]
    import torch
    torch.cuda.set_device(gpu)
    log.info("job %s: GPU %d of the %d visible (hydra.job.num mod %d)", num, gpu, count, count)
    return gpu
