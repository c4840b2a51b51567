"""Loggers receive the same slash-named numbers as metrics.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mu_runner.errors import ConfigError
from mu_runner.run import run
from mu_runner.utils.wandb_files import offline_history, offline_run_info


def test_csv_logger_has_curves_and_final_scores(tiny):
    cfg = tiny("logger=csv")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    columns = set(rows[0])
    assert {"train/loss", "val/forget_acc", "unlearned/forget_acc", "original/forget_acc",
            "retrain/forget_acc", "summary/avg_gap", "summary/unlearn_seconds"} <= columns
    m = json.loads((out / "metrics.json").read_text())
    final = [r for r in rows if r["summary/avg_gap"]]
    assert float(final[-1]["summary/avg_gap"]) == pytest.approx(m["avg_gap"])
    assert sum(1 for r in rows if r["train/loss"]) >= 2  # a curve, not a point


def test_wandb_runs_offline_and_keeps_the_metrics_locally(tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny("logger=wandb", "eval.embedding=tsne")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    assert list(out.glob("wandb/offline-run-*"))
    history = offline_history(out)
    m = json.loads((out / "metrics.json").read_text())
    assert history["unlearned/forget_acc"][-1] == pytest.approx(m["forget_acc"])
    assert history["summary/avg_gap"][-1] == pytest.approx(m["avg_gap"])
    assert len(history["train/loss"]) >= 2
    assert history["layer_change/fc"][-1] == pytest.approx(m["layer_change"]["fc"])  # the study's numbers
    assert history["feature_shift_forget/layer4"][-1] == pytest.approx(m["feature_shift_forget"]["layer4"])
    assert history["summary/weight_change"][-1] == pytest.approx(m["weight_change"])
    assert history["summary/acc_gap"][-1] == pytest.approx(m["acc_gap"])
    assert len(history["original/train/loss"]) >= 2 and len(history["reference/train/loss"]) >= 2  # trained here
    info = offline_run_info(out)
    assert info[0]["name"] == "finetune-classes-k1-s0" and info[0]["job_type"] == "finetune"
    assert {"finetune", "digits", "test_resnet", "forget=classes"} <= set(info[0]["tags"])
    for plot in ("summary", "embedding"):  # the run's PNGs, as W&B images stored with the run
        assert history[f"plots/{plot}/count"] == [1]
        assert len(list(out.glob(f"wandb/offline-run-*/files/media/images/plots/{plot}_*.png"))) == 1


def test_tensorboard_logger_writes_event_files(tiny):
    cfg = tiny("logger=tensorboard")
    run(cfg)
    assert list(Path(cfg.paths.output_dir).rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next(Path(cfg.paths.output_dir).rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    events.Reload()
    assert "plots/summary" in events.Tags()["images"]  # the run's PNGs in TensorBoard's Images tab


def test_wandb_online_without_a_key_is_one_line_before_any_training(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setattr("mu_runner.run.get_original", lambda *a, **k: pytest.fail("trained before the key check"))
    from mu_runner.run import build
    with pytest.raises(ConfigError, match="needs a W&B API key"):
        build(tiny("logger=wandb"))


def test_run_names_say_method_forget_set_and_seed(tiny):
    from mu_runner.utils.loggers import run_name
    assert run_name(tiny("method=salun", "forget.classes=[4]")) == "salun-classes[4]-s0"
    assert run_name(tiny("method=salun", "forget=random", "seed=2")) == "salun-random10%-s2"
    assert run_name(tiny("forget.k=3", "seed=1")) == "finetune-classes-k3-s1"
