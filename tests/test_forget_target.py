"""Stopping at equal forgetting (`callbacks.forget_target`), the proportional reset
(`weight_reset` `ratio_per_class`), `data.image_size` and the 1x1-stage warning."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mu_runner.callbacks.forget_target import ForgetTarget, check_indices
from mu_runner.errors import ConfigError
from mu_runner.run import build, load_data, make_split, new_net, run

FAST = ("eval.feature_samples=50", "eval.probe_samples=100", "eval.embedding=none")


def test_check_images_are_held_out_forget_class_images_or_half_of_the_forget_set(tiny):
    cfg = tiny("forget.classes=[3]")
    data = load_data(cfg)
    idx = check_indices(data, make_split(cfg, data))
    assert len(idx) > 0 and set(idx.tolist()) <= set(data.val.tolist())  # never a training image
    assert set(data.labels[idx].tolist()) == {3}
    cfg = tiny("forget=random", "forget.fraction=0.1")
    split = make_split(cfg, data)
    idx = check_indices(data, split)
    assert set(idx.tolist()) <= set(split.forget.tolist()) and abs(len(idx) - len(split.forget) / 2) <= 1


def test_rule_stops_at_the_first_qualifying_check_and_records_it(tiny, shared_cache, monkeypatch):
    """Checks every 2 steps; the scripted accuracies reach the target (0.5) at the third check."""
    scripted = iter([0.9, 0.7, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    monkeypatch.setattr("mu_runner.callbacks.forget_target.accuracy_on", lambda net, data, idx: next(scripted))
    stage = build(tiny("method=finetune", "method.epochs=3", "method.batch_size=32", "reference=none",
                       "callbacks.forget_target=0.5", "callbacks.target_every_n_steps=2",
                       f"paths.cache_dir={shared_cache}"))
    stage.fit()
    s = stage.stopper.summary()
    assert [step for step, _ in stage.stopper.checks] == [2, 4, 6]
    assert s["reached_target"] is True and s["stopped_at"] == 6 and stage.trainer.global_step == 6
    assert s["forget_target"] == 0.5 and s["check_forget_acc"] == 0.5
    batches = stage.trainer.num_training_batches
    assert s["stopped_epoch"] == pytest.approx(6 / batches)


def test_cap_reached_without_target_is_marked(tiny, shared_cache, monkeypatch):
    monkeypatch.setattr("mu_runner.callbacks.forget_target.accuracy_on", lambda net, data, idx: 0.8)
    stage = build(tiny("method=finetune", "method.epochs=5", "reference=none", "callbacks.forget_target=0.1",
                       "callbacks.max_epochs=2", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    s = stage.stopper.summary()
    assert stage.trainer.current_epoch == 2  # the cap, not the method's 5 epochs
    assert s["reached_target"] is False and s["stopped_at"] is None and s["check_forget_acc"] == 0.8


def test_retrain_target_is_the_reference_accuracy_on_the_check_images(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = tiny("method=random_label", "forget.classes=[2]", "callbacks.forget_target=retrain",
               "callbacks.max_epochs=4", f"paths.output_dir={out}", *FAST)
    metrics = run(cfg)
    m = json.loads((out / "metrics.json").read_text())
    stage_ref = build(cfg)  # the reference again (cached): its accuracy on the check images
    from mu_runner.metrics.scoring import accuracy_on
    target = accuracy_on(stage_ref.reference, stage_ref.data, check_indices(stage_ref.data, stage_ref.split))
    assert m["forget_target"] == pytest.approx(target)
    assert isinstance(m["reached_target"], bool)
    if m["reached_target"]:
        assert m["check_forget_acc"] <= m["forget_target"] and m["stopped_at"] == m["optimizer_steps"]
    else:
        assert m["epochs_run"] == 4 and m["stopped_at"] is None
    assert "unlearned/reached_target" not in metrics  # a flag, not a number to average
    from test_evaluation import readme_keys
    assert set(m) - readme_keys() == set()  # the stopping rule's keys are documented


def test_retrain_target_refuses_a_run_without_reference(tiny):
    with pytest.raises(ConfigError, match="forget_target=retrain needs the retrained model"):
        build(tiny("callbacks.forget_target=retrain", "reference=none"))


@pytest.mark.parametrize("key,value,match", [
    ("callbacks.forget_target", "abc", "allowed null, retrain or an accuracy"),
    ("callbacks.forget_target", "1.5", "allowed null, retrain or an accuracy"),
    ("callbacks.max_epochs", "0", "callbacks.max_epochs=0"),
    ("callbacks.target_every_n_steps", "-1", "callbacks.target_every_n_steps=-1"),
])
def test_bad_callback_values_are_refused_before_training(tiny, key, value, match, monkeypatch):
    monkeypatch.setattr("mu_runner.run.get_original", lambda *a, **k: pytest.fail("trained before checking"))
    with pytest.raises(ConfigError, match=match):
        build(tiny(f"{key}={value}"))


def test_rule_needs_validation_images_of_the_forget_classes(tiny):
    cfg = tiny("data.val_fraction=0")
    data = load_data(cfg)
    with pytest.raises(ConfigError, match="validation images of the forget classes"):
        ForgetTarget(data, make_split(cfg, data), 0.0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_ratio_per_class_resets_exactly_floor_k_r_n_weights(tiny, shared_cache, k):
    r = 0.007
    stage = build(tiny("method=weight_reset", "method.epochs=0", f"forget.k={k}", "method.ratio_per_class=0.007",
                       "reference=none", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    from mu_runner.methods.weight_reset import eligible_weights
    n = sum(dict(stage.module.net.named_parameters())[p].numel() for p in eligible_weights(stage.module.net))
    reset = sum(int(m.sum()) for m in stage.module.selected.values())
    assert reset == math.floor(round(k * r * n, 6)) and stage.module.choices()["ratio"] == pytest.approx(k * r)


def test_sample_forgetting_uses_ratio_not_ratio_per_class(tiny, shared_cache):
    stage = build(tiny("method=weight_reset", "method.epochs=0", "method.ratio=0.004", "method.ratio_per_class=0.02",
                       "forget=random", "reference=none", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    assert stage.module.choices()["ratio"] == 0.004


def test_weight_reset_is_judged_only_after_its_repair_epochs(tiny, shared_cache, monkeypatch):
    monkeypatch.setattr("mu_runner.callbacks.forget_target.accuracy_on", lambda net, data, idx: 0.0)
    stage = build(tiny("method=weight_reset", "method.epochs=2", "reference=none", "callbacks.forget_target=0.0",
                       "callbacks.max_epochs=4", "callbacks.target_every_n_steps=1", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    assert stage.stopper.reached and stage.trainer.current_epoch == 2
    assert stage.stopper.stopped_at == stage.trainer.global_step


def test_image_size_resizes_and_one_by_one_stages_are_reported(tiny, caplog):
    from mu_runner.models import one_by_one, stage_sizes
    cfg = tiny("backbone=resnet18")
    data = load_data(cfg)
    assert data.source.shape == (1, 8, 8)
    sizes8 = stage_sizes(new_net(cfg, data), data.source.shape)
    assert one_by_one(sizes8) == ["layer4"]  # stride 8 at layer4: 8x8 -> 1x1
    cfg16 = tiny("backbone=resnet18", "data.image_size=16")
    data16 = load_data(cfg16)
    assert data16.source.shape == (1, 16, 16) and data16.images.dtype == torch.uint8
    assert torch.equal(data16.labels, data.labels)
    assert one_by_one(stage_sizes(new_net(cfg16, data16), data16.source.shape)) == []


def test_bad_image_size_is_one_line_before_training(tiny):
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_data(tiny("data.image_size=0"))


def test_half_width_resnet18_keeps_the_stages_and_halves_the_channels():
    from mu_runner.models import build_classifier, one_by_one, stage_sizes
    net = build_classifier("resnet18", 10, 1, 16, [0.5], [0.25], model_args={"channels": [32, 64, 128, 256]})
    assert net.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    assert net.body.layer4[1].conv2.out_channels == 256 and net.body.fc.in_features == 256
    assert one_by_one(stage_sizes(net, (1, 16, 16))) == []
    with pytest.raises(ConfigError, match=r"backbone\.model_args"):
        build_classifier("resnet18", 10, 1, 16, [0.5], [0.25], model_args={"no_such_arg": 1})


def test_study_experiment_runs_at_equal_forgetting_without_one_by_one_stages(tiny):
    cfg = tiny("experiment=forget_scaling", "hydra.mode=RUN")
    assert cfg.callbacks.forget_target == "retrain" and cfg.callbacks.max_epochs >= 1
    assert cfg.data.image_size == 16
    from mu_runner.models import one_by_one, stage_sizes
    data = load_data(cfg)
    assert one_by_one(stage_sizes(new_net(cfg, data), data.source.shape)) == []
