"""Tuning a method against the retrained model, on validation data only (DeepUnlearn's protocol).

`experiment=tune method=<m>` turns a run into one Optuna trial (Hydra's Optuna sweeper proposes the
method's knobs from `conf/search/<m>.yaml`): the method runs on every tuning seed (`tune.seeds`, each
with its own forget-set draw, original and retrained reference from the cache) and the trial's value
is the mean over seeds of `tune.objective`, computed on the *validation* view of the run:

- forget: D_f (the forget set's training images);
- retain: D_r (at most `tune.retain_samples`, stratified);
- val: validation images of the retained classes (all validation images for sample forgetting);
- val_forget: validation images of the forgotten classes (class forgetting only).

The test split is never scored: the final table (`make results`, other seeds) is the only place it
is used. `acc_gap` (default) is the mean |unlearned - retrained| over those accuracies; `forget_gap`
uses only the forget sides. A trial whose method diverges scores `tune.diverged_value` (the worst
possible gap), so one bad proposal does not end the study. See docs/tuning/README.md.
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mu_runner.cache import atomic_write_json
from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.errors import ConfigError, DivergedError
from mu_runner.metrics.scoring import accuracy_on, stratified_subset

log = logging.getLogger("mu_runner")

OBJECTIVES = {
    "acc_gap": ("forget", "retain", "val", "val_forget"),
    "forget_gap": ("forget", "val_forget"),
}


def validation_views(data: InMemoryData, split: ForgetSplit, retain_samples: int = 1000,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Training-set indices of each view the objective scores (never a test image)."""
    labels = data.labels.cpu()
    retain = split.retain.cpu()
    retain = retain[stratified_subset(labels[retain], int(retain_samples), seed)]
    val = data.val.cpu()
    views = {"forget": split.forget.cpu(), "retain": retain}
    if split.classes:
        forgotten = torch.isin(labels[val], torch.tensor(split.classes))
        views.update(val=val[~forgotten], val_forget=val[forgotten])
    else:
        views["val"] = val
    return {k: v for k, v in views.items() if len(v)}


def validation_scores(net: nn.Module, data: InMemoryData, views: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: accuracy_on(net, data, idx) for name, idx in views.items()}


def objective(unlearned: dict[str, float], retrained: dict[str, float], kind: str) -> float:
    """Mean |unlearned - retrained| over the objective's views that this forget set has."""
    keys = [k for k in OBJECTIVES[kind] if k in unlearned and k in retrained]
    return statistics.fmean(abs(unlearned[k] - retrained[k]) for k in keys)


def search_space(cfg: DictConfig, trial) -> None:
    """Optuna sweeper hook (`hydra.sweeper.custom_search_space`): propose the method's knobs from
    the `search:` block of its yaml (keys relative to `method.`, values in the sweeper's syntax:
    `interval(a, b)`, `tag(log, interval(a, b))`, `range(a, b)`, `choice(x, y)`)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    space = cfg.method.get("search")
    if not space:
        raise ConfigError(f"method {cfg.hydra.runtime.choices.method} has no `search:` block: nothing to tune")
    distributions, fixed = create_params_from_overrides([f"method.{k}={v}" for k, v in space.items()])
    for name, distribution in distributions.items():
        trial._suggest(name, distribution)
    for name, value in fixed.items():
        trial.set_user_attr(name, value)


def check_tune(cfg: DictConfig) -> None:
    t = cfg.tune
    if t.get("objective") not in OBJECTIVES:
        raise ConfigError(f"tune.objective={t.get('objective')!r}: allowed {', '.join(OBJECTIVES)}")
    seeds = t.get("seeds")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"tune.seeds={seeds!r}: allowed a non-empty list of integer seeds")
    if cfg.reference != "retrain":
        raise ConfigError(f"tune needs the retrained model: reference={cfg.reference} (set reference=retrain)")
    if (cfg.eval.get("umia") or "none") != "none":
        raise ConfigError("tune with eval.umia: the per-example attack scores test images; tuning never does")


def tune(cfg: DictConfig) -> float:
    """One trial: the method on every tuning seed; returns the mean objective (lower is better)."""
    from mu_runner.run import build  # heavy imports after Hydra has parsed the command line
    from mu_runner.validate import validate

    validate(cfg)  # the whole config once (check_tune included), before the first seed's work
    t = cfg.tune
    out = Path(cfg.paths.output_dir)
    done = out / "tune.json"
    if done.exists():  # a finished trial (same overrides, same directory): its value stands
        return float(json.loads(done.read_text())["value"])
    per_seed = []
    for seed in t.seeds:
        job = copy.deepcopy(cfg)
        job.seed = int(seed)
        job.paths.output_dir = str(out / f"seed={seed}")
        try:
            stage = build(job)
            stage.fit()
        except DivergedError as err:
            log.warning("tune: seed %s diverged (%s): value %s", seed, err, t.diverged_value)
            per_seed.append({"seed": int(seed), "value": float(t.diverged_value), "diverged": str(err)})
            continue
        views = validation_views(stage.data, stage.split, t.retain_samples, int(seed))
        u = validation_scores(stage.module.net, stage.data, views)
        r = validation_scores(stage.reference, stage.data, views)
        value = objective(u, r, t.objective)
        per_seed.append({"seed": int(seed), "value": value, "unlearned": u, "retrained": r,
                         "forget_classes": stage.split.classes, "epochs_run": stage.trainer.current_epoch})
        log.info("tune: seed %s %s = %.4f", seed, t.objective, value)
    value = statistics.fmean(p["value"] for p in per_seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, {"objective": t.objective, "value": value, "per_seed": per_seed,
                             "method_config": OmegaConf.to_container(cfg.method, resolve=True)})
    return value
