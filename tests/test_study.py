"""The removed-classes study on a hand-made sweep: known numbers -> known table, statistic, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mu_runner import study
from mu_runner.report import load_runs, main

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "fc")


def _run(root: Path, method: str, k: int, seed: int, change: float, per_stage: dict[str, float]) -> None:
    classes = list(range(k))
    m = {"method": method, "data": "digits", "backbone": "resnet18", "seed": seed, "forget_kind": "classes",
         "forget_classes": classes, "n_forget": 130 * k, "n_retain": 1300 - 130 * k,
         "forget_acc": 0.0, "retain_acc": 0.95 - 0.01 * k, "test_acc": 0.9, "test_forget_acc": 0.0,
         "mia_efficacy": 1.0, "avg_gap": 0.01, "unlearn_seconds": 1.0, "weight_change": change,
         "probe_forget_acc": 0.8, "original": {"forget_acc": 1.0},
         "retrain": {"forget_acc": 0.0, "retain_acc": 0.95, "test_acc": 0.9, "mia_efficacy": 1.0,
                     "probe_forget_acc": 0.1},
         "layer_change": per_stage,
         "feature_shift_retain": {"layer1": 0.001 * k, "layer4": 0.01 * k},
         "feature_shift_forget": {"layer1": 0.002 * k, "layer4": 0.05 * k}}
    d = root / f"method={method},k={k},seed={seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def sweep(tmp_path):
    """label-style: change = 0.1 k (+ seed noise), all in fc/layer4; reset-style: change falls with k."""
    root = tmp_path / "sweep"
    for k in (1, 2, 3, 4):
        for seed in (0, 1):
            noise = 0.001 * seed
            depth = {s: (i + 1) * 0.01 * k + noise for i, s in enumerate(STAGES)}  # grows with depth
            _run(root, "random_label", k, seed, 0.1 * k + noise, depth)
            flat = {s: 0.5 - 0.1 * k + noise for s in STAGES}
            _run(root, "weight_reset", k, seed, 0.5 - 0.1 * k + noise, flat)
    return root


def test_spearman_known_values():
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
    assert study.spearman([1, 2, 3, 4], [1, 3, 2, 4])[0] == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert math.isnan(study.spearman([1, 2, 3], [5, 5, 5])[0])  # constant: no statistic


def test_scaling_groups_need_two_values_of_k(sweep, tmp_path):
    rows = load_runs(sweep)
    assert set(study.scaling_groups(rows)) == {("digits", "resnet18", "random_label"), ("digits", "resnet18", "weight_reset")}
    only_k1 = [r for r in rows if r["k"] == 1]
    assert study.scaling_groups(only_k1) == {}


def test_study_states_the_trend_and_where_change_concentrates(sweep):
    rows = load_runs(sweep)
    text = study.markdown(rows, ["weight_change_vs_k.png"])
    label = text[text.index("### random_label"):text.index("### weight_reset")]
    reset = text[text.index("### weight_reset"):]
    # 0.1 k + 0.001 seed: monotone, but the two seeds of each k tie in k -> Spearman's ρ = 0.976 (Pearson of ranks)
    assert "Weight change increases with k (Spearman's ρ = +0.98, p < 0.001)" in label
    assert "Weight change decreases with k (Spearman's ρ = -0.98, p < 0.001)" in reset
    assert "- Per stage, Spearman's ρ(k, change): stem +0.98, layer1 +0.98," in label  # every stage (i+1)·0.01·k + noise
    assert "largest relative change is in fc" in label and "grows from earlier to later stages" in label
    assert "(Spearman's ρ(depth, change) = +1.00)." in label and "rho" not in text
    assert "is the same in every stage" in reset
    # the k = 2 row: weight change mean of 0.2 and 0.201 -> 20.1 ± 0.1 %; probe 80 % vs retrain's 10 %
    row = next(line for line in label.splitlines() if line.startswith("| 2 |"))
    assert row.startswith("| 2 | 2 | 20.1 ± 0.1 |") and "80.0 ± 0.0 (10.0)" in row
    # shift on retained classes: mean over (layer1, layer4) = (0.002 + 0.02)/2 = 1.1 % at k = 2
    assert "| 1.1 ± 0.0 |" in row


def test_report_cli_writes_study_plots_and_copies_them_next_to_the_markdown(sweep, tmp_path):
    md = tmp_path / "docs" / "study.md"
    assert main([str(sweep), "--md", str(md)]) == 0
    names = {"weight_change_vs_k.png", "feature_shift_vs_k.png", "accuracy_vs_k.png", "layer_heatmap.png"}
    assert {p.name for p in sweep.glob("*.png")} == names
    assert {p.name for p in (tmp_path / "docs" / "study").glob("*.png")} == names
    assert all((sweep / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert "](study/layer_heatmap.png)" in md.read_text()
    assert "](layer_heatmap.png)" in (sweep / "report.md").read_text()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert {r["k"] for r in rows} == {"1", "2", "3", "4"} and "layer_change/fc" in rows[0]


def test_report_uploads_one_offline_wandb_run(sweep, monkeypatch):
    from mu_runner.utils.wandb_files import offline_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep), "--wandb"]) == 0
    assert len(list((sweep / "wandb").glob("offline-run-*"))) == 1
    history = offline_history(sweep / "wandb")
    assert history["study/rho_weight_change/random_label"] == [pytest.approx(0.9759, abs=1e-4)]
    assert history["study/rho_weight_change/weight_reset"] == [pytest.approx(-0.9759, abs=1e-4)]
    assert history["summary_table/nrows"] == [16] and history["summary_table/_type"] == ["table-file"]
    for name in ("weight_change_vs_k", "feature_shift_vs_k", "accuracy_vs_k", "layer_heatmap"):
        assert history[f"plots/{name}/_type"] == ["image-file"]
    assert len(list((sweep / "wandb").rglob("media/images/plots/*.png"))) == 4  # the images travel with the run


def _sweep_params(experiment: str) -> tuple[dict, object]:
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params), cfg


def test_the_study_sweeps_live_in_yaml():
    params, cfg = _sweep_params("forget_scaling")
    assert params == {"forget.k": "1,2,3,4,5", "method": "random_label,weight_reset,salun", "seed": "0,1,2"}
    assert (cfg.data.name, cfg.backbone.name, cfg.forget.kind, str(cfg.hydra.mode)) == ("digits", "resnet18", "classes",
                                                                                      "RunMode.MULTIRUN")
    assert cfg.data.image_size == 16 and cfg.callbacks.forget_target == "retrain"  # equal forgetting, no 1x1 stage
    params, cfg = _sweep_params("forget_scaling_cifar100")
    assert params["forget.k"] == "1,5,10,20,50" and params["method"] == "random_label,weight_reset,salun"
    assert (cfg.data.name, cfg.backbone.name, cfg.trainer.accelerator) == ("cifar100", "resnet50", "gpu")


def test_study_command_line_adds_a_method_and_the_report_reads_the_sweep(tmp_path):
    """`experiment=forget_scaling method=...`: the command line replaces the yaml's sweep values."""
    import subprocess
    import sys

    from conftest import TINY

    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("method=")]
    res = subprocess.run([sys.executable, "-m", "mu_runner", "experiment=forget_scaling", *tiny, "train.epochs=1",
                          "forget.k=1,2", "method=original", "seed=0", "reference=none", "callbacks.forget_target=null",
                          f"paths.root_dir={tmp_path}", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert main([str(sweep)]) == 0
    rows = load_runs(sweep)
    assert sorted((r["method"], r["k"]) for r in rows) == [("original", 1), ("original", 2)]  # not the yaml's methods
    text = (sweep / "report.md").read_text()
    assert "### original on digits / test_resnet" in text and "| 2 | 1 | 0.0 ± 0.0 |" in text  # no change
    assert "Weight change: no statistic (constant or too few runs)." in text
    assert (sweep / "layer_heatmap.png").exists()
