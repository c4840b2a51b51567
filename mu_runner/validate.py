"""One validation pass over a composed config, before any work (docs/design.md, Failure behaviour).

`validate(cfg)` collects every problem it finds and raises one ConfigError with one line per
problem (`key=value: what is allowed`), so that a user fixes a command line in one go instead of
one training-free crash at a time. It runs at the start of `run.build()` and of the tuning entry.

- unknown keys: a node with a `_target_` takes exactly its target's parameters (plus Hydra's
  `_target_`/`_partial_`/..., and the method's `search:` block); a plain node takes the keys the
  package's own yamls give it (config.yaml, every option of its group, the experiments), so a key
  added with `+` that nothing reads is refused, with the close match when there is one;
- types and ranges of the values the runner reads (seed, epochs, batch sizes, learning rates,
  fractions, the forget set, the eval choices, the callbacks);
- cross-field rules: a method that selects on validation images with `data.val_fraction=0`, a method
  that cannot handle the forget kind, `forget=indices` without a file, tuning without validation.

A value that is an interpolation (`forget.seed: ${seed}`) is checked where it comes from, once.
Checks that need the data or the network (the number of classes of an unknown source, layer names)
run in `build()` right after this pass, still before any training.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mu_runner.errors import ConfigError, MuRunnerError

HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
EXTRA_KEYS = {"method": {"search"}}  # read by the runner, never passed to the target
OPEN_GROUPS = {"callbacks"}  # plain groups that take a user's own `_target_` node (any Lightning callback)
FREE = object()  # a plain node below a `_target_` node (backbone.model_args, method.search): any key
MISSING = object()


def validate(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem of `cfg` (one line each); None when it is sound."""
    found = problems(cfg)
    if found:
        raise ConfigError("\n".join(found))


def problems(cfg: DictConfig) -> list[str]:
    """Every problem of `cfg`, one line each, in a stable order, without repeats."""
    out: list[str] = []
    if not _shapes(cfg, out):
        return out
    unknown_keys(cfg, "", _shipped_keys(), out)
    for check in (_top, _data, _backbone, _train, _forget, _eval, _callbacks, _logger, _method, _cross, _tune):
        try:
            check(cfg, out)
        except MuRunnerError as err:  # a check that could not go on (its own message is the problem)
            out.extend(str(err).splitlines())
        except Exception as err:  # noqa: BLE001 - a value of a shape no rule foresaw: a line, not a traceback
            if not out:
                out.append(f"{check.__name__.strip('_')}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    return list(dict.fromkeys(out))


GROUPS = ("data", "backbone", "train", "forget", "method", "eval", "callbacks", "paths", "trainer")


def _shapes(cfg: DictConfig, out: list[str]) -> bool:
    """Every group is a mapping (`eval=3` is not); False when one is not (nothing else can be read)."""
    for group in GROUPS:
        if group not in cfg or OmegaConf.is_interpolation(cfg, group):
            continue
        node = cfg._get_node(group)
        if not isinstance(node, DictConfig) or node._is_none():
            value = None if node._is_none() else node._value()
            out.append(f"{group}={value!r}: allowed a mapping of the {group} group's keys "
                       f"(choose an option with {group}=<name>, set keys with {group}.<key>=<value>)")
    return not out


# -- unknown keys ---------------------------------------------------------------------------------------


def unknown_keys(node: DictConfig, path: str, tree: dict | object, out: list[str]) -> None:
    """Keys of `node` that nothing reads: see the module docstring."""
    if "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
        _target_keys(node, path, out)
        return
    if tree is FREE:
        return
    for key in node:
        child = node._get_node(key)
        where = f"{path}.{key}" if path else str(key)
        if key not in tree:
            if path in OPEN_GROUPS and isinstance(child, DictConfig) and "_target_" in child:
                _target_keys(child, where, out)
                continue
            out.append(_unknown_line(where, str(key), tree))
            continue
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_missing() \
                and (tree[key] or "_target_" in child):
            unknown_keys(child, where, tree[key], out)


def _target_keys(node: DictConfig, path: str, out: list[str]) -> None:
    target = node._target_
    try:
        allowed = _parameters(str(target))
    except (ImportError, AttributeError, ValueError) as err:
        first = next((ln.strip() for ln in str(err).splitlines() if "Error" in ln and "loading" not in ln), "")
        out.append(f"{path}._target_={target!r}: cannot be imported" + (f" ({first})" if first else ""))
        return
    if allowed is not None:
        allowed = allowed | HYDRA_KEYS | EXTRA_KEYS.get(path, set())
        for key in node:
            if key not in allowed:
                out.append(_unknown_line(f"{path}.{key}", str(key), allowed))
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_interpolation() and not child._is_missing() \
                and "_target_" in child:
            _target_keys(child, f"{path}.{key}", out)


def _unknown_line(where: str, key: str, allowed) -> str:
    names = sorted(k for k in allowed if not k.startswith("_"))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{where}: unknown key (allowed: {', '.join(names)}){hint}"


@functools.cache
def _parameters(target: str) -> frozenset[str] | None:
    """The keyword parameters of a `_target_` (a class's constructor or a function); None: it takes any."""
    from hydra._internal.utils import _locate
    obj = _locate(target)
    sig = inspect.signature(obj)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return frozenset(n for n, p in sig.parameters.items() if p.kind is not p.VAR_POSITIONAL)


@functools.lru_cache(maxsize=1)
def _shipped_keys() -> dict:
    """The key tree of everything the package's yamls set: config.yaml, each group's options mounted
    at the group, the experiments (global). Leaves are {}; `defaults` and `hydra` are Hydra's."""
    from importlib.resources import files
    conf = files("mu_runner.conf")
    tree: dict = {}
    top = OmegaConf.load(str(conf / "config.yaml"))
    for entry in top.get("defaults", []):
        if isinstance(entry, (dict, DictConfig)):
            tree.setdefault(str(next(iter(entry))).split("@")[0].removeprefix("override /"), {})
    _merge(tree, top)
    for group in conf.iterdir():
        if not group.is_dir() or group.name.startswith(("_", ".")):
            continue
        for option in group.iterdir():
            if not option.name.endswith(".yaml"):
                continue
            node = OmegaConf.load(str(option))
            if group.name == "experiment":
                if "@package _global_" in option.read_text():
                    _merge(tree, node)
            elif group.name != "hydra":
                _merge(tree.setdefault(group.name, {}), node)
    tree.pop("hydra", None)
    tree["hydra"] = FREE
    return tree


def _merge(tree: dict, node: DictConfig) -> None:
    for key in node:
        if key in ("defaults", "hydra"):
            continue
        child = node._get_node(key)
        sub = tree.setdefault(str(key), {})
        if isinstance(child, DictConfig) and not child._is_interpolation() and sub is not FREE:
            if "_target_" in child:
                continue  # checked against its target's parameters
            _merge(sub, child)


# -- reading values ---------------------------------------------------------------------------------------


def _get(cfg: DictConfig, key: str, out: list[str]) -> Any:
    """The value at dotted `key`, or MISSING (absent, `???`, or an interpolation that does not resolve:
    that is a problem line of its own)."""
    *parents, last = key.split(".")
    node = cfg
    try:
        for part in parents:
            if not isinstance(node, DictConfig) or part not in node:
                return MISSING
            node = node[part]
        if not isinstance(node, DictConfig) or last not in node or OmegaConf.is_missing(node, last):
            return MISSING
        value = node[last]
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        if not any(line.endswith(f": {message}") for line in out):  # once, where it is first read
            out.append(f"{key}: {message}")
        return MISSING
    return value


def _own(cfg: DictConfig, key: str, out: list[str]) -> Any:
    """As `_get`, but MISSING for an interpolation: its source is checked, once."""
    *parents, last = key.split(".")
    node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
    if isinstance(node, DictConfig) and last in node and OmegaConf.is_interpolation(node, last):
        _get(cfg, key, out)  # only to report an interpolation that does not resolve
        return MISSING
    return _get(cfg, key, out)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(out: list[str], cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str,
          own: bool = True) -> Any:
    """Append `key=value: allowed ...` when the value is there and not `ok`; returns the value."""
    value = (_own if own else _get)(cfg, key, out)
    if value is not MISSING and not ok(value):
        out.append(f"{key}={value!r}: allowed {allowed}")
    return value


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


SEED = (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in 0..4294967295")


# -- the groups -------------------------------------------------------------------------------------------


def _top(cfg: DictConfig, out: list[str]) -> None:
    _need(out, cfg, "seed", *SEED)
    _need(out, cfg, "reference", lambda v: v in ("retrain", "none", None), "retrain, none")
    _need(out, cfg, "save_model", lambda v: isinstance(v, bool), "true, false")
    ckpt = _need(out, cfg, "original_checkpoint", lambda v: v is None or isinstance(v, str),
                 "null or the path of a .safetensors / .pt file")
    if isinstance(ckpt, str) and not Path(ckpt).is_file():
        out.append(f"original_checkpoint={ckpt!r}: file not found")


def _data(cfg: DictConfig, out: list[str]) -> None:
    _need(out, cfg, "data.val_fraction", lambda v: _is_number(v) and 0 <= v < 1,
          "a fraction in [0, 1) of the training images held out for validation")
    _need(out, cfg, "data.split_seed", *SEED)
    _need(out, cfg, "data.image_size", lambda v: v is None or (_is_int(v) and v >= 1),
          "null (the data's own size) or an integer >= 1")
    _need(out, cfg, "data.augment", lambda v: isinstance(v, dict), "a mapping {pad: <pixels>, flip: <bool>}")
    _need(out, cfg, "data.augment.pad", _int_at_least(0), "an integer >= 0 (pixels of random shift)")
    _need(out, cfg, "data.augment.flip", lambda v: isinstance(v, bool), "true, false")


def _backbone(cfg: DictConfig, out: list[str]) -> None:
    _need(out, cfg, "backbone.name", lambda v: isinstance(v, str) and v != "", "a timm model name")
    _need(out, cfg, "backbone.small_stem", lambda v: v in ("auto", True, False), "auto, true, false")
    _need(out, cfg, "backbone.pretrained", lambda v: isinstance(v, bool), "true, false")
    _need(out, cfg, "backbone.model_args", lambda v: v is None or isinstance(v, dict),
          "null or a mapping of timm.create_model arguments")


def _optimizer(cfg: DictConfig, group: str, out: list[str]) -> None:
    parent = cfg.get(group)
    if not isinstance(parent, DictConfig) or "optimizer" not in parent or OmegaConf.is_interpolation(parent, "optimizer"):
        return  # an interpolation (retrain's ${train.optimizer}) is checked where it comes from
    node = parent._get_node("optimizer")
    before = len(out)
    if isinstance(node, DictConfig) and "lr" in node:
        _need(out, cfg, f"{group}.optimizer.lr", lambda v: _is_number(v) and math.isfinite(v) and v > 0,
              "a finite learning rate > 0")
    if len(out) > before or not isinstance(node, DictConfig) or "_target_" not in node \
            or any(line.startswith(f"{group}.") for line in out):
        return  # a value reported above (train.epochs=abc reaches T_max) would only be repeated
    # the optimizer and scheduler as the runner makes them, on one dummy weight: a value torch refuses
    # (T_max=abc, betas=[2, 0]) is a line now, not a traceback when the training starts
    import torch
    from hydra.utils import instantiate
    where = f"{group}.optimizer"
    try:
        optimizer = instantiate(parent.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
        scheduler = parent.get("scheduler")
        if isinstance(scheduler, DictConfig) and not OmegaConf.is_interpolation(parent, "scheduler"):
            where = f"{group}.scheduler"
            optimizer.step()  # no gradient: nothing moves; the scheduler's first step computes its rate
            with warnings.catch_warnings():  # torch's "step() before optimizer.step()" notice: not the user's
                warnings.simplefilter("ignore")
                instantiate(scheduler)(optimizer).step()
    except Exception as err:  # noqa: BLE001 - whatever torch or Hydra raise, as one line
        cause = err.__cause__ or err
        out.append(f"{where}: {type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}")


def _train(cfg: DictConfig, out: list[str]) -> None:
    _need(out, cfg, "train.epochs", _int_at_least(1),
          "an integer >= 1 (the original and the reference are trained; an untrained original is refused)")
    _need(out, cfg, "train.batch_size", _int_at_least(1), "an integer >= 1")
    _need(out, cfg, "train.optimizer", lambda v: isinstance(v, dict) and "_target_" in v,
          "an optimizer node with a _target_ (train=fast|sgd|adamw|memorize)")
    _optimizer(cfg, "train", out)


def _forget(cfg: DictConfig, out: list[str]) -> None:
    kind = _need(out, cfg, "forget.kind", lambda v: v in ("classes", "random", "indices"), "classes, random, indices")
    if kind == "indices":
        if "path" not in cfg.forget or OmegaConf.is_missing(cfg.forget, "path"):
            out.append("forget=indices needs forget.path=<file>: training-sample ids, one a line or a JSON list")
            return
        path = _need(out, cfg, "forget.path", lambda v: isinstance(v, str), "the path of an ids file")
        if isinstance(path, str) and not Path(path).is_file():
            out.append(f"forget.path={path!r}: file not found (one training-sample id per line)")
        return
    if kind not in ("classes", "random"):
        return
    _need(out, cfg, "forget.seed", *SEED)
    classes_known = _known_classes(cfg)
    k = _need(out, cfg, "forget.k", lambda v: v is None or _is_int(v), "null or an integer >= 1")
    if kind == "classes" and _is_int(k) and classes_known and not 1 <= k < classes_known:
        out.append(f"forget.k={k}: must be an integer in 1..{classes_known - 1} "
                   f"(the data has {classes_known} classes and one must remain)")
    elif _is_int(k) and k < 1 and (kind == "random" or classes_known):
        out.append(f"forget.k={k}: allowed null or an integer >= 1")
    # else: an integer k of classes the config does not count is checked by make_split, which names them
    fraction = _need(out, cfg, "forget.fraction", lambda v: v is None or (_is_number(v) and 0 < v < 1),
                     "null or a fraction in (0, 1)")
    if k not in (None, MISSING) and fraction not in (None, MISSING):
        out.append(f"forget.k={k} and forget.fraction={fraction}: give one of them, not both")
    if kind != "classes":
        return
    classes = _get(cfg, "forget.classes", out)
    if classes in (None, MISSING):
        return
    if not isinstance(classes, list) or not classes or not all(_is_int(c) for c in classes):
        out.append(f"forget.classes={classes!r}: allowed null or a non-empty list of class ids")
        return
    twice = next((c for i, c in enumerate(classes) if c in classes[:i]), None)
    if twice is not None:
        out.append(f"forget.classes={classes}: class {twice} is listed twice")
    top = classes_known - 1 if classes_known else None
    bad = [c for c in classes if c < 0 or (top is not None and c > top)]
    if bad:
        allowed = f"lie in 0..{top}" if top is not None else "be >= 0"
        out.append(f"forget.classes={classes}: ids must {allowed} (got {bad})")
    if classes_known and len(set(classes)) >= classes_known:
        out.append(f"forget.classes={classes}: the data has {classes_known} classes and one must remain")
    if fraction not in (None, MISSING) or (k not in (None, MISSING) and k != len(classes)):
        out.append(f"forget.classes={classes} with forget.k={k}, forget.fraction={fraction}: give the classes alone")


def _known_classes(cfg: DictConfig) -> int | None:
    """The number of classes when the config says it (data.source.num_classes), else None (known once
    the data is loaded: make_split checks it then)."""
    n = OmegaConf.select(cfg, "data.source.num_classes", throw_on_resolution_failure=False)
    return n if _is_int(n) and n >= 2 else None


def _eval(cfg: DictConfig, out: list[str]) -> None:
    from mu_runner.evaluation.evaluator import MIA_FEATURES
    from mu_runner.run import EMBEDDINGS, UMIA
    _need(out, cfg, "eval.mia", lambda v: v in MIA_FEATURES, ", ".join(MIA_FEATURES))
    umia = _need(out, cfg, "eval.umia", lambda v: (v or "none") in UMIA, ", ".join(UMIA))
    _need(out, cfg, "eval.embedding", lambda v: (v or "none") in EMBEDDINGS, ", ".join(EMBEDDINGS))
    _need(out, cfg, "eval.mia_draws", _int_at_least(0), "0 (all samples, balanced) or a number of draws >= 1")
    _need(out, cfg, "eval.mia_seed", *SEED)
    for key in ("feature_samples", "embedding_samples", "probe_samples", "mia_max_samples"):
        _need(out, cfg, f"eval.{key}", _int_at_least(1), "an integer >= 1")
    if umia == "lira":
        _need(out, cfg, "eval.lira.shadows", _int_at_least(2),
              "an integer >= 2 (every example needs IN and OUT shadows)")
        _need(out, cfg, "eval.lira.seed", *SEED)


def _callbacks(cfg: DictConfig, out: list[str]) -> None:
    from mu_runner import run
    _need(out, cfg, "callbacks.eval_every_n_epochs", _int_at_least(0), "0 (never) or an integer >= 1")
    if hasattr(run, "check_callbacks"):
        _collect(out, run.check_callbacks, cfg)


def _logger(cfg: DictConfig, out: list[str]) -> None:
    from mu_runner.utils.loggers import check_logger
    _collect(out, check_logger, cfg)


def _method_class(cfg: DictConfig) -> type | None:
    target = OmegaConf.select(cfg, "method._target_", throw_on_resolution_failure=False)
    if not isinstance(target, str):
        return None
    try:
        from hydra._internal.utils import _locate
        return _locate(target)
    except (ImportError, AttributeError, ValueError):
        return None  # reported by the unknown-keys pass


def _method(cfg: DictConfig, out: list[str]) -> None:
    cls = _method_class(cfg)
    if cls is None:
        if "_target_" not in cfg.method:
            out.append("method: no _target_ (choose one of conf/method/*.yaml with method=<name>)")
        return
    before = len(out)
    if "epochs" in cfg.method:
        low = getattr(cls, "min_epochs", 1)
        _need(out, cfg, "method.epochs", _int_at_least(low),
              f"an integer >= {low}" + (" (0 trains nothing and is refused)" if low >= 1 else ""))
    for key in ("batch_size", "forget_batch_size"):
        if key in cfg.method:
            _need(out, cfg, f"method.{key}", lambda v, key=key: (_is_int(v) and v >= 1)
                  or (key == "forget_batch_size" and v is None), "an integer >= 1" + (
                      " or null" if key == "forget_batch_size" else ""))
    _need(out, cfg, "method.seed", *SEED)
    if "optimizer" in cfg.method and getattr(cls, "min_epochs", 1) >= 1:
        _need(out, cfg, "method.optimizer", lambda v: isinstance(v, dict) and "_target_" in v,
              "an optimizer node with a _target_ (the method trains)")
    if "optimizer" in cfg.method:
        _optimizer(cfg, "method", out)
    if any(line.startswith("method") for line in out[before:]) or \
            any(line.startswith("method.") and "unknown key" in line for line in out):
        return  # the constructor would only repeat them
    from mu_runner.run import make_method
    try:
        make_method(cfg, net=None)  # the method's own checks of its values
    except Exception as err:  # noqa: BLE001 - a wrapped TypeError/ValueError is a value reported above, if any
        text = str(err) or type(err).__name__
        if isinstance(err, MuRunnerError) and not (out and text.startswith("method=")):
            out.extend(text.splitlines())
        elif not out:
            out.append(f"method={cfg.method._target_}: {text.splitlines()[0]}")


def _cross(cfg: DictConfig, out: list[str]) -> None:
    """Rules between groups."""
    cls = _method_class(cfg)
    kind = OmegaConf.select(cfg, "forget.kind", throw_on_resolution_failure=False)
    if cls is not None and kind in ("classes", "random", "indices"):
        from mu_runner import run
        _collect(out, run.check_forget_kind, cfg)
    val = _get(cfg, "data.val_fraction", [])
    if val != 0 or cls is None:
        return
    use = getattr(cls, "validation_use", None)
    why = use(cfg.method, kind) if use is not None else None
    name = _method_name(cfg)
    if why:
        out.append(f"method={name} with data.val_fraction=0: {name} {why}; set data.val_fraction > 0")
    target = OmegaConf.select(cfg, "callbacks.forget_target", throw_on_resolution_failure=False)
    if target is not None and kind == "classes":
        out.append("callbacks.forget_target with data.val_fraction=0: the check images are the forget classes' "
                   "validation images; set data.val_fraction > 0")


def _method_name(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return str(cfg.method._target_).rsplit(".", 2)[-2]


def _tune(cfg: DictConfig, out: list[str]) -> None:
    if cfg.get("tune") is None:
        return
    from mu_runner.tuning import check_tune
    _collect(out, check_tune, cfg)
    if _get(cfg, "data.val_fraction", []) == 0:
        out.append("tune with data.val_fraction=0: tuning scores validation images only; set data.val_fraction > 0")


def _collect(out: list[str], check: Callable, *args) -> None:
    try:
        check(*args)
    except MuRunnerError as err:
        out.extend(str(err).splitlines())


def check_network(cfg: DictConfig, data) -> None:
    """The method's values that need the backbone (layer names: `method.trainable`, `method.layers`,
    `method.gradcam_layer`): its constructor on an untrained network, milliseconds before any training.
    A method whose constructor needs its trained original (`network_check = False`) is skipped."""
    from mu_runner.run import _target_class, make_method, new_net
    if getattr(_target_class(cfg.method), "network_check", True):
        make_method(cfg, net=new_net(cfg, data))
