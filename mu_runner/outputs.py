"""The run directory (DESIGN §3): metrics.json last and atomically, so its presence means done."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mu_runner.cache import atomic_write_bytes, atomic_write_json
from mu_runner.metrics import functional as MF
from mu_runner.metrics.suite import evaluate, feature_shift, probe_forget_acc, shift_subsets, stratified_subset

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
    analysis = analyse(stage, stages, before_w, after_w)
    for scores, model in ((original, stage.original), (retrain, stage.reference)):
        if scores is not None:
            scores["probe_forget_acc"] = probe_forget_acc(model, stage.data, split.classes, cfg.seed,
                                                          cfg.eval.get("probe_samples"))
    return {
        "method": _yaml_name(cfg),
        "method_config": OmegaConf.to_container(cfg.method, resolve=True),
        "method_choices": stage.module.choices(),  # e.g. the step a grid walk took
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
        "optimizer_steps": stage.trainer.global_step - stage.module.skipped_steps,
        "original": original,
        "retrain": retrain,
        "avg_gap": MF.avg_gap(after, retrain),
        "layer_change": MF.grouped_change(before_w, after_w, net.stage_of),
        "layer_change_params": MF.relative_change(before_w, after_w),
        "feature_shift": {s.removeprefix("body."): v for s, v in shift.items()},
        **analysis,
        "head_only_forgetting": head_only(after, analysis["probe_forget_acc"], retrain),
        "cache_hits": stage.cache_hits,
    }


def analyse(stage, stages: list[str], before: dict, after: dict) -> dict:
    """How the network changed (issue: the removed-classes study): total weight change, feature
    shift on forget and on retain samples (and to the retrained model), the forget-class probe."""
    cfg, split, net, data = stage.cfg, stage.split, stage.module.net, stage.data
    subsets = shift_subsets(data, split, int(cfg.eval.feature_samples), cfg.seed)
    out = {"weight_change": MF.total_change(before, after)}
    for name, images in subsets.items():
        shift = feature_shift(stage.original, net, stages, images) if len(images) > 1 else {}
        out[f"feature_shift_{name}"] = {s.removeprefix("body."): v for s, v in shift.items()} or None
    to_retrain = None
    if stage.reference is not None:
        images = torch.cat(list(subsets.values()))
        to_retrain = {s.removeprefix("body."): v for s, v in feature_shift(stage.reference, net, stages, images).items()}
    out["feature_shift_to_retrain"] = to_retrain
    out["probe_forget_acc"] = probe_forget_acc(net, data, split.classes, cfg.seed, cfg.eval.get("probe_samples"))
    return out


def head_only(after: dict, probe: float | None, retrain: dict | None) -> bool | None:
    """Accuracy-level forgetting with intact features: forget_acc <= 0.1 (UA >= 0.9) while the probe
    on penultimate features still beats the retrained model's by more than 0.10 (METHODS.md)."""
    if probe is None or retrain is None or retrain.get("probe_forget_acc") is None:
        return None
    return bool(after["forget_acc"] <= 0.1 and probe > retrain["probe_forget_acc"] + 0.10)


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
        if stage.cfg.eval.get("embedding", "none") == "tsne":
            write_embedding(stage, out)
    except Exception as err:  # a plot must never cost a finished run
        log.warning("plots skipped: %s", err)
    _log_images(stage, out)
    _log_summary(stage, metrics)
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence means finished
    print(summary_table(metrics))
    return metrics


def write_embedding(stage, out: Path) -> Path:
    """embedding.png: t-SNE of the original's and the unlearned model's penultimate features on the
    same `eval.embedding_samples` stratified test images."""
    from mu_runner.metrics.suite import penultimate_features
    from mu_runner.plots import embedding_plot

    cfg, data = stage.cfg, stage.data
    labels = data.test_labels.cpu()
    idx = stratified_subset(labels, int(cfg.eval.embedding_samples), cfg.seed)
    images = data.test_images[idx.to(data.test_images.device)]
    before = penultimate_features(stage.original, images)
    after = penultimate_features(stage.module.net, images)
    return embedding_plot(before.numpy(), after.numpy(), labels[idx].numpy(), stage.split.classes, out, cfg.seed,
                          title=f"{_yaml_name(cfg)}, forget {stage.split.classes or f'{len(stage.split.forget)} samples'}")


def _log_images(stage, out: Path) -> None:
    """W&B: every PNG of the run directory as an image (other loggers have no image panel)."""
    logger = stage.trainer.logger
    if logger is None or type(logger).__name__ != "WandbLogger":
        return
    for png in sorted(out.glob("*.png")):
        logger.log_image(key=f"plots/{png.stem}", images=[str(png)], step=stage.trainer.global_step)


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
    scores.update({f"summary/{k}": metrics[k] for k in ("avg_gap", "unlearn_seconds", "weight_change", "probe_forget_acc")
                   if metrics[k] is not None})
    for key in ("layer_change", "feature_shift", "feature_shift_forget", "feature_shift_retain"):
        scores.update({f"{key}/{name}": v for name, v in (metrics[key] or {}).items()})
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
