"""Experiment loggers from `cfg.logger`; W&B runs are always finished, so one failed job of a
multirun cannot spoil the next."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def sweep_group() -> str | None:
    """The sweep directory's name when running under a Hydra multirun, else None."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


def build_logger(cfg: DictConfig):
    """None for `logger=none`; W&B gets the sweep as group and the method as job_type."""
    node = cfg.get("logger")
    if not node or "_target_" not in node:
        return None
    kwargs = {}
    if node._target_.endswith("WandbLogger"):
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        method = node.get("job_type") or cfg.method._target_.rsplit(".", 2)[-2]  # salun.py -> salun
        kwargs = {"group": node.get("group") or sweep_group(), "job_type": method}
    logger = instantiate(node, **kwargs)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


def finish_logger(logger) -> None:
    if logger is not None and type(logger).__name__ == "WandbLogger":
        import wandb
        wandb.finish()
