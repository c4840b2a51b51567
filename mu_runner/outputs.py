"""The run directory (DESIGN §3): metrics.json last and atomically, so its presence means done."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from mu_runner.cache import atomic_write_bytes, atomic_write_json
from mu_runner.metrics import functional as MF
from mu_runner.metrics.suite import evaluate, feature_shift, stratified_subset

log = logging.getLogger("mu_runner")

KEYS = ("forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "mia_loss_acc", "forget_score",
        "nomus")
TABLE_KEYS = ("forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "nomus", "avg_gap")


def assemble(stage) -> dict:
    """All metrics.json keys: the unlearned model's scores, original and retrain objects, gaps."""
    cfg, split, net = stage.cfg, stage.split, stage.module.net
    original = {**stage.evaluation.before}
    after = stage.evaluation.after
    retrain = None
    if stage.reference is not None:
        retrain = evaluate(stage.reference.to(stage.data.device), stage.data, split, cfg.seed, cfg.eval.mia)
    for scores in (original, retrain):
        if scores is not None:
            scores["avg_gap"] = MF.avg_gap(scores, retrain)
    before_w = {n: p.detach().cpu() for n, p in stage.original.named_parameters()}
    after_w = {n: p.detach().cpu() for n, p in net.named_parameters()}
    idx = stratified_subset(stage.data.test_labels.cpu(), int(cfg.eval.feature_samples), cfg.seed)
    images = stage.data.test_images[idx.to(stage.data.test_images.device)]
    stages = [f"body.{s}" for s in net.stage_names]
    shift = feature_shift(stage.original.to(stage.data.device), net, stages, images)
    return {
        "method": _yaml_name(cfg),
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "seed": int(cfg.seed),
        "forget_kind": cfg.forget.kind,
        "forget_classes": split.classes,
        "n_forget": len(split.forget),
        "n_retain": len(split.retain),
        **{k: after[k] for k in KEYS},
        "unlearn_seconds": stage.timer.seconds - stage.evaluation.epoch_seconds,
        "prep_seconds": stage.module.prep_seconds,  # one-off set-up (weight filters), not in unlearn_seconds
        "prep_cached": stage.module.prep_cached,  # True: prep_seconds was measured when the cache entry was made
        "eval_seconds_during_unlearning": stage.evaluation.epoch_seconds,
        "epochs_run": stage.trainer.current_epoch,
        "optimizer_steps": stage.trainer.global_step,
        "original": original,
        "retrain": retrain,
        "avg_gap": MF.avg_gap(after, retrain),
        "layer_change": MF.grouped_change(before_w, after_w, net.stage_of),
        "layer_change_params": MF.relative_change(before_w, after_w),
        "feature_shift": {s.removeprefix("body."): v for s, v in shift.items()},
        "cache_hits": stage.cache_hits,
    }


def write_outputs(stage, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    metrics = assemble(stage)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(stage.cfg, resolve=True).encode())
    atomic_write_json(out / "forget_split.json", stage.split.to_json())
    if stage.cfg.save_model:
        state = {k: v.detach().cpu().contiguous() for k, v in stage.module.net.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
    try:
        from mu_runner.plots import run_plots
        run_plots(metrics, out)
        if hasattr(stage.module, "write_artifacts"):  # a method's own views (e.g. snu's Grad-CAM grid)
            stage.module.write_artifacts(out)
    except Exception as err:  # a plot must never cost a finished run
        log.warning("plots skipped: %s", err)
    _log_summary(stage, metrics)
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence means finished
    print(summary_table(metrics))
    return metrics


def _yaml_name(cfg) -> str:
    """`method=<name>`: Hydra's choice, else the method's module name (salun.py <-> salun.yaml)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices["method"]
    except Exception:
        return cfg.method._target_.rsplit(".", 2)[-2]


def _log_summary(stage, metrics: dict) -> None:
    logger = stage.trainer.logger
    if logger is None:
        return
    scores = {f"retrain/{k}": v for k, v in (metrics["retrain"] or {}).items() if isinstance(v, float)}
    scores.update({f"summary/{k}": metrics[k] for k in ("avg_gap", "unlearn_seconds") if metrics[k] is not None})
    logger.log_metrics(scores, step=stage.trainer.global_step)
    logger.save()  # the trainer has finished: flush (CSV writes only on save)


def _fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def summary_table(m: dict) -> str:
    """A short table: original vs unlearned vs retrained."""
    rows = [("original", m["original"]), ("unlearned", m), ("retrained", m["retrain"])]
    lines = [f"{m['method']} on {m['data']}/{m['backbone']}, forget "
             f"{m['forget_classes'] if m['forget_classes'] is not None else str(m['n_forget']) + ' samples'}"
             f" (seed {m['seed']})",
             f"{'model':<10} {'forget':>6} {'retain':>6} {'test':>6} {'t_fgt':>6} {'MIA':>6} {'NoMUS':>6} {'gap':>6}"]
    for name, s in rows:
        if s is None:
            lines.append(f"{name:<10} (reference=none)")
            continue
        lines.append(f"{name:<10} " + " ".join(_fmt(s.get(k)) for k in TABLE_KEYS))
    lines.append(f"unlearning took {m['unlearn_seconds']:.2f} s")
    return "\n".join(lines)
