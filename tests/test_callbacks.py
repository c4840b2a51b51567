"""The `callbacks` group: `_target_` nodes composed by a default list, instantiated in order and
handed to the unlearning Trainer; a user's Lightning callback added from the command line; the
`forget` group's `_target_` objects."""

from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Timer
from omegaconf import OmegaConf

from mu_runner.callbacks import instantiate_callbacks
from mu_runner.callbacks.forget_target import ForgetTarget
from mu_runner.callbacks.validation import EpochValidation
from mu_runner.data.forget import ForgetClasses, ForgetIndices, ForgetRandom
from mu_runner.errors import ConfigError
from mu_runner.run import build, forget_spec, load_data, make_split


def test_default_group_builds_the_epoch_curves_and_no_stopper_until_a_target_is_set(tiny):
    cfg = tiny()
    data = load_data(cfg)
    split = make_split(cfg, data)
    cbs = instantiate_callbacks(cfg.callbacks, data=data, split=split, reference=None, seed=0, min_epochs=0)
    assert [type(c) for c in cbs] == [EpochValidation]
    assert cbs[0].every == cfg.callbacks.eval_every_n_epochs  # the node interpolates the group's setting
    cfg = tiny("callbacks.forget_target=0.3", "callbacks.target_every_n_steps=5")
    cbs = instantiate_callbacks(cfg.callbacks, data=data, split=split, reference=None, seed=0, min_epochs=0)
    assert [type(c) for c in cbs] == [EpochValidation, ForgetTarget]
    assert cbs[1].target == 0.3 and cbs[1].every == 5


def test_a_lightning_callback_added_from_the_command_line_reaches_the_unlearning_trainer(tiny, shared_cache):
    stage = build(tiny("+callbacks.timer._target_=lightning.pytorch.callbacks.Timer", "+callbacks.timer.duration=00:01:00:00",
                       "~callbacks.epoch_validation", f"paths.cache_dir={shared_cache}"))
    kinds = [type(c) for c in stage.trainer.callbacks]
    assert Timer in kinds and EpochValidation not in kinds and stage.monitor is None
    assert stage.trainer.callbacks[kinds.index(Timer)]._duration == 3600.0


def test_a_node_that_is_not_a_callback_is_one_line(tiny):
    cfg = tiny("+callbacks.bad._target_=builtins.dict", "~callbacks.epoch_validation", "~callbacks.stop_at_target")
    with pytest.raises(ConfigError, match=r"callbacks.bad: builtins.dict made a dict, not a Lightning Callback"):
        instantiate_callbacks(cfg.callbacks)


@pytest.mark.parametrize("option, cls", [("classes", ForgetClasses), ("random", ForgetRandom), ("indices", ForgetIndices)])
def test_each_forget_option_is_its_target_object(tiny, option, cls):
    spec = forget_spec(tiny(f"forget={option}", *(["forget.path=ids.txt"] if option == "indices" else [])))
    assert type(spec) is cls and spec.kind == option


def test_forget_object_makes_the_same_split_as_the_functions(tiny):
    from mu_runner.data.forget import choose_classes, class_split
    cfg = tiny("forget.k=2", "seed=3")
    data = load_data(cfg)
    split = make_split(cfg, data)
    expected = class_split(data.labels.cpu(), data.pool, choose_classes(data.num_classes, 2, seed=3))
    assert split.classes == expected.classes and split.forget.equal(expected.forget)


def test_a_kind_that_contradicts_the_target_is_refused(tiny):
    cfg = tiny()
    OmegaConf.update(cfg, "forget.kind", "random")
    with pytest.raises(ConfigError, match=r"forget.kind='random' does not match forget._target_=ForgetClasses"):
        forget_spec(cfg)
