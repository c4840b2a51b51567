"""Experiment loggers from `cfg.logger`; W&B runs are always finished, so one failed job of a
multirun cannot spoil the next."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from omegaconf import DictConfig, OmegaConf

from mu_runner.errors import ConfigError
from mu_runner.utils.redact import redact_obj


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger without the `anonymous=None` it always passes to `wandb.init`, which
    makes W&B print "The anonymous setting has no effect" on every run."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous", 0) is None:
            del self._wandb_init["anonymous"]


def _method_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("method"):
        return HydraConfig.get().runtime.choices["method"]
    return cfg.method._target_.rsplit(".", 2)[-2]  # salun.py -> salun


def run_name(cfg: DictConfig) -> str:
    """`salun-classes[4]-s0`, `finetune-random10%-s1`, `ssd-classes-k3-s2`: method, forget set, seed."""
    f = cfg.forget
    if f.kind == "classes":
        what = f"classes{list(f.classes)}" if f.get("classes") is not None else f"classes-k{f.k or 1}" if not f.get(
            "fraction") else f"classes{round(100 * f.fraction)}%"
    elif f.kind == "random":
        what = f"random-n{f.k}" if f.get("k") else f"random{round(100 * (f.fraction or 0.1))}%"
    else:
        what = f.kind
    return f"{_method_name(cfg)}-{what}-s{cfg.seed}".replace(" ", "")


def run_tags(cfg: DictConfig) -> list[str]:
    """Filterable tags: method, data, backbone, forget kind, and the experiment when there is one."""
    tags = [_method_name(cfg), cfg.data.name, cfg.backbone.name, f"forget={cfg.forget.kind}"]
    if HydraConfig.initialized() and HydraConfig.get().runtime.choices.get("experiment"):
        tags.append(f"experiment={HydraConfig.get().runtime.choices['experiment']}")
    return tags


def _netrc_key() -> str | None:
    """The API key `wandb login` stored in ~/.netrc (or $NETRC) for the W&B host."""
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def check_logger(cfg: DictConfig) -> None:
    """Before any training: W&B online needs an API key (one line, not a traceback after both trainings)."""
    node = cfg.get("logger")
    if not node or "_target_" not in node or not node._target_.endswith("WandbLogger"):
        return
    if str(node.get("mode")) != "online":
        return
    key = os.environ.get("WANDB_API_KEY") or _netrc_key()
    if not key:
        raise ConfigError("logger=wandb with WANDB_MODE=online needs a W&B API key: run `wandb login` or set "
                          "WANDB_API_KEY (or use WANDB_MODE=offline and `wandb sync` later)")


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
        kwargs = {"group": node.get("group") or sweep_group(), "job_type": node.get("job_type") or _method_name(cfg),
                  "name": node.get("name") or run_name(cfg), "tags": list(node.get("tags") or run_tags(cfg))}
    plain = OmegaConf.to_container(node, resolve=True)
    if redact_obj(plain) != plain:  # a credential in a logger setting (W&B notes, group) never reaches its files
        node = OmegaConf.create(redact_obj(plain))
    logger = instantiate(node, **redact_obj(kwargs))
    logger.log_hyperparams(redact_obj(OmegaConf.to_container(cfg, resolve=True)))  # no credential in its config
    return logger


def finish_logger(logger) -> None:
    if logger is not None and type(logger).__name__ == "WandbLogger":
        import wandb
        wandb.finish()
