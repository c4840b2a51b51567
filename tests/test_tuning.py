"""experiment=tune: Optuna trials over the method's `search:` block, scored on validation views only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import CONF, METHODS, TINY
from hydra.core.global_hydra import GlobalHydra

from mu_runner.data.datamodule import InMemoryData
from mu_runner.errors import ConfigError
from mu_runner.tuning import OBJECTIVES, objective, validation_views

TUNE = [*TINY, "experiment=tune", "tune.seeds=[0]", "method.search.epochs='range(1, 3)'"]


def run_main(args: list[str], monkeypatch) -> None:
    """`python -m mu_runner ARGS` in this process (so that spies see every call): its `main`, not
    `cli`, which would end this process when done (mu_runner/utils/fastexit.py)."""
    from mu_runner.__main__ import main
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["mu_runner", *args])
    try:
        main()
    except SystemExit as done:
        assert done.code in (0, None), done.code
    GlobalHydra.instance().clear()


@pytest.fixture
def spy(monkeypatch):
    """Every image tensor scored through `predict`, every InMemoryData built; the evaluator must not run."""
    from mu_runner.evaluation import Evaluator
    from mu_runner.metrics import scoring
    seen, datasets = [], []
    real_predict, real_init = scoring.predict, InMemoryData.__init__

    def predict(net, images, *a, **k):
        seen.append(images)
        return real_predict(net, images, *a, **k)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        datasets.append(self)

    monkeypatch.setattr(scoring, "predict", predict)
    monkeypatch.setattr(InMemoryData, "__init__", init)
    for name in ("score", "evaluate", "analyse"):
        monkeypatch.setattr(Evaluator, name, lambda *a, **k: pytest.fail("the evaluator scored test images"))
    return seen, datasets


def test_tuning_sweep_runs_trials_writes_best_parameters_resumes_and_never_scores_test_images(tmp_path, monkeypatch, spy):
    common = [*TUNE, f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "hydra.sweeper.n_trials=3"]
    run_main(common, monkeypatch)
    sweep = tmp_path / "outputs" / "tuning" / "finetune" / "classes"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"method.optimizer.lr", "method.epochs"}
    # the Optuna sweeper's range(1, 3) includes 3 (docs/tuning/README.md)
    assert 0.01 <= best["best_params"]["method.optimizer.lr"] <= 0.2 and best["best_params"]["method.epochs"] in (1, 2, 3)
    trials = sorted(sweep.glob("*/tune.json"))
    assert len(trials) == 3
    values = [json.loads(t.read_text())["value"] for t in trials]
    assert best["best_value"] == pytest.approx(min(values))
    assert all(0 <= v <= 1 for v in values)

    storage = f"sqlite:///{tmp_path}/outputs/tuning/finetune.db"
    run_main([*common[:-1], "hydra.sweeper.n_trials=1"], monkeypatch)  # the same command again
    study = optuna.load_study(study_name="finetune-classes-acc_gap", storage=storage)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 4
    run_main([*common[:-1], "hydra.sweeper.n_trials=1", "forget=random"], monkeypatch)  # its own study
    samples = optuna.load_study(study_name="finetune-random-acc_gap", storage=storage)
    assert len(samples.trials) == 1 and (sweep.parent / "random" / "optimization_results.yaml").exists()

    seen, datasets = spy
    tests = [d.test_images for d in datasets]
    assert seen and datasets
    assert not any(img is t for img in seen for t in tests)  # only training-set images were scored


def test_validation_views_hold_no_test_image_and_split_val_by_class(tiny):
    from mu_runner.run import load_data, make_split
    cfg = tiny("forget.classes=[3]")
    data = load_data(cfg)
    views = validation_views(data, make_split(cfg, data))
    assert set(views) == {"forget", "retain", "val", "val_forget"}
    assert set(data.labels[views["val_forget"]].tolist()) == {3} and 3 not in data.labels[views["val"]].tolist()
    assert set(views["val"].tolist()) | set(views["val_forget"].tolist()) == set(data.val.tolist())
    cfg = tiny("forget=random")
    views = validation_views(data, make_split(cfg, data))
    assert set(views) == {"forget", "retain", "val"}


def test_objective_is_the_mean_absolute_gap_over_the_views_present():
    u = {"forget": 0.1, "retain": 0.9, "val": 0.8, "val_forget": 0.0}
    r = {"forget": 0.0, "retain": 1.0, "val": 0.9, "val_forget": 0.0}
    assert objective(u, r, "acc_gap") == pytest.approx(0.3 / 4)
    assert objective(u, r, "forget_gap") == pytest.approx(0.1 / 2)
    assert objective({"forget": 0.5, "val": 0.5}, {"forget": 0.0, "val": 0.5}, "acc_gap") == pytest.approx(0.25)
    assert set(OBJECTIVES) == {"acc_gap", "forget_gap"}


@pytest.mark.parametrize("override,match", [
    ("tune.objective=foo", "tune.objective='foo'"),
    ("reference=none", "tune needs the retrained model"),
    ("tune.seeds=[]", "tune.seeds"),
])
def test_bad_tune_settings_are_refused_before_training(tiny, override, match, monkeypatch):
    from mu_runner.tuning import tune
    monkeypatch.setattr("mu_runner.run.build", lambda cfg: pytest.fail("built before checking"))
    GlobalHydra.instance().clear()
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*TUNE, override], return_hydra_config=False)
    with pytest.raises(ConfigError, match=match):
        tune(cfg)


def test_every_tunable_method_declares_a_search_space_over_its_own_keys():
    for name in METHODS:
        node = yaml.safe_load(Path(CONF, "method", f"{name}.yaml").read_text())
        if name in ("original", "retrain"):
            assert "search" not in node
            continue
        assert node.get("search"), f"{name} has no search block"
        for key in node["search"]:
            head = key.split(".")[0]
            assert head in node, f"{name}: search key {key} is not one of its keys"


def test_search_block_never_reaches_the_method(tiny):
    from mu_runner.run import make_method
    cfg = tiny("method=salun")
    assert "search" in cfg.method
    module = make_method(cfg, net=torch.nn.Linear(2, 2))
    assert module.epochs == cfg.method.epochs


def test_the_sweepers_range_includes_its_end():
    """docs/tuning/README.md: `range(a, b)` in a `search:` block tries a..b, b included (Optuna's
    integer distribution), unlike Python's range."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    distributions, _ = create_params_from_overrides(["method.epochs=range(1, 3)"])
    dist = distributions["method.epochs"]
    assert (dist.low, dist.high, dist.step) == (1, 3, 1)


def test_tuning_table_lists_every_trial_best_first_with_its_knobs_and_seeds(tmp_path):
    """scripts/tuning_table.py (docs/tuning/<m>.md): known trials in, known rows out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tuning_table", Path(__file__).resolve().parents[1] / "scripts" / "tuning_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name, lr, epochs, seeds in (("a", "0.01", "2", [0.04, 0.02]), ("b", "0.003", "3", [0.01, 0.03])):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
            [f"method.optimizer.lr={lr}", f"method.epochs={epochs}", "experiment=tune", "method=salun"]))
        (tmp_path / name / "tune.json").write_text(json.dumps(
            {"objective": "acc_gap", "value": sum(seeds) / 2, "per_seed": [{"value": v} for v in seeds]}))
    rows = [line for line in table.markdown(tmp_path).splitlines() if line.startswith("| ")]
    assert rows == ["| epochs | optimizer.lr | objective % | per seed % |",
                    "| 3 | 0.003 | 2.00 | 1.00, 3.00 |",
                    "| 2 | 0.01 | 3.00 | 4.00, 2.00 |"]
