"""Every method in conf/method/*.yaml (picked up with no test edit) on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import METHODS

from mu_runner.errors import ConfigError
from mu_runner.run import _target_class, run

KEYS = {"forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "avg_gap",
        "unlearn_seconds", "original", "retrain", "layer_change", "feature_shift"}


@pytest.mark.parametrize("method", METHODS)
def test_method_forgets_two_classes_and_writes_valid_metrics(method, tiny, shared_cache):
    cfg = tiny(f"method={method}", "forget.k=2", f"paths.cache_dir={shared_cache}")
    flat = run(cfg)
    m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert set(m) >= KEYS and m["method"] == method and len(m["forget_classes"]) == 2
    assert all(0 <= m[k] <= 1 for k in ("forget_acc", "retain_acc", "test_acc", "mia_efficacy"))
    if method == "original":
        assert m["forget_acc"] == m["original"]["forget_acc"]
    else:
        assert flat["unlearned/forget_acc"] <= flat["original/forget_acc"] - 0.1, flat


@pytest.mark.parametrize("method", METHODS)
def test_method_handles_random_sample_forgetting(method, tiny, shared_cache):
    cfg = tiny(f"method={method}", "forget=random", "forget.fraction=0.1", f"paths.cache_dir={shared_cache}")
    if "random" not in _target_class(cfg.method).forget_kinds:  # class-level by design: a clear refusal
        with pytest.raises(ConfigError, match=r"forget=random: method .* handles forget=classes"):
            run(cfg)
        assert not Path(cfg.paths.output_dir, "metrics.json").exists()
        return
    run(cfg)
    m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert m["forget_classes"] is None and m["test_forget_acc"] is None
    assert m["n_forget"] == round(0.1 * (m["n_forget"] + m["n_retain"]))
    assert all(0 <= m[k] <= 1 for k in ("forget_acc", "retain_acc", "test_acc", "mia_efficacy"))
    assert m["avg_gap"] is not None and m["unlearn_seconds"] >= 0
