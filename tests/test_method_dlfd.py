"""dlfd: OT on the perturbed features, D_f never a CE target, the monitor, Sinkhorn, loss-MIA metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config

from mu_runner.errors import ConfigError
from mu_runner.methods.dlfd import DLFD, chance_level, embed, ot_distance, pgd_delta
from mu_runner.methods.functional import sinkhorn_plan
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import predict
from mu_runner.models import build_classifier
from mu_runner.run import build, make_method

FAST = ("reference=none", "callbacks.eval_every_n_epochs=0", "method.pgd_steps=2", "method.batch_size=64",
        "method.forget_batch_size=16", "method.monitor_every=4")


def _fit(shared_cache, tmp, *overrides, forget_scores: list[float] | None = None):
    """A fitted tiny stage, with every CE call, perturbed batch and monitor call recorded.

    `forget_scores`: the FS each monitor call measures, in order (the loss-MIA is replaced), so that
    the stopping rule can be tested at known scores; digits' models hardly overfit and their real FS
    stays at chance.
    """
    log = {"ce_targets": [], "perturbed": [], "x_star": [], "monitor_modes": [], "steps": 0}
    real_ce, real_perturbed, real_monitor, real_step = F.cross_entropy, DLFD.perturbed, DLFD.monitor, torch.optim.SGD.step

    def ce(logits, target, *a, **k):
        log["ce_targets"].append(target.detach().clone())
        return real_ce(logits, target, *a, **k)

    def perturbed(self, x, y, xf):
        out = real_perturbed(self, x, y, xf)
        log["perturbed"].append(self.global_step)
        log["x_star"].append((x.clone(), out.clone()))
        return out

    def monitor(self):
        record = real_monitor(self)
        log["monitor_modes"].append(self.net.training)
        return record

    def step(self, *a, **k):
        log["steps"] += 1
        return real_step(self, *a, **k)

    stage = build(compose_config([*TINY, "method=dlfd", *FAST, f"paths.cache_dir={shared_cache}", *overrides], tmp))
    with pytest.MonkeyPatch.context() as mp:  # after build: the original may be trained there
        mp.setattr(F, "cross_entropy", ce)
        mp.setattr(DLFD, "perturbed", perturbed)
        mp.setattr(DLFD, "monitor", monitor)
        mp.setattr(torch.optim.SGD, "step", step)
        if forget_scores is not None:
            scores = iter(forget_scores)
            mp.setattr(MF, "mia_loss_acc", lambda *a, **k: 0.5 + next(scores))
        stage.fit()
    return stage, log


@pytest.fixture(scope="module")
def classwise(shared_cache, tmp_path_factory):
    # perturb while more than 15 % of the monitored forget samples are still right (here: until step 16)
    return _fit(shared_cache, tmp_path_factory.mktemp("dlfd_c"), "forget.k=2", "method.acc_threshold=0.15",
                "method.epochs=1")


def test_no_forget_sample_reaches_a_cross_entropy(classwise):
    stage, log = classwise
    targets = torch.cat(log["ce_targets"])
    assert len(log["ce_targets"]) > 0 and not torch.isin(targets, torch.tensor(stage.split.classes)).any()
    assert {len(t) for t in log["ce_targets"]} <= {64, len(stage.split.retain) % 64}  # retain batches only


def test_perturbed_inputs_stay_in_pixel_range_and_eps_ball(classwise):
    stage, log = classwise
    assert log["x_star"]
    for x, x_star in log["x_star"]:
        assert x_star.min() >= 0 and x_star.max() <= 1 and not x_star.requires_grad
        assert (x_star - x).abs().max() <= stage.module.epsilon + 1e-6
    assert any(not torch.equal(x, x_star) for x, x_star in log["x_star"])


def test_one_epoch_at_most_one_step_per_retain_batch(classwise):
    stage, log = classwise
    assert log["steps"] == stage.trainer.global_step == math.ceil(len(stage.split.retain) / 64)


def test_monitor_leaves_the_model_in_train_mode(classwise):
    _, log = classwise
    assert len(log["monitor_modes"]) >= 3 and all(log["monitor_modes"])


def test_perturbation_follows_the_monitor(classwise):
    stage, log = classwise
    history = stage.module.history
    assert [r["step"] for r in history[:3]] == [0, 4, 8]
    expected = [s for s in range(stage.trainer.global_step)
                if [r for r in history if r["step"] <= s][-1]["perturbing"]]
    assert log["perturbed"] == expected and expected  # perturbed exactly while the monitor said so
    assert len(expected) < stage.trainer.global_step  # ... and no longer once the class was forgotten
    assert stage.module.choices() == {"acc_threshold": 0.15, "perturbed_steps": len(expected),
                                      "selected_step": stage.module.selected_step}


def _assert_best_qualifying_state_restored(module, qualifies):
    ok = [r for r in module.history if r["step"] > 0 and qualifies(r)]
    assert ok, module.history  # deterministic on CPU: these tiny runs do reach a qualifying state
    best = max(ok, key=lambda r: r["val_acc"])
    assert module.best_acc == best["val_acc"] and module.selected_step == best["step"]
    state = module.net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in module.best.items())


def test_classwise_restores_the_best_validation_state_among_forgotten_ones(classwise):
    module = classwise[0].module
    _assert_best_qualifying_state_restored(module, lambda r: r["forget_acc"] <= module.acc_threshold)


def test_retain_weight_goes_linearly_from_w_r0_to_w_r1(classwise):
    module = classwise[0].module
    last = module.trainer.num_training_batches - 1
    assert module.retain_weight(0) == module.w_r0 and module.retain_weight(last) == module.w_r1
    assert module.retain_weight(last / 2) == pytest.approx((module.w_r0 + module.w_r1) / 2)


def test_evaluate_reports_loss_mia_forget_score_and_nomus(classwise):
    stage = classwise[0]
    after = stage.evaluator.score(stage.module.net)  # the scores metrics.json carries for the unlearned model
    assert 0 <= after["forget_score"] <= 0.5
    assert after["forget_score"] == abs(after["mia_loss_acc"] - 0.5)
    assert after["nomus"] == pytest.approx(0.5 * (after["test_acc"] + 1 - 2 * after["forget_score"]))


@pytest.fixture(scope="module")
def samplewise(shared_cache, tmp_path_factory):
    # FS <= 0.5 always: with fs_threshold 12 sigma (0.53 for n = 130) the stopping rule holds from the start
    return _fit(shared_cache, tmp_path_factory.mktemp("dlfd_r"), "forget=random", "forget.fraction=0.1",
                "method.fs_threshold=12")


def test_sample_forgetting_with_low_forget_score_never_perturbs(samplewise):
    stage, log = samplewise
    assert log["perturbed"] == [] and stage.trainer.global_step > 0
    assert all(not r["perturbing"] for r in stage.module.history)
    assert stage.module.choices()["perturbed_steps"] == 0


def test_samplewise_restores_the_best_validation_state_with_low_forget_score(samplewise):
    module = samplewise[0].module
    _assert_best_qualifying_state_restored(module, lambda r: r["forget_score"] <= module.fs_limits[1])


def test_thresholds_are_multiples_of_the_chance_level_of_the_monitored_sets(samplewise):
    module = samplewise[0].module
    n = min(len(module.sets["forget"]), len(module.sets["unseen"]))
    assert n == 130 and chance_level(n) == pytest.approx(0.5 / math.sqrt(130))  # 10 % of digits' pool; 143 val
    assert module.fs_units == "chance" and module.fs_limits == (12 * chance_level(130), module.fs_max * chance_level(130))
    assert chance_level(300) == pytest.approx(0.5 / math.sqrt(300))


# FS measured at steps 0, 4, 8, 12, 16, 19 (random 10 %: 19 retain batches of 64); in chance units
# (sigma = 0.0439 for n = 130) 2.73, 2.28, 1.37, 0.68, ... : above the card's nothing, above 2 sigma twice
DECLINING = [0.12, 0.10, 0.06, 0.03, 0.02, 0.02]


def test_recalibrated_thresholds_perturb_where_the_cards_absolute_ones_did_not(shared_cache, tmp_path):
    new, new_log = _fit(shared_cache, tmp_path / "new", "forget=random", "forget.fraction=0.1",
                        forget_scores=DECLINING)
    old, old_log = _fit(shared_cache, tmp_path / "old", "forget=random", "forget.fraction=0.1",
                        "method.fs_units=absolute", "method.fs_threshold=0.15", "method.fs_max=0.09",
                        forget_scores=DECLINING)
    threshold, fs_max = new.module.fs_limits
    assert 0.06 < threshold <= 0.10 and fs_max < 0.06  # the yaml's 2 and 1 sigma: below the card's 0.15 / 0.09
    assert [r["step"] for r in new.module.history] == [0, 4, 8, 12, 16, 19]
    assert new_log["perturbed"] == list(range(8))  # until the monitor at step 8 measured FS < threshold
    assert new.module.choices()["perturbed_steps"] == 8
    assert old_log["perturbed"] == [] and old.module.choices() == {
        "fs_threshold": 0.15, "fs_max": 0.09, "perturbed_steps": 0, "selected_step": old.module.selected_step}


# --------------------------------------------------------------------------- PGD and OT


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_classifier("test_resnet", 4, 1, 8, [0.5], [0.25]).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 8, 8, generator=gen), torch.randint(0, 4, (12,), generator=gen), \
        torch.rand(10, 1, 8, 8, generator=gen)


def test_logits_from_features_are_the_network_output(net, batch):
    x = batch[0]
    with torch.no_grad():
        assert torch.allclose(embed(net, x, "penultimate")[1], net(x), atol=1e-5)
        assert torch.equal(*embed(net, x, "logits"))


@pytest.mark.parametrize("feature", ["penultimate", "logits"])
def test_ot_alone_moves_delta_after_one_step(net, batch, feature):
    x, y, xf = batch
    with torch.no_grad():
        h_f = embed(net, xf, feature)[0]
    delta = pgd_delta(net, x, y, h_f, w_f=3.0, w_r=0.0, steps=1, step_size=0.05, epsilon=0.3, feature=feature)
    assert delta.abs().max() == pytest.approx(0.05) and (delta != 0).float().mean() > 0.5


def test_code_faithful_ot_on_clean_features_gives_delta_no_gradient(net, batch):
    """Regression guard for the public code's fault: OT of the clean batch is constant in δ."""
    x, y, xf = batch
    with torch.no_grad():
        h_f = embed(net, xf, "penultimate")[0]
    delta = pgd_delta(net, x, y, h_f, w_f=3.0, w_r=0.0, steps=3, step_size=0.05, epsilon=0.3, ot_on_clean=True)
    assert torch.equal(delta, torch.zeros_like(x))  # sign(0) = 0: the gradient was exactly 0
    d = torch.zeros_like(x, requires_grad=True)
    (g,) = torch.autograd.grad(ot_distance(embed(net, x + d, "penultimate")[0], h_f), d)
    assert g.abs().sum() > 0  # ... whereas OT on the perturbed features has one


def test_delta_respects_the_eps_ball(net, batch):
    x, y, xf = batch
    with torch.no_grad():
        h_f = embed(net, xf, "penultimate")[0]
    delta = pgd_delta(net, x, y, h_f, w_f=3.0, w_r=1.0, steps=4, step_size=0.05, epsilon=0.12)
    assert delta.abs().max() <= 0.12 + 1e-7


# --------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("n, m, seed", [(32, 32, 0), (64, 16, 1), (16, 64, 2), (32, 8, 3), (128, 128, 4)])
def test_sinkhorn_plan_marginals_match_uniform_weights(n, m, seed):  # batch-sized shapes (8 x 40 needs 100 rounds)
    gen = torch.Generator().manual_seed(seed)
    for cost in (2 * torch.rand(n, m, generator=gen),  # the cosine cost's range
                 (1 - F.cosine_similarity(torch.randn(n, 1, 16, generator=gen), torch.randn(1, m, 16, generator=gen), dim=2))):
        plan = sinkhorn_plan(cost)  # the card's ε 0.01, 50 rounds
        assert (plan >= 0).all() and plan.sum() == pytest.approx(1.0, abs=1e-4)
        assert (plan.sum(1) - 1 / n).abs().max() < 1e-2 and (plan.sum(0) - 1 / m).abs().max() < 1e-2


def test_sinkhorn_code_tolerance_stops_before_the_marginals_hold():
    """Why sinkhorn_tol defaults to 1e-3: the public 0.1 leaves rows off by about μ itself."""
    cost = 2 * torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    assert (sinkhorn_plan(cost, tol=0.1).sum(1) - 1 / 32).abs().max() > 1e-2


def test_sinkhorn_is_differentiable_through_the_cost_and_prefers_cheap_pairs():
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    plan = sinkhorn_plan(cost)
    assert torch.allclose(plan, torch.tensor([[0.5, 0.0], [0.0, 0.5]]), atol=1e-3)
    (grad,) = torch.autograd.grad((plan * cost).sum(), cost)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- metrics: loss-MIA, FS, NoMUS


def test_loss_mia_on_two_iid_halves_of_the_test_set_is_near_chance(classwise):
    stage, _ = classwise
    data = stage.data
    losses = MF.per_sample_loss(predict(stage.original, data.test_images), data.test_labels.cpu())
    perm = torch.randperm(len(losses), generator=torch.Generator().manual_seed(0))
    half = len(losses) // 2
    assert MF.forget_score(MF.mia_loss_acc(losses[perm[:half]], losses[perm[half:]])) < 0.1


def test_loss_mia_on_separable_losses_is_perfect():
    gen = torch.Generator().manual_seed(0)
    members, others = 0.1 * torch.rand(200, generator=gen), 1 + torch.rand(500, generator=gen)
    acc = MF.mia_loss_acc(members, others)
    assert acc == pytest.approx(1.0) and MF.forget_score(acc) == pytest.approx(0.5)


def test_loss_mia_balances_sets_and_needs_ten_samples_a_side():
    gen = torch.Generator().manual_seed(0)
    # 20 low-loss members vs 2000 high-loss non-members: balanced, it is still a perfect attack
    assert MF.mia_loss_acc(0.1 * torch.rand(20, generator=gen), 1 + torch.rand(2000, generator=gen)) == 1.0
    assert MF.mia_loss_acc(torch.rand(9), torch.rand(100)) is None and MF.forget_score(None) is None


def test_per_sample_loss_is_minus_log_true_class_probability_and_finite():
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    loss = MF.per_sample_loss(probs, torch.tensor([1, 1]))
    assert loss[0].item() == pytest.approx(-math.log(0.75)) and math.isfinite(loss[1].item()) and loss[1] > 80


@pytest.mark.parametrize("ta, fs, expected", [(0.9, 0.05, 0.9), (1.0, 0.0, 1.0), (0.0, 0.5, 0.0), (0.8, 0.5, 0.4)])
def test_nomus_formula(ta, fs, expected):
    assert MF.nomus(ta, fs) == pytest.approx(expected)
    assert MF.nomus(None, fs) is None and MF.nomus(ta, None) is None


@pytest.mark.parametrize("key, value", [("feature", "pixels"), ("epsilon", 1.5), ("monitor_samples", 5),
                                        ("pgd_steps", -1), ("sinkhorn_epsilon", 0), ("fs_units", "sigma")])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        make_method(tiny("method=dlfd", f"method.{key}={value}"), net=None)
