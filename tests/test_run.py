"""End to end on tiny configs: the run directory contract, the cache, failures, reference points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mu_runner.run as R
from mu_runner.errors import CheckpointError, ConfigError, DatasetError, DivergedError
from mu_runner.methods.finetune import Finetune

TOP_KEYS = {
    "method", "data", "backbone", "seed", "forget_classes", "n_forget", "n_retain", "forget_acc",
    "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "unlearn_seconds", "original",
    "retrain", "avg_gap", "layer_change", "feature_shift",
}
SCORE_KEYS = {"forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy"}


def scores(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = R.fit_supervised

    def counting(cfg, data, retain, net, **kwargs):
        calls.append(len(retain))
        return real(cfg, data, retain, net, **kwargs)

    monkeypatch.setattr(R, "fit_supervised", counting)
    return calls


def test_run_writes_the_documented_run_directory(tiny, tmp_path):
    cfg = tiny("save_model=true", "eval.embedding=tsne")
    flat = R.run(cfg)
    out = Path(cfg.paths.output_dir)
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= TOP_KEYS
    assert m["method"] == "finetune" and m["data"] == "digits" and m["backbone"] == "test_resnet"
    assert len(m["forget_classes"]) == 1 and m["n_forget"] > 0 and m["n_retain"] > m["n_forget"]
    for obj in (m, m["original"], m["retrain"]):
        assert set(obj) >= SCORE_KEYS
        assert all(0.0 <= obj[k] <= 1.0 for k in SCORE_KEYS)
    assert m["retrain"]["avg_gap"] == 0.0
    assert set(m["layer_change"]) == {"stem", "layer1", "layer2", "layer3", "layer4", "fc"}
    assert set(m["feature_shift"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert m["unlearn_seconds"] > 0 and flat["unlearned/forget_acc"] == m["forget_acc"]
    assert "${" not in (out / "config.yaml").read_text()  # fully resolved
    split = json.loads((out / "forget_split.json").read_text())
    assert len(split["forget"]) == m["n_forget"] and split["classes"] == m["forget_classes"]
    assert (out / "summary.png").stat().st_size > 1000
    stages = {"layer1", "layer2", "layer3", "layer4"}
    for key in ("feature_shift_forget", "feature_shift_retain", "feature_shift_to_retrain"):
        assert set(m[key]) == stages and all(0.0 <= v <= 1.0 + 1e-9 for v in m[key].values())
    assert 0.0 < m["weight_change"] < 1.0 and all(0.0 <= o["probe_forget_acc"] <= 1.0 for o in (m, m["original"], m["retrain"]))
    assert (out / "embedding.png").read_bytes()[:4] == b"\x89PNG"


def test_saved_model_reloads_to_the_same_predictions(tiny):
    cfg = tiny("save_model=true")
    stage = R.build(cfg)
    stage.fit()
    R.write_outputs(stage, stage.evaluate(), Path(cfg.paths.output_dir))
    net = R.new_net(cfg, stage.data)
    R.load_weights(net, load_file(Path(cfg.paths.output_dir) / "model.safetensors"), "model")
    x = stage.data.test_images[:32].float() / 255
    stage.module.net.eval(), net.eval()
    assert torch.equal(net(x), stage.module.net(x))


def test_second_identical_run_trains_nothing(tiny, tmp_path, count_training):
    first = R.run(tiny(tmp=tmp_path / "a"))
    assert len(count_training) == 2  # the original and the retrained reference
    cache = tmp_path / "a" / "cache"
    second = R.run(tiny(f"paths.cache_dir={cache}", tmp=tmp_path / "b"))
    assert len(count_training) == 2  # nothing trained the second time
    assert scores(first) == scores(second)


def test_methods_of_one_sweep_share_the_original_and_reference(tiny, tmp_path, count_training):
    cache = tmp_path / "cache"
    R.run(tiny("method=finetune", f"paths.cache_dir={cache}", tmp=tmp_path / "a"))
    R.run(tiny("method=original", f"paths.cache_dir={cache}", tmp=tmp_path / "b"))
    assert len(count_training) == 2
    R.run(tiny("forget.k=2", f"paths.cache_dir={cache}", tmp=tmp_path / "c"))
    assert len(count_training) == 3  # a new forget set needs only a new reference


def test_cache_key_ignores_logger_and_method_but_not_seed_or_recipe(tiny):
    base = R._recipe_spec(tiny())
    assert R._recipe_spec(tiny("logger=csv", "method=original")) == base
    assert R._recipe_spec(tiny("seed=1")) != base
    assert R._recipe_spec(tiny("train.optimizer.lr=0.5")) != base
    assert R._recipe_spec(tiny("data=synthetic")) != base


def test_same_seed_same_metrics_and_another_seed_differs(tiny, tmp_path):
    a = scores(R.run(tiny("seed=7", tmp=tmp_path / "a")))
    b = scores(R.run(tiny("seed=7", tmp=tmp_path / "b")))
    c = scores(R.run(tiny("seed=8", tmp=tmp_path / "c")))
    assert a == b
    assert a != c


def test_nan_loss_stops_with_method_and_step_and_writes_no_metrics(tiny, monkeypatch):
    def nan_loss(self, batch):
        return self.net(batch["retain"][0]).sum() * float("nan")

    monkeypatch.setattr(Finetune, "unlearning_loss", nan_loss)
    cfg = tiny()
    with pytest.raises(DivergedError, match=r"^method finetune diverged at step 1: loss = nan; lower method.optimizer.lr$"):
        R.run(cfg)
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_finished_run_is_skipped(tiny, monkeypatch):
    cfg = tiny()
    first = R.run(cfg)
    monkeypatch.setattr(R, "build", lambda cfg: pytest.fail("a finished run was run again"))
    assert R.run(cfg) == first


def test_retrain_method_equals_the_cached_reference_bit_for_bit(tiny):
    stage = R.build(tiny("method=retrain"))
    stage.fit()
    ref = stage.reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in stage.module.net.state_dict().items())
    assert any(not torch.equal(v, stage.original.state_dict()[k]) for k, v in ref.items())
    assert stage.trainer.global_step > 0


def test_retrain_starts_from_the_seeded_initialisation_not_the_original(tiny):
    cfg = tiny("method=retrain")
    stage = R.build(cfg)
    fresh = R.new_net(cfg, stage.data).state_dict()
    start = stage.module.net.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in start.items())


def test_original_method_is_bit_identical_with_no_optimizer_step(tiny, monkeypatch):
    steps = []
    real = torch.optim.Optimizer.step
    monkeypatch.setattr(torch.optim.Optimizer, "step", lambda self, *a, **k: (steps.append(1), real(self, *a, **k))[1])
    stage = R.build(tiny("method=original"))
    stage.fit()
    assert steps == [] and stage.trainer.global_step == 0
    orig = stage.original.state_dict()
    assert all(torch.equal(v, orig[k]) for k, v in stage.module.net.state_dict().items())
    m = R.write_outputs(stage, stage.evaluate(), Path(stage.cfg.paths.output_dir))
    assert all(v == 0.0 for v in m["layer_change"].values())
    assert all(abs(v) < 1e-9 for v in m["feature_shift"].values())
    assert m["weight_change"] == 0.0
    assert all(abs(v) < 1e-9 for key in ("feature_shift_forget", "feature_shift_retain") for v in m[key].values())
    assert m["probe_forget_acc"] == m["original"]["probe_forget_acc"]  # the same features, the same probe
    assert m["head_only_forgetting"] is False  # nothing was forgotten
    assert scores(m["original"]) == {k: m[k] for k in m["original"] if k != "avg_gap" and "seconds" not in k} | {"avg_gap": m["original"]["avg_gap"]}


def test_finetune_forgets_the_class_and_keeps_the_rest(tiny):
    m = R.run(tiny("method=finetune", "method.epochs=3", "method.optimizer.lr=0.03"))
    assert m["original/forget_acc"] > 0.6
    assert m["unlearned/forget_acc"] < m["original/forget_acc"] - 0.5
    assert m["unlearned/test_acc"] > m["original/test_acc"] - 0.1
    assert m["unlearned/test_forget_acc"] < 0.2


def test_finetune_never_reads_the_forget_set(tiny):
    stage = R.build(tiny("method=finetune"))
    stage.fit()
    loader = stage.trainer.train_dataloader
    assert set(loader.loaders) == {"retain"}
    assert not set(loader.loaders["retain"].indices.tolist()) & set(stage.split.forget.tolist())


def test_checkpoint_that_does_not_fit_the_backbone_is_a_clear_error(tiny, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"body.fc.weight": torch.zeros(3, 3)}, str(bad))
    cfg = tiny(f"original_checkpoint={bad}")
    with pytest.raises(CheckpointError, match=r"original_checkpoint=.*bad.safetensors.* does not fit the backbone"):
        R.build(cfg)


def test_a_users_original_checkpoint_replaces_training(tiny, tmp_path, count_training):
    stage = R.build(tiny(tmp=tmp_path / "a"))
    ckpt = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in stage.original.state_dict().items()}, str(ckpt))
    count_training.clear()
    other = R.build(tiny(f"original_checkpoint={ckpt}", "reference=none", tmp=tmp_path / "b"))
    assert count_training == []
    assert all(torch.equal(v, stage.original.state_dict()[k]) for k, v in other.original.state_dict().items())


@pytest.mark.parametrize("override, pattern", [
    ("forget.k=0", r"forget\.k=0\b.*10 classes"),
    ("forget.k=10", r"forget\.k=10\b.*10 classes"),
    ("forget.k=12", r"forget\.k=12\b.*10 classes"),
    ("forget.k=2 forget.fraction=0.2", r"forget\.k=2 and forget\.fraction=0\.2"),
    ("forget.classes=[3,10]", r"forget\.classes=\[3, 10\].*0\.\.9"),
    ("reference=maybe", r"reference='maybe'.*retrain, none"),
    ("method.batch_size=0", r"method\.batch_size=0"),
])
def test_impossible_input_fails_before_any_training(tiny, override, pattern):
    cfg = tiny(*override.split())
    with pytest.raises(ConfigError, match=pattern):
        R.run(cfg)
    assert not any(Path(cfg.paths.cache_dir).rglob("*.safetensors"))
    assert not (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_missing_dataset_files_name_the_path_and_the_fix(tiny, tmp_path):
    cfg = tiny("data=cifar10", f"paths.data_dir={tmp_path}/nowhere")
    with pytest.raises(DatasetError, match=r"nowhere/cifar-10-batches-py.*data\.download=true"):
        R.run(cfg)
    assert not any(Path(cfg.paths.cache_dir).rglob("*.safetensors"))


def test_random_sample_forgetting(tiny):
    stage = R.build(tiny("forget=random", "forget.fraction=0.1"))
    assert stage.split.classes is None
    assert len(stage.split.forget) == round(0.1 * len(stage.data.pool))
    stage.fit()
    m = R.write_outputs(stage, stage.evaluate(), Path(stage.cfg.paths.output_dir))
    assert m["test_forget_acc"] is None and m["forget_classes"] is None
    assert m["avg_gap"] is not None


def test_forget_classes_alone_and_fraction_alone_are_enough(tiny):
    assert R.make_split(tiny("forget.classes=[3,7]"), R.load_data(tiny())).classes == [3, 7]
    assert len(R.make_split(tiny("forget.fraction=0.3"), R.load_data(tiny())).classes) == 3


def test_deletion_requests_from_a_file(tiny, tmp_path):
    ids = [0, 5, 17, 300]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    stage = R.build(tiny("forget=indices", f"forget.path={tmp_path}/ids.txt", "reference=none"))
    assert sorted(stage.split.forget.tolist()) == ids
    assert not set(ids) & set(stage.data.val.tolist())  # requests stay out of validation
