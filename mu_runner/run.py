"""One experiment: original (cached) -> forget split -> reference (cached) -> unlearning -> metrics.

`build(cfg)` prepares a `Stage` (for tests: fit it, inspect it); `run(cfg)` does the whole run,
writes the run directory (docs/design.md, Run directory) and returns flat, slash-named numbers.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mu_runner import ddp
from mu_runner.cache import Cache
from mu_runner.callbacks import instantiate_callbacks
from mu_runner.callbacks.divergence import DivergenceGuard
from mu_runner.callbacks.forget_target import ForgetTarget
from mu_runner.callbacks.progress import phase_bar
from mu_runner.callbacks.resume import EpochCheckpoint, partial_path, resumable
from mu_runner.callbacks.timing import UnlearnTimer
from mu_runner.callbacks.validation import EpochValidation
from mu_runner.checkpoints import read_checkpoint
from mu_runner.data import forget as F
from mu_runner.data.datamodule import InMemoryData, StageData, check_batch_sizes
from mu_runner.data.sources import resized
from mu_runner.errors import CheckpointError, ConfigError, MuRunnerError
from mu_runner.evaluation import EvaluationResult, Evaluator
from mu_runner.evaluation.evaluator import MIA_FEATURES
from mu_runner.methods.base import ARTIFACT_PREFIX, OriginalRecipe, UnlearningModule
from mu_runner.methods.supervised import SupervisedTraining
from mu_runner.models import Classifier, one_by_one, stage_sizes
from mu_runner.outputs import write_outputs
from mu_runner.settings import method_node
from mu_runner.utils import crashpoint
from mu_runner.utils.loggers import build_logger, finish_logger

log = logging.getLogger("mu_runner")


@dataclass
class Stage:
    """Everything one unlearning run needs, ready to `fit()`."""

    cfg: DictConfig
    data: InMemoryData
    split: F.ForgetSplit
    original: Classifier
    reference: Classifier | None
    module: UnlearningModule
    trainer: L.Trainer
    datamodule: StageData
    timer: UnlearnTimer
    monitor: EpochValidation | None  # None when the group drops it (~callbacks.epoch_validation)
    evaluator: Evaluator
    cache_hits: dict[str, bool] = field(default_factory=dict)
    umia: object | None = None  # the per-example attack (eval.umia), its shadows ready
    stopper: ForgetTarget | None = None  # callbacks.forget_target: stopping at equal forgetting
    stage_sizes: dict = field(default_factory=dict)  # stage -> [h, w] of its feature map
    launch: ddp.Launch = field(default_factory=ddp.Launch)  # processes of the unlearning stage (trainer=ddp)

    def fit(self) -> None:
        L.seed_everything(self.cfg.seed, workers=False, verbose=False)
        with ddp.local_ranks(self.cfg, self.launch, self.trainer):  # trainer=ddp: rank 0 starts the others
            self.trainer.fit(self.module, datamodule=self.datamodule)

    def evaluate(self) -> EvaluationResult:
        """Original, unlearned and retrained model scored by the one evaluator, plus analyses."""
        return self.evaluator.evaluate(self.original, self.module.net, self.reference, self.umia)


def load_data(cfg: DictConfig) -> InMemoryData:
    source = make(cfg.data.source, "data")
    size = cfg.data.get("image_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"data.image_size={size!r}: allowed null (the data's own size) or an integer >= 1")
        source = resized(source, size)
    spec = forget_spec(cfg)
    keep = spec.ids(len(source.train)) if isinstance(spec, F.ForgetIndices) else None
    return InMemoryData(source, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.augment, keep)


def forget_spec(cfg: DictConfig):
    """The `forget` group's object (conf/forget/*.yaml `_target_`, e.g. data.forget.ForgetClasses)."""
    if "_target_" not in cfg.forget:
        raise ConfigError(f"forget: no _target_ (kind={cfg.forget.get('kind')!r}); choose forget=classes|random|indices")
    return make(cfg.forget, "forget")


def make_split(cfg: DictConfig, data: InMemoryData) -> F.ForgetSplit:
    """The forget set of `cfg.forget`, validated against the data (raises ConfigError)."""
    return forget_spec(cfg).split(data)


def new_net(cfg: DictConfig, data: InMemoryData) -> Classifier:
    """A fresh backbone; its initialisation depends on `seed` only (the retrain starts here too)."""
    c, h, _ = data.source.shape
    mean, std = data.mean_std()
    torch.manual_seed(int(cfg.seed))
    return make(cfg.backbone, "backbone", num_classes=data.num_classes, in_chans=c, img_size=h, mean=mean, std=std)


# Trainer knobs that change what a training computes. A cache entry is keyed by its recipe (`train`,
# data, backbone, seed, precision), so the trainings that make cache entries run with Lightning's
# defaults for these: `trainer.max_steps=6` limits the unlearning stage, never a cached original.
CACHE_TRAINING_FIXED = {"max_steps": -1, "min_steps": None, "max_time": None, "limit_train_batches": None,
                        "overfit_batches": 0.0, "accumulate_grad_batches": 1, "gradient_clip_val": None}


def _trainer(cfg: DictConfig, epochs: int, phase: str = "train", single: bool = False, **kwargs) -> L.Trainer:
    """The configured Trainer; its progress bar (if enabled) is labelled with the phase.

    `single`: a training that makes a cache entry: one device, no process group (mu_runner/ddp.py),
    and none of the trainer's limits (CACHE_TRAINING_FIXED).
    """
    if single:
        kwargs = {**CACHE_TRAINING_FIXED, **ddp.single_device(cfg.trainer), **kwargs}
    if cfg.trainer.get("enable_progress_bar", True):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), phase_bar(phase)]
    if crashpoint.requested() == phase:  # tests only: a kill in the middle of this training
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), crashpoint.PausePoint(phase)]
    return instantiate(cfg.trainer, max_epochs=epochs, **kwargs)


_RATE: list[float] = []  # seconds per training image-epoch, measured by the last fit_supervised


class _LossCurve(L.Callback):
    """The training loss of every step, for the run's logger once the training is over."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss))


def fit_supervised(cfg: DictConfig, data: InMemoryData, retain: torch.Tensor, net: Classifier,
                   recipe: OriginalRecipe | None = None, phase: str = "train", logger=None,
                   checkpoint: Path | None = None) -> dict:
    """Train `net` with the recipe `cfg.train` on `retain`; returns its state dict.

    A method's own `recipe` (e.g. mnemonic codes mixed in) swaps the training module; what that
    module keeps with the model (`artifacts()`) joins the state under ARTIFACT_PREFIX. With a
    `checkpoint` path the training saves its state there every `checkpoint.every_n_epochs` epochs
    and resumes from it when it exists (callbacks/resume.py).
    """
    t = cfg.train
    args = (net, instantiate(t.optimizer), instantiate(t.scheduler) if t.scheduler else None,
            t.epochs, t.batch_size, cfg.seed)
    module = SupervisedTraining(*args) if recipe is None else recipe.training(*args, data=data)
    module.phase, module.lr_key = phase, "train.optimizer.lr"  # a DivergedError names the training
    dm = StageData(data, F.ForgetSplit(retain[:0], retain, None), cfg.seed)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    start, work = time.perf_counter(), t.epochs * len(retain)
    eta = f", about {_RATE[0] * work:.0f} s" if _RATE else ""
    log.info("%s: training %d epochs on %d images (train=%s)%s", phase, t.epochs, len(retain),
             _choice("train") or "custom", eta)
    curve = _LossCurve()
    callbacks: list = [DivergenceGuard(), curve]
    every = int(cfg.get("checkpoint", {}).get("every_n_epochs", 0) or 0)
    if checkpoint is not None and every > 0:
        callbacks.append(EpochCheckpoint(checkpoint, every))
    resume = resumable(checkpoint, phase) if every > 0 else None
    _trainer(cfg, t.epochs, phase, single=True, logger=False, callbacks=callbacks).fit(
        module, datamodule=dm, ckpt_path=resume, weights_only=True if resume else None)
    seconds = time.perf_counter() - start
    if logger:  # the run's logger gets this training's curve as <phase>/train/loss (W&B, CSV, TensorBoard)
        for step, loss in enumerate(curve.losses):
            logger.log_metrics({f"{phase}/train/loss": loss}, step=step)
    _RATE[:] = [seconds / max(1, work)]  # the estimate for the next training of this process
    log.info("%s: trained in %.1f s", phase, seconds)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if recipe is not None:
        state.update({ARTIFACT_PREFIX + k: v.detach().cpu() for k, v in module.artifacts().items()})
    return state


def _recipe_spec(cfg: DictConfig) -> dict:
    """Exactly what determines a trained model: data, backbone, recipe, seed, precision."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for k in ("root", "download", "trust_files"):  # where and how files are read, not what they hold
        data["source"].pop(k, None)
        data.pop(k, None)
    return {"data": data, "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
            "train": OmegaConf.to_container(cfg.train, resolve=True), "seed": int(cfg.seed),
            "precision": str(cfg.trainer.get("precision"))}


def load_weights(net: Classifier, state: dict, where: str) -> Classifier:
    """Strict load: a checkpoint that does not fit the backbone is a clear error, not a warning."""
    state = {**{k: v for k, v in net.state_dict().items() if k in ("mean", "std")}, **state}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{where} does not fit the backbone: {first[0].strip()}") from None
    return net


def get_original(cfg: DictConfig, data: InMemoryData, cache: Cache,
                 method_cls: type[UnlearningModule] | None = None, logger=None) -> tuple[Classifier, bool]:
    """The original, cached; a method with its own `original_recipe` gets its own cache entry.

    Tensors stored next to the weights (ARTIFACT_PREFIX, e.g. mnemonic codes) are stripped before
    the strict load and handed over as `original.artifacts` (empty for the plain original).
    """
    net = new_net(cfg, data)
    recipe = method_cls.original_recipe(cfg.method) if method_cls is not None else None
    if cfg.original_checkpoint:
        path = str(cfg.original_checkpoint)
        state, hit, where = read_checkpoint(path), True, f"original_checkpoint={path!r}"
    else:
        spec = {"kind": "original", **_recipe_spec(cfg), **({"method_recipe": recipe.key} if recipe else {})}
        partial = partial_path(cache.path("original", spec))
        state, hit = cache.get_or_create("original", spec, lambda: fit_supervised(
            cfg, data, data.pool, new_net(cfg, data), **({"recipe": recipe} if recipe else {}), phase="original",
            logger=logger, checkpoint=partial), check=lambda s: _fits(net, s))
        partial.unlink(missing_ok=True)  # the finished entry replaces the training's checkpoint
        where = f"cache entry {cache.path('original', spec)}"
        if hit:
            log.info("original: from the cache (%s)", cache.path("original", spec))
    net.artifacts = {k.removeprefix(ARTIFACT_PREFIX): v for k, v in state.items() if k.startswith(ARTIFACT_PREFIX)}
    return load_weights(net, {k: v for k, v in state.items() if not k.startswith(ARTIFACT_PREFIX)}, where), hit


def get_reference(cfg: DictConfig, data: InMemoryData, split: F.ForgetSplit, cache: Cache,
                  logger=None) -> tuple[Classifier, bool]:
    spec = {"kind": "retrain", **_recipe_spec(cfg), "forget": split.fingerprint()}
    partial = partial_path(cache.path("retrain", spec))
    state, hit = cache.get_or_create("retrain", spec, lambda: fit_supervised(
        cfg, data, split.retain, new_net(cfg, data), phase="reference", logger=logger, checkpoint=partial),
        check=lambda s: _fits(new_net(cfg, data), s))
    partial.unlink(missing_ok=True)  # the finished entry replaces the training's checkpoint
    if hit:
        log.info("reference: from the cache (%s)", cache.path("retrain", spec))
    return load_weights(new_net(cfg, data), state, f"cache entry {cache.path('retrain', spec)}"), hit


def _fits(net: Classifier, state: dict) -> None:
    """A cache entry that does not fit the backbone (CheckpointError) is rebuilt, not a failed run."""
    load_weights(net, {k: v for k, v in state.items() if not k.startswith(ARTIFACT_PREFIX)}, "it")


def build(cfg: DictConfig) -> Stage:
    """Everything before the unlearning step; bad input fails here, before any training."""
    from mu_runner.validate import check_network, validate
    validate(cfg)  # every problem of the config at once (one line each), before any work
    data = load_data(cfg)
    split = make_split(cfg, data)
    sizes = stage_sizes(new_net(cfg, data), data.source.shape)  # one sample, before any training
    check_network(cfg, data)  # layer names etc. against an untrained backbone
    if one_by_one(sizes):
        log.warning("stages %s see 1x1 feature maps at %dx%d input (3x3 kernels there see mostly padding); "
                    "a larger data.image_size avoids it", ", ".join(one_by_one(sizes)), *data.source.shape[1:])
    evaluator = Evaluator(data, split, cfg.eval, cfg.seed)
    launch = ddp.plan(cfg.trainer)  # trainer=ddp: the unlearning stage's processes (cache trainings: one device)
    cache = Cache(cfg.paths.cache_dir)
    logger = build_logger(cfg) or False  # before the trainings, so that it gets their curves
    try:
        original, hit_o = get_original(cfg, data, cache, _target_class(cfg.method), logger)
        reference, hit_r = (None, None)
        if cfg.reference == "retrain":
            reference, hit_r = get_reference(cfg, data, split, cache, logger)
        method_cls = _target_class(cfg.method)
        net = new_net(cfg, data) if method_cls.from_scratch else copy.deepcopy(original)
        module = make_method(cfg, net=net)
        check_batch_sizes(StageData(data, split, cfg.seed).batch_sizes(module.data_plan()),  # global batch
                          launch.world_size)  # sizes split among the ranks
        prepare_method(cfg, module, original, data, cache)  # one-off, cached: outside unlearn_seconds
        timer = UnlearnTimer()
        configured = instantiate_callbacks(cfg.callbacks, data=data, split=split, reference=reference,
                                           seed=int(cfg.seed), min_epochs=module.target_min_epochs)
        callbacks: list = [DivergenceGuard(), timer, *configured, *ddp.callbacks(launch)]  # the guard first: no
        # rule judges a diverged model; DDP: a stop on one rank stops all (last)
        monitor = next((c for c in configured if isinstance(c, EpochValidation)), None)
        stopper = next((c for c in configured if isinstance(c, ForgetTarget)), None)
        epochs = module.epochs
        if stopper is not None:
            epochs = int(cfg.callbacks.get("max_epochs") or epochs)
        umia, hits = build_umia(cfg, data, split, cache)  # shadows cached before the stage's processes start
        trainer = _trainer(cfg, epochs, _choice("method") or module.name, logger=logger, callbacks=callbacks,
                           **ddp.plugins(launch))
    except BaseException:
        finish_logger(logger)  # a W&B run is never left open by a failed build
        raise
    return Stage(cfg, data, split, original, reference, module, trainer, StageData(data, split, cfg.seed),
                 timer, monitor, evaluator, {"original": hit_o, "retrain": hit_r, **hits}, umia, stopper, sizes,
                 launch)


def check_callbacks(cfg: DictConfig) -> None:
    """The `callbacks` group's values, before any work."""
    cb = cfg.callbacks
    target = cb.get("forget_target")
    bad_number = isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target <= 1
    if target is not None and target != "retrain" and bad_number:
        raise ConfigError(f"callbacks.forget_target={target!r}: allowed null, retrain or an accuracy in [0, 1]")
    if target == "retrain" and cfg.reference != "retrain":
        raise ConfigError(f"callbacks.forget_target=retrain needs the retrained model: reference={cfg.reference} "
                          "(set reference=retrain)")
    cap = cb.get("max_epochs")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ConfigError(f"callbacks.max_epochs={cap!r}: allowed null (the method's epochs) or an integer >= 1")
    every = cb.get("target_every_n_steps", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"callbacks.target_every_n_steps={every!r}: allowed 0 (epoch ends only) or an integer >= 1")


def build_umia(cfg: DictConfig, data: InMemoryData, split: F.ForgetSplit, cache: Cache) -> tuple[object, dict]:
    """`eval.umia=lira`: the per-example attack with its shadow models (cached like originals)."""
    kind = cfg.eval.get("umia") or "none"
    if kind == "none":
        return None, {}
    from mu_runner.evaluation.lira import LiRA
    settings = cfg.eval.lira

    def fit(s: int, ids: torch.Tensor, universe: InMemoryData) -> Classifier:
        shadow_cfg = copy.deepcopy(cfg)
        shadow_cfg.seed = 1_000_003 * (int(settings.seed) + 1) + s  # own initialisation and batch order
        net = new_net(shadow_cfg, data)  # the target's normalisation (statistics of the pool)
        fit_supervised(shadow_cfg, universe, ids, net)
        return net

    lira, hits = LiRA.build(data, split, int(settings.shadows), int(settings.seed), cache, _recipe_spec(cfg), fit)
    return lira, {"shadows": sum(hits) == len(hits)}


def prepare_method(cfg: DictConfig, module: UnlearningModule, original: Classifier, data: InMemoryData,
                   cache: Cache) -> None:
    """The method's one-off set-up (`UnlearningModule.prepare`), before the unlearning timer.

    Its cache spec is what determines the original (recipe, or the checkpoint's bytes), never the
    forget set, so every forget set reuses one artifact; `fit` trains on the whole pool.
    """
    if type(module).prepare is UnlearningModule.prepare:
        return
    spec = _recipe_spec(cfg)
    if cfg.original_checkpoint:
        import hashlib
        spec["original_checkpoint"] = hashlib.sha256(Path(str(cfg.original_checkpoint)).read_bytes()).hexdigest()

    def fit(lit: L.LightningModule, epochs: int) -> None:
        dm = StageData(data, F.ForgetSplit(data.pool[:0], data.pool, None), cfg.seed)
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        _trainer(cfg, epochs, "preparation", single=True, logger=False, callbacks=[]).fit(lit, datamodule=dm)

    view = StageData(data, None, cfg.seed).attach(module.data_plan(), module.who)  # no forget set: shared by all
    module.prepare(cache, spec, original, view, fit)


UMIA = ("none", "lira")
EMBEDDINGS = ("tsne", "none")


def check_eval(cfg: DictConfig) -> None:
    """The `eval` group's choices, before any work."""
    ev = cfg.eval
    if ev.get("mia", "confidence") not in MIA_FEATURES:
        raise ConfigError(f"eval.mia={ev.mia!r}: allowed {', '.join(MIA_FEATURES)}")
    if (ev.get("umia") or "none") not in UMIA:
        raise ConfigError(f"eval.umia={ev.umia!r}: allowed {', '.join(UMIA)}")
    if (ev.get("embedding") or "none") not in EMBEDDINGS:
        raise ConfigError(f"eval.embedding={ev.embedding!r}: allowed {', '.join(EMBEDDINGS)}")
    if not isinstance(ev.get("mia_draws", 0), int) or ev.get("mia_draws", 0) < 0:
        raise ConfigError(f"eval.mia_draws={ev.mia_draws!r}: allowed 0 (all samples, balanced) or a number of draws >= 1")
    if (ev.get("umia") or "none") == "lira":
        s = ev.lira.shadows
        if not isinstance(s, int) or isinstance(s, bool) or s < 2:
            raise ConfigError(f"eval.lira.shadows={s!r}: allowed an integer >= 2 (every example needs IN and OUT shadows)")


def check_forget_kind(cfg: DictConfig) -> None:
    """A class-level method (mnemonic codes, weight filters) refuses sample forgetting up front."""
    kinds = _target_class(cfg.method).forget_kinds
    if cfg.forget.kind not in kinds:
        raise ConfigError(f"forget={cfg.forget.kind}: method {_target_class(cfg.method).__name__} handles "
                          f"forget={'|'.join(kinds)} only")


def _choice(group: str) -> str | None:
    """The group's option name in this Hydra run (e.g. method -> salun), None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def make(node: DictConfig, what: str, **kwargs):
    """`instantiate(node)`; a MuRunnerError inside surfaces as itself, not wrapped by Hydra."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MuRunnerError):
            raise cause from None
        raise ConfigError(f"{what}={node.get('_target_')}: {cause or err}") from None


def make_method(cfg: DictConfig, net) -> UnlearningModule:
    return make(method_node(cfg), "method", net=net)



def _target_class(node: DictConfig) -> type:
    from hydra._internal.utils import _locate
    return _locate(node._target_)


def run(cfg: DictConfig) -> dict[str, float]:
    """The whole run; a run directory with a metrics.json is finished and is not run again."""
    out = Path(cfg.paths.output_dir)
    done = out / "metrics.json"
    if done.exists():
        log.info("%s exists: finished run, skipped", done)
        import json
        return flatten(json.loads(done.read_text()))
    if not ddp.is_main():  # a DDP rank started by a cluster (srun, torchrun): rank 0 tells
        log.setLevel(logging.WARNING)
    stage = build(cfg)
    try:
        name = _choice("method") or stage.module.name
        log.info("%s: unlearning (%s)", name, f"at most {stage.trainer.max_epochs} epochs"
                 if stage.module.optimizer_factory is not None else "one-shot")
        start = time.perf_counter()
        stage.fit()
        if not ddp.is_main(stage.trainer):  # only global rank 0 evaluates and writes the run directory
            return {}
        log.info("%s: done in %.1f s; evaluation of original, unlearned and retrained model", name,
                 time.perf_counter() - start)
        result = stage.evaluate()
        log.info("evaluation: done in %.1f s", result.seconds)
        metrics = write_outputs(stage, result, out)
    finally:
        finish_logger(stage.trainer.logger)
    return flatten(metrics)


def flatten(metrics: dict) -> dict[str, float]:
    """metrics.json -> {"unlearned/forget_acc": .., "original/forget_acc": .., "summary/avg_gap": ..}."""
    flat = {}
    for k, v in metrics.items():
        if k in ("original", "retrain") and isinstance(v, dict):
            flat.update({f"{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float)) and vv is not None})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"summary/{k}" if k in ("avg_gap", "unlearn_seconds") else f"unlearned/{k}"] = v
    return flat
