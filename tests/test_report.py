"""The report on a hand-made sweep directory: known numbers in, known table out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from mu_runner.report import acc_gap, load_runs, main, markdown, privacy_markdown, scenario


def _write(root: Path, name: str, method: str, seed: int, forget_acc: float, gap: float, classes=(3,)) -> None:
    m = {"method": method, "data": "digits", "backbone": "resnet18", "seed": seed, "forget_kind": "classes",
         "forget_classes": list(classes), "n_forget": 130, "n_retain": 1160, "forget_acc": forget_acc,
         "retain_acc": 0.9, "test_acc": 0.8, "test_forget_acc": 0.0, "mia_efficacy": 1.0,
         "avg_gap": gap, "unlearn_seconds": 2.0, "original": {"forget_acc": 1.0}, "retrain": {"forget_acc": 0.0}}
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(m))


def test_report_gives_mean_and_std_over_seeds_per_method(tmp_path):
    _write(tmp_path, "a", "salun", 0, 0.10, 0.02)
    _write(tmp_path, "b", "salun", 1, 0.30, 0.04)
    _write(tmp_path, "c", "finetune", 0, 0.50, 0.10)
    (tmp_path / "unfinished").mkdir()  # a job without metrics.json is not a run
    rows = load_runs(tmp_path)
    assert len(rows) == 3
    table = markdown(rows)
    assert "### digits / resnet18 / classes k=1" in table
    salun = next(line for line in table.splitlines() if line.startswith("| salun"))
    # forget acc mean 20 %, sample std of (10, 30) = 14.14 %; gap mean 3 %, std 1.41 %
    assert "| 2 | 20.00 ± 14.14 |" in salun and "3.00 ± 1.41" in salun
    finetune = next(line for line in table.splitlines() if line.startswith("| finetune"))
    assert "50.00 ± 0.00" in finetune


def test_report_cli_writes_summary_csv_and_markdown(tmp_path):
    _write(tmp_path / "sweep", "a", "salun", 0, 0.1, 0.02)
    out = tmp_path / "docs" / "table.md"
    assert main([str(tmp_path / "sweep"), "--md", str(out)]) == 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "summary.csv").open()))
    assert rows[0]["method"] == "salun" and float(rows[0]["retrain/forget_acc"]) == 0.0
    assert out.read_text() == (tmp_path / "sweep" / "report.md").read_text()


def test_report_on_an_empty_directory_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_scenario_labels():
    assert scenario({"forget_classes": [1, 2], "n_forget": 2, "n_retain": 8}) == "classes k=2"
    assert scenario({"forget_classes": None, "forget_kind": "random", "n_forget": 10, "n_retain": 90}) == "random 10%"
    assert scenario({"forget_classes": None, "forget_kind": "indices", "n_forget": 4, "n_retain": 96}) == "indices n=4"


def test_acc_gap_is_avg_gap_without_the_mia_term():
    m = {"forget_acc": 0.1, "retain_acc": 0.9, "test_acc": 0.8, "mia_efficacy": 0.0,
         "retrain": {"forget_acc": 0.0, "retain_acc": 0.95, "test_acc": 0.8, "mia_efficacy": 1.0}}
    assert acc_gap(m) == pytest.approx((0.1 + 0.05 + 0.0) / 3)
    assert acc_gap({**m, "retrain": None}) is None  # no reference, no gap


def test_report_lists_jobs_that_ended_with_an_error(tmp_path):
    _write(tmp_path, "a", "salun", 0, 0.1, 0.02)
    for name in ("b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "error.txt").write_text("ConfigError: forget=random: method Mnemonic handles forget=classes only\n")
    assert main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "2 jobs ended with an error (no metrics.json):" in text
    assert "- 2 × `ConfigError: forget=random: method Mnemonic handles forget=classes only`" in text


def test_runs_that_missed_the_forget_target_and_one_by_one_stages_are_marked():
    from mu_runner.report import capped, warnings
    from mu_runner.study import _reached
    runs = [{"reached_target": True}, {"reached_target": False}, {"reached_target": True}]
    assert capped(runs) == " ⚠ 1/3 missed the forget target" and capped(runs[:1]) == ""
    assert _reached(runs) == "2/3 ⚠" and _reached(runs[:1]) == "1/1" and _reached([{}]) == "–"
    assert "layer4" in warnings([{"one_by_one": "layer4"}, {"one_by_one": ""}]) and warnings([{}]) == ""


def test_baseline_table_puts_each_method_beside_the_other_sweep(tmp_path):
    """--baseline: per method in both sweeps, mean acc gap of each and their difference; a method
    only one sweep has gets no row; an empty baseline is an error."""
    def put(root, name, method, seed, forget_acc, gap):
        _write(root, name, method, seed, forget_acc, 0.0)
        path = root / name / "metrics.json"
        m = json.loads(path.read_text())
        path.write_text(json.dumps({**m, "acc_gap": gap}))

    put(tmp_path / "hand", "a", "salun", 3, 0.10, 0.06)
    put(tmp_path / "hand", "b", "salun", 4, 0.30, 0.04)
    put(tmp_path / "hand", "c", "ssd", 3, 0.0, 0.01)
    put(tmp_path / "tuned", "a", "salun", 3, 0.0, 0.01)
    put(tmp_path / "tuned", "b", "salun", 4, 0.0, 0.03)
    put(tmp_path / "tuned", "c", "finetune", 3, 0.0, 0.02)
    out = tmp_path / "t.md"
    assert main([str(tmp_path / "tuned"), "--baseline", str(tmp_path / "hand"), "--baseline-name", "hand-set",
                 "--md", str(out)]) == 0
    text = out.read_text()
    assert "## Against hand-set" in text
    rows = [line for line in text.split("## Against hand-set")[1].splitlines() if line.startswith("| digits")]
    assert rows == ["| digits / resnet18 / classes k=1 | salun | 2 / 2 | 5.00 | 2.00 | -3.00 | 20.00 → 0.00 "
                    "| 90.00 → 90.00 | 80.00 → 80.00 |"]
    assert main([str(tmp_path / "tuned"), "--baseline", str(tmp_path / "nothing")]) == 2


def test_privacy_markdown_means_each_attack_number_over_seeds_in_percent():
    """Known answer: two seeds' U-LiRA AUC 0.6 and 0.7 -> 65.0; the standard error and the original's
    train - test gap likewise; a missing retrain AUC prints as a dash."""
    def run(seed, auc, se, tpr1, tpr5):
        return {"data": "digits", "backbone": "resnet18", "scenario": "classes k=1", "method": "finetune",
                "seed": seed, "umia_auc": auc, "umia_auc_se": se, "umia_tpr_at_1pct_fpr": tpr1,
                "umia_tpr_at_5pct_fpr": tpr5, "umia_n_forget": 30, "umia_n_unseen": 60,
                "original/umia_auc": 0.9, "original/retain_acc": 1.0, "original/test_acc": 0.8}
    table = privacy_markdown([run(0, 0.6, 0.02, 0.01, 0.05), run(1, 0.7, 0.04, 0.03, 0.15)])
    row = [line for line in table.splitlines() if line.startswith("| classes k=1")]
    assert row == ["| classes k=1 | finetune | 2 | 30 / 60 | 65.0 ± 3.0 | 2.0 | 10.0 | 90.0 | – | 20.0 |"]
    assert privacy_markdown([{**run(0, 0.6, 0.02, 0.01, 0.05), "umia_auc": None}]) == ""
