"""The one evaluator end to end on a tiny config: a stable population attack, the per-example attack
through `run()`, the eval group refused up front, and the evaluator as the only scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mu_runner.errors import ConfigError
from mu_runner.evaluation import Evaluator
from mu_runner.run import build, run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import TINY, compose_config
    stage = build(compose_config([*TINY, "reference=none"], tmp_path_factory.mktemp("eval")))
    stage.fit()
    return stage


def test_mia_efficacy_of_one_model_does_not_move_with_eval_mia_seed(fitted):
    s = fitted
    values = [Evaluator(s.data, s.split, {"mia_seed": seed}).score(s.module.net)["mia_efficacy"] for seed in range(20)]
    assert max(values) - min(values) <= 0.05
    assert all(0.0 <= v <= 1.0 for v in values)


def test_the_original_and_the_unlearned_model_are_scored_by_the_same_code(fitted):
    s = fitted
    result = s.evaluate()
    same = Evaluator(s.data, s.split, s.cfg.eval, s.cfg.seed)
    assert result.original == {**same.score(s.original), "avg_gap": None, "acc_gap": None,
                                "probe_forget_acc": result.original["probe_forget_acc"]}
    unlearned = same.score(s.module.net)
    assert {k: result.unlearned[k] for k in unlearned} == unlearned


@pytest.mark.parametrize("override, message", [
    ("eval.mia=foo", r"eval\.mia='foo': allowed confidence, entropy"),
    ("eval.umia=foo", r"eval\.umia='foo': allowed none, lira"),
    ("eval.embedding=foo", r"eval\.embedding='foo': allowed tsne, none"),
    ("eval.mia_draws=-1", r"eval\.mia_draws=-1"),
    ("eval.lira.shadows=1", r"eval\.lira\.shadows=1: allowed an integer >= 2"),
])
def test_bad_eval_settings_fail_before_anything_is_trained(tiny, override, message):
    cfg = tiny(override, *(["eval.umia=lira"] if override.startswith("eval.lira") else []))
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not Path(cfg.paths.cache_dir).exists() or not any(Path(cfg.paths.cache_dir).rglob("*.safetensors"))


def test_umia_lira_through_run_scores_every_model_and_caches_its_shadows(tiny, tmp_path):
    cfg = tiny("eval.umia=lira", "eval.lira.shadows=2", "train.epochs=1")
    m = run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for scores in (metrics, metrics["original"], metrics["retrain"]):
        assert 0.0 <= scores["umia_auc"] <= 1.0 and scores["umia_auc_se"] > 0
        assert scores["umia_n_forget"] == metrics["n_forget"]
    assert metrics["cache_hits"]["shadows"] is False
    assert set(metrics) - readme_keys() == set()  # the umia_* keys are documented too
    per_example = json.loads((Path(cfg.paths.output_dir) / "umia_scores.json").read_text())
    assert len(per_example["unlearned"]["forget"]) == metrics["n_forget"]
    assert len(list(Path(cfg.paths.cache_dir).glob("shadow/*.safetensors"))) == 2
    assert m["unlearned/umia_auc"] == metrics["umia_auc"]
    again = run(tiny("eval.umia=lira", "eval.lira.shadows=2", "train.epochs=1", "method=original",
                     f"paths.output_dir={tmp_path}/second"))
    second = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert second["cache_hits"]["shadows"] is True  # shared across methods: trained once
    assert again["original/umia_auc"] == pytest.approx(m["original/umia_auc"])


def readme_keys() -> set[str]:
    """The keys of README.md's metrics.json table (first column, in backticks)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## metrics.json"):text.index("## Adding a method")]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {k for row in rows for k in re.findall(r"`([a-z_0-9]+)`", row)}


def test_every_metrics_json_key_is_documented_in_the_readme(fitted):
    from mu_runner.outputs import assemble
    m = assemble(fitted, fitted.evaluate())
    assert set(m) - readme_keys() == set()
    assert {"method_config", "forget_kind", "prep_cached", "eval_seconds_during_unlearning", "epochs_run",
            "cache_hits", "acc_gap", "mia_auc", "git_commit"} <= set(m)


def test_metrics_json_names_the_code_and_settings_that_made_it(fitted, tmp_path):
    from mu_runner.outputs import assemble
    m = assemble(fitted, fitted.evaluate())
    from mu_runner import __version__
    assert m["mu_runner_version"] == __version__
    assert m["git_commit"] is None or len(m["git_commit"].removesuffix("+dirty")) == 40
    assert m["eval_settings"]["mia_draws"] == 0 and m["acc_gap"] is None  # reference=none
