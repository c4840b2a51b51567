"""Numerical faults: a diverged model stops the run (who, step, value named; no metrics.json), tuning
scores it as diverged, and an original near chance is flagged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mu_runner.run as R
from mu_runner.errors import DivergedError
from mu_runner.methods.finetune import Finetune
from mu_runner.methods.original import Original
from mu_runner.outputs import near_chance, summary_table


def no_metrics(cfg) -> bool:
    return not list(Path(cfg.paths.output_dir).rglob("metrics.json"))


def test_grad_ascent_at_a_huge_lr_stops_before_its_stopping_rule_judges_the_destroyed_model(tiny, shared_cache):
    # step 1 leaves finite weights of 1e6; step 2's logits are NaN, on which stop_forget_acc used to fire
    cfg = tiny("method=grad_ascent", "method.optimizer.lr=1e6", f"paths.cache_dir={shared_cache}")
    with pytest.raises(DivergedError, match=r"^method grad_ascent diverged at step 2: network output = nan; "
                                            r"lower method.optimizer.lr$"):
        R.run(cfg)
    assert no_metrics(cfg)


def test_weights_that_turn_non_finite_behind_a_finite_loss_stop_the_run_before_the_stopping_rule(
        tiny, shared_cache, monkeypatch):
    def finite_loss_infinite_gradient(self, batch):
        x, _ = batch["retain"]
        p = next(self.net.parameters())
        return self.net(x).mean() * 0 + torch.sqrt((p - p.detach()).sum())  # 0, with d/dp = inf

    monkeypatch.setattr(Finetune, "unlearning_loss", finite_loss_infinite_gradient)
    cfg = tiny("callbacks.forget_target=0.5", "callbacks.target_every_n_steps=1", "reference=none",
               f"paths.cache_dir={shared_cache}")
    stage = R.build(cfg)
    with pytest.raises(DivergedError, match=r"^method finetune diverged: weights non-finite after step 1 "
                                            r"\(body\.\S+\); lower method.optimizer.lr$"):
        stage.fit()
    assert stage.stopper.checks == []  # the stopping rule never judged the destroyed model


def test_a_one_shot_edit_that_produces_nan_stops_the_run_before_the_stopping_rule(tiny, shared_cache, monkeypatch):
    def nan_edit(self):
        with torch.no_grad():
            self.net.body.get_classifier().weight.fill_(float("nan"))

    monkeypatch.setattr(Original, "edit", nan_edit)
    cfg = tiny("method=original", "callbacks.forget_target=0.5", "reference=none", f"paths.cache_dir={shared_cache}")
    stage = R.build(cfg)
    with pytest.raises(DivergedError, match=r"^method original diverged: weights non-finite after its edit "
                                            r"\(body\.fc\.weight\)$"):
        stage.fit()
    assert stage.stopper.checks == []
    with pytest.raises(DivergedError):
        R.run(cfg)
    assert no_metrics(cfg)


def test_an_original_training_that_diverges_names_it_and_caches_nothing(tiny, tmp_path):
    cfg = tiny("train.optimizer.lr=1e30", "reference=none")
    with pytest.raises(DivergedError, match=r"^original training diverged at step \d+: .* = (nan|inf|-inf); "
                                            r"lower train.optimizer.lr$"):
        R.run(cfg)
    assert no_metrics(cfg) and not list(Path(cfg.paths.cache_dir).rglob("*.safetensors"))


def test_a_tuning_trial_scores_a_diverged_seed_as_diverged_value(tiny, shared_cache):
    from mu_runner.tuning import tune
    cfg = tiny("experiment=tune", "tune.seeds=[0]", "method=grad_ascent", "method.optimizer.lr=1e6",
               f"paths.cache_dir={shared_cache}")
    assert tune(cfg) == 1.0  # tune.diverged_value
    trial = json.loads((Path(cfg.paths.output_dir) / "tune.json").read_text())
    assert trial["per_seed"][0]["diverged"].startswith("method grad_ascent diverged at step 2: network output = nan")
    assert no_metrics(cfg)


# -- an original near chance -------------------------------------------------------------------------------


@pytest.mark.parametrize("acc, classes, num, flagged", [
    (0.12, [3], 10, True),     # 9 retained classes: chance 0.111, threshold 0.167
    (0.46, [3], 10, False),    # one epoch of the tiny recipe on digits
    (0.25, [0, 1, 2, 3, 4], 10, True),  # 5 retained: chance 0.2, threshold 0.3
    (0.014, None, 100, True),  # CIFAR-100 untrained
    (0.65, None, 2, False),    # binary: threshold chance + 0.1 = 0.6, not 0.75
    (None, None, 10, None),
])
def test_near_chance_threshold(acc, classes, num, flagged):
    assert near_chance({"test_acc": acc}, num, classes)[0] is flagged


def test_an_untrained_original_is_flagged_in_the_log_metrics_json_and_table(tiny, tmp_path, caplog):
    probe = tiny()
    net = R.new_net(probe, R.load_data(probe))  # an untrained original, as a user's checkpoint
    ckpt = tmp_path / "untrained.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if k not in ("mean", "std")}, str(ckpt))
    cfg = tiny(f"original_checkpoint={ckpt}", "method=original", "reference=none")
    with caplog.at_level(logging.WARNING, logger="mu_runner"):
        R.run(cfg)
    m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert m["original_near_chance"] is True and m["original"]["test_acc"] < 1.5 / 9
    warning = [r.getMessage() for r in caplog.records if "near chance" in r.getMessage()]
    assert warning == [f"original is near chance: test accuracy {m['original']['test_acc']:.3f} (chance 0.111); "
                       "every unlearning number below compares untrained models"]
    assert summary_table(m).splitlines()[-1].startswith("WARNING: the original is near chance (test 0.")


def test_first_non_finite_names_the_tensor_and_passes_finite_weights_whose_norm_overflows():
    from mu_runner.callbacks.divergence import first_non_finite

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    assert first_non_finite(net) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            net[2].weight[1, 3] = bad
        assert first_non_finite(net) == "2.weight"
        with torch.no_grad():
            net[2].weight[1, 3] = 0.0
    net[1].running_var[2] = float("nan")  # a floating buffer counts too
    assert first_non_finite(net) == "1.running_var"
    net[1].running_var.fill_(1.0)
    with torch.no_grad():
        net[0].weight.fill_(3e37)  # finite, but the L1 norm of the fast path overflows: the exact check clears it
    assert first_non_finite(net) is None
