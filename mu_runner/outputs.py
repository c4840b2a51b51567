"""The run directory (docs/design.md, Run directory): metrics.json last and atomically, so its presence means done."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from mu_runner.cache import atomic_save_file, atomic_write_bytes, atomic_write_json
from mu_runner.evaluation import EvaluationResult
from mu_runner.metrics.scoring import stratified_subset
from mu_runner.settings import method_node
from mu_runner.utils import crashpoint
from mu_runner.utils.loggers import finish_logger
from mu_runner.utils.redact import redact_obj

log = logging.getLogger("mu_runner")

KEYS = ("forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "mia_auc", "mia_loss_acc",
        "forget_score", "nomus")
TABLE_KEYS = ("forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "nomus", "avg_gap")


def assemble(stage, result: EvaluationResult) -> dict:
    """All metrics.json keys (README "metrics.json"): the unlearned model's scores, the original
    and retrain objects, gaps, the analyses, and what made the numbers (version, commit)."""
    cfg, split = stage.cfg, stage.split
    after = result.unlearned
    return {
        "method": _yaml_name(cfg),
        "method_config": OmegaConf.to_container(method_node(cfg), resolve=True),
        "method_choices": stage.module.choices(),  # e.g. the step a grid walk took
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "seed": int(cfg.seed),
        "forget_kind": cfg.forget.kind,
        "forget_classes": split.classes,
        "n_forget": len(split.forget),
        "n_retain": len(split.retain),
        **{k: after[k] for k in KEYS},
        **{k: v for k, v in after.items() if k.startswith("umia_")},
        "unlearn_seconds": stage.timer.seconds - _check_seconds(stage),
        "prep_seconds": stage.module.prep_seconds,  # one-off set-up (weight filters), not in unlearn_seconds
        "prep_cached": stage.module.prep_cached,  # True: prep_seconds was measured when the cache entry was made
        "eval_seconds_during_unlearning": _check_seconds(stage),
        "eval_seconds": result.seconds,
        "epochs_run": stage.trainer.current_epoch,
        "optimizer_steps": stage.trainer.global_step - stage.module.skipped_steps,
        **(stage.stopper.summary() if getattr(stage, "stopper", None) is not None else {}),
        "original": result.original,
        "original_near_chance": near_chance(result.original, stage.data.num_classes, split.classes)[0],
        "retrain": result.retrain,
        "avg_gap": after["avg_gap"],
        "acc_gap": after["acc_gap"],
        **result.analysis,
        "head_only_forgetting": head_only(after, result.analysis["probe_forget_acc"], result.retrain),
        "stage_sizes": getattr(stage, "stage_sizes", {}),  # feature-map size per stage; [1, 1]: report warns
        "cache_hits": stage.cache_hits,
        "eval_settings": OmegaConf.to_container(cfg.eval, resolve=True),
        **provenance(),
    }


def _check_seconds(stage) -> float:
    """Scoring inside the unlearning stage (epoch curves, the stopping rule): not unlearning time."""
    stopper = getattr(stage, "stopper", None)
    monitor = getattr(stage, "monitor", None)
    return (monitor.epoch_seconds if monitor is not None else 0.0) + (stopper.seconds if stopper is not None else 0.0)


def provenance() -> dict:
    """The package version and the git commit of the code that made the numbers ("+dirty" when
    the package's checkout had uncommitted changes; null outside a git checkout)."""
    import subprocess

    from mu_runner import __version__
    root = Path(__file__).resolve().parent.parent
    commit = None
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if head.returncode == 0:
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "mu_runner", "conf"],
                                   capture_output=True, text=True, timeout=10, check=False).stdout.strip()
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"mu_runner_version": __version__, "git_commit": commit}


def near_chance(original: dict, num_classes: int, classes: list[int] | None) -> tuple[bool | None, float]:
    """(is the original useless, the chance level): its test accuracy on the retained classes below
    1.5 x chance, at most chance + 0.1. Chance is 1 / (retained classes): what a network that always
    predicts one retained class scores there (an untrained one is close to that, or to 1/K below it).
    The threshold is 0.167 with 9 of 10 classes retained (one epoch of the tiny recipe on digits gives
    0.46) and 0.015 with 99 of 100; the cap keeps a binary task's weak but trained model (0.65) unflagged."""
    acc = (original or {}).get("test_acc")
    chance = 1.0 / max(1, num_classes - len(classes or []))
    if acc is None:
        return None, chance
    return bool(acc < min(1.5 * chance, chance + 0.1)), chance


def head_only(after: dict, probe: float | None, retrain: dict | None) -> bool | None:
    """Accuracy-level forgetting with intact features: forget_acc <= 0.1 (UA >= 0.9) while the probe
    on penultimate features still beats the retrained model's by more than 0.10 (docs/evaluation.md)."""
    if probe is None or retrain is None or retrain.get("probe_forget_acc") is None:
        return None
    return bool(after["forget_acc"] <= 0.1 and probe > retrain["probe_forget_acc"] + 0.10)


def write_outputs(stage, result: EvaluationResult, out: Path) -> dict:
    """The run directory's files from the evaluator's result; metrics.json last."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = assemble(stage, result)
    config = redact_obj(OmegaConf.to_container(stage.cfg, resolve=True))  # no credential (utils/redact.py)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(config).encode())
    atomic_write_json(out / "forget_split.json", stage.split.to_json())
    if stage.cfg.save_model:
        state = {k: v.detach().cpu().contiguous() for k, v in stage.module.net.state_dict().items()}
        atomic_save_file(out / "model.safetensors", state)
    try:
        from mu_runner.plots import run_plots
        run_plots(metrics, out)
        if hasattr(stage.module, "write_artifacts"):  # a method's own views (e.g. snu's Grad-CAM grid)
            stage.module.write_artifacts(out)
        if stage.cfg.eval.get("embedding", "none") == "tsne":
            write_embedding(stage, out)
    except Exception as err:  # noqa: BLE001 - a plot must never cost a finished run
        log.warning("plots skipped: %s", err)
    _log_images(stage, out)
    if result.per_example is not None:  # the per-example attack's scores, beside metrics.json
        atomic_write_json(out / "umia_scores.json", result.per_example)
    _log_summary(stage, metrics)
    if metrics["original_near_chance"]:
        log.warning("original is near chance: test accuracy %.3f (chance %.3f); every unlearning number below "
                    "compares untrained models", metrics["original"]["test_acc"],
                    near_chance(metrics["original"], stage.data.num_classes, stage.split.classes)[1])
    log.info("results\n%s", summary_table(metrics))  # in the run's log file too
    finish_logger(stage.trainer.logger)  # the logger's files are complete before the run counts as done
    crashpoint.pause_if("outputs")  # tests only: a kill with every file but metrics.json written
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence means finished
    return metrics


def write_embedding(stage, out: Path) -> Path:
    """embedding.png: t-SNE of the original's and the unlearned model's penultimate features on the
    same `eval.embedding_samples` stratified test images."""
    from mu_runner.evaluation.features import penultimate_features
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
    """Every PNG of the run directory as an image of the logger (W&B media, TensorBoard's Images tab)."""
    logger = stage.trainer.logger
    kind = type(logger).__name__
    for png in sorted(out.glob("*.png")):
        if kind == "WandbLogger":
            logger.log_image(key=f"plots/{png.stem}", images=[str(png)], step=stage.trainer.global_step)
        elif kind == "TensorBoardLogger":  # its Images tab
            import numpy as np
            from PIL import Image
            image = np.asarray(Image.open(png).convert("RGB"))
            logger.experiment.add_image(f"plots/{png.stem}", image, stage.trainer.global_step, dataformats="HWC")


def _yaml_name(cfg) -> str:
    """`method=<name>`: Hydra's choice, else the method's module name (salun.py <-> salun.yaml)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return HydraConfig.get().runtime.choices["method"]
    except (ValueError, KeyError, ImportError):  # no Hydra run (tests, scripts): name from the module
        return cfg.method._target_.rsplit(".", 2)[-2]


def _log_summary(stage, metrics: dict) -> None:
    logger = stage.trainer.logger
    if logger is None:
        return
    scores = {f"{scope}/{k}": v for scope, d in (("original", metrics["original"]), ("retrain", metrics["retrain"]))
              for k, v in (d or {}).items() if isinstance(v, float)}
    scores.update({f"unlearned/{k}": metrics[k] for k in KEYS if isinstance(metrics[k], float)})
    scores.update({f"summary/{k}": metrics[k] for k in ("avg_gap", "acc_gap", "unlearn_seconds", "eval_seconds",
                                                         "weight_change", "probe_forget_acc")
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
    lines = [(f"{m['method']} on {m['data']}/{m['backbone']}, forget "
             f"{m['forget_classes'] if m['forget_classes'] is not None else str(m['n_forget']) + ' samples'}"
             f" (seed {m['seed']})"),
             f"{'model':<10} {'forget':>6} {'retain':>6} {'test':>6} {'t_fgt':>6} {'MIA':>6} {'NoMUS':>6} {'gap':>6}"]
    for name, s in rows:
        if s is None:
            lines.append(f"{name:<10} (reference=none)")
            continue
        lines.append(f"{name:<10} " + " ".join(_fmt(s.get(k)) for k in TABLE_KEYS))
    lines.append(f"unlearning took {m['unlearn_seconds']:.2f} s")
    if m.get("original_near_chance"):
        lines.append(f"WARNING: the original is near chance (test {m['original']['test_acc']:.3f}): "
                     "these numbers compare untrained models")
    return "\n".join(lines)
