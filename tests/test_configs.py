"""Every config group option composes, and every `_target_` binds its YAML keys."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from conftest import CONF, METHODS, compose_config
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf

GROUPS = {g: sorted(p.stem for p in Path(CONF, g).glob("*.yaml"))
          for g in ("data", "backbone", "forget", "method", "trainer", "logger", "callbacks", "paths", "train", "experiment")}
# Keys a group node carries for the runner, not for its _target_.
RUNNER_KEYS = {"_target_", "_partial_"}


def test_design_options_exist():
    required = {
        "data": {"digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"},
        "backbone": {"resnet18", "resnet50", "vit_tiny", "vit_small", "test_resnet", "test_vit"},
        "forget": {"classes", "random", "indices"},
        "method": {"original", "retrain", "finetune", "grad_ascent", "neggrad_plus", "random_label",
                   "l1_sparse", "boundary_shrink", "scrub", "bad_teacher", "ssd", "salun"},
        "trainer": {"default", "cpu", "gpu", "ddp", "tiny"},
        "logger": {"csv", "wandb", "tensorboard", "none"},
        "paths": {"default"},
    }
    for group, options in required.items():
        assert options <= set(GROUPS[group]), group


def test_the_default_run_is_the_issue_defaults(tmp_path):
    cfg = compose_config([], tmp_path)  # python -m mu_runner, nothing on the command line
    assert cfg.method._target_ == "mu_runner.methods.salun.SalUn"
    assert (cfg.data.name, cfg.forget.k, cfg.forget.fraction) == ("digits", None, None)  # k=1 when neither
    assert cfg.backbone.name == "resnet18"


def _callable(target: str):
    try:
        return get_class(target)
    except (ImportError, ValueError):  # a function, not a class
        return get_method(target)


def _assert_binds(node, runtime: set[str] = frozenset()):
    """The node's keys (plus runtime kwargs) bind to the target's signature, recursively."""
    target = _callable(node["_target_"])
    keys = {k for k in node if k not in RUNNER_KEYS}
    sig = inspect.signature(target.__init__ if inspect.isclass(target) else target)
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    if not has_var_kw:
        sig.bind_partial(*([None] if inspect.isclass(target) else []), **{k: None for k in keys | set(runtime)})
    for k in keys:
        if OmegaConf.is_dict(node[k]) and "_target_" in node[k]:
            _assert_binds(node[k])  # partials get their runtime argument later


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_its_targets_bind(tiny, group, option):
    cfg = tiny(f"{group}={option}", *(["forget.path=ids.txt"] if option == "indices" else []))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    node = cfg[group] if group != "experiment" else cfg
    if group == "data":
        _assert_binds(node.source)
    elif group == "backbone":
        _assert_binds(node, {"num_classes", "in_chans", "img_size", "mean", "std"})
    elif group == "method":
        from mu_runner.settings import method_node
        _assert_binds(method_node(cfg), {"net"})  # the `search:` block is the tuner's, never the method's
    elif group in ("trainer", "logger") and "_target_" in node:
        _assert_binds(node, {"max_epochs", "logger", "callbacks"} if group == "trainer" else set())
    elif group == "train":
        _assert_binds(node.optimizer, {"params"})  # what the trainer passes
        _assert_binds(node.scheduler, {"optimizer"})
    elif group == "forget":
        _assert_binds(node)  # conf/forget/*.yaml -> data.forget.Forget*: every key is a field
    elif group == "callbacks":
        nodes = [v for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]
        assert nodes, "the group composes the built-in callback nodes"
        for v in nodes:  # instantiate_callbacks passes a _partial_ node only the context it asks for
            _assert_binds(v)


@pytest.mark.parametrize("option", GROUPS["backbone"])
def test_every_backbone_builds_for_small_grey_images(tiny, option):
    cfg = tiny(f"backbone={option}")
    net = instantiate(cfg.backbone, num_classes=7, in_chans=1, img_size=8, mean=[0.5], std=[0.25])
    import torch
    out = net(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 7)
    assert net.stage_names and net.stage_of(next(iter(dict(net.named_parameters())))) == "stem"
    if "resnet" in option:  # small-image stem: stride 1, no max-pool
        assert net.body.conv1.stride == (1, 1) and net.body.conv1.kernel_size == (3, 3)
        assert type(net.body.maxpool).__name__ == "Identity"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_instantiates_with_its_yaml_defaults(tiny, method):
    from mu_runner.run import make_method
    module = make_method(tiny(f"method={method}"), net=None)
    plan = module.data_plan()  # a valid DataPlan (its own checks) that never names the test split
    assert module.epochs >= 0 and set(plan.names) <= {"forget", "retain", "train", "val"}
    assert plan.anchor in (None, "forget", "retain")


@pytest.mark.parametrize("option", ["csv", "tensorboard", "wandb", "none"])
def test_every_logger_instantiates(tiny, tmp_path, option):
    from mu_runner.utils.loggers import build_logger, finish_logger
    logger = build_logger(tiny(f"logger={option}"))
    try:
        assert (logger is None) == (option == "none")
    finally:
        finish_logger(logger)


def test_unknown_backbone_name_is_a_clear_error(tiny):
    from mu_runner.errors import ConfigError
    from mu_runner.run import load_data, new_net
    cfg = tiny("backbone.name=resnet_nope")
    with pytest.raises(ConfigError, match=r"backbone.name='resnet_nope'"):
        new_net(cfg, load_data(cfg))


def _leaves(node, prefix: str = ""):
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_key_an_experiment_sets_reaches_the_composed_config(experiment, tmp_path):
    # an experiment composed before the primary config's own keys lost eval.umia / save_model silently
    raw = OmegaConf.to_container(OmegaConf.load(Path(CONF, "experiment", f"{experiment}.yaml")))
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    for key, value in _leaves(raw):
        assert OmegaConf.select(cfg, key) == value, (experiment, key)


def test_experiment_privacy_turns_the_per_example_attack_on(tmp_path):
    cfg = compose_config(["experiment=privacy"], tmp_path)
    assert (cfg.eval.umia, cfg.train.epochs, cfg.data.augment.pad, cfg.save_model) == ("lira", 30, 0, False)
    assert compose_config(["experiment=privacy", "eval.umia=none"], tmp_path).eval.umia == "none"  # CLI wins


@pytest.mark.parametrize("path", sorted(Path(CONF, "method_forget").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_per_forget_kind_values_apply_to_their_kind_only_and_the_command_line_wins(tiny, path):
    """conf/method_forget/<method>/<forget>.yaml: a method's values for one forget kind (tuned on it),
    merged over the method yaml only when that kind is chosen; an explicit override still wins."""
    method, kind = path.parent.name, path.stem
    own = OmegaConf.load(Path(CONF, "method", f"{method}.yaml"))
    other = next(k for k in ("classes", "random") if k != kind)
    chosen = tiny(f"method={method}", f"forget={kind}").method
    plain = tiny(f"method={method}", f"forget={other}").method
    leaves = list(_leaves(OmegaConf.to_container(OmegaConf.load(path))))
    assert leaves
    for key, value in leaves:
        assert OmegaConf.select(chosen, key) == value, key
        assert OmegaConf.select(plain, key) == OmegaConf.select(own, key) != value, key
    key, value = leaves[0]
    given = 17 if isinstance(value, int) else 0.123
    assert OmegaConf.select(tiny(f"method={method}", f"forget={kind}", f"method.{key}={given}").method, key) == given
