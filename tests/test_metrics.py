"""Metric functions and the evaluation suite against known answers (hand-made models, no training)."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit, class_split
from mu_runner.data.sources import ImageSet, Source
from mu_runner.evaluation import Evaluator
from mu_runner.evaluation.features import feature_shift, stage_features
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import stratified_subset


def evaluate(net, data, split, **settings):
    """The one evaluator's metric suite, as every model of a run is scored."""
    return Evaluator(data, split, settings).score(net)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- accuracy


def test_accuracy_known_value():
    assert MF.accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])) == 0.75


def test_accuracy_is_the_plain_fraction_correct_for_any_label_set():
    """torchmetrics' micro average = count of hits / n, also when a class is absent from one side."""
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (7, 3), (1000, 100)]:
        p, y = torch.randint(0, k, (n,), generator=g), torch.randint(0, k, (n,), generator=g)
        assert MF.accuracy(p, y) == pytest.approx((p == y).sum().item() / n, abs=1e-6)
    assert MF.accuracy(torch.tensor([9, 9]), torch.tensor([9, 3])) == 0.5  # only high class ids present


def test_accuracy_of_empty_set_is_none():
    assert MF.accuracy(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)) is None


# --------------------------------------------------------------------------- linear CKA


@pytest.fixture(scope="module")
def feats():
    return torch.randn(200, 6, generator=_gen(1))


def test_cka_of_identical_features_is_one(feats):
    assert MF.linear_cka(feats, feats) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_rotation_and_isotropic_scaling(feats):
    feats = feats.double()  # float64 throughout, so the rotation itself adds no rounding error
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=_gen(2), dtype=torch.float64))
    other = torch.randn(200, 6, generator=_gen(3), dtype=torch.float64) + 0.5 * feats
    base = MF.linear_cka(feats, other)
    assert MF.linear_cka(feats @ q, other) == pytest.approx(base, abs=1e-10)
    assert MF.linear_cka(feats * 3.7, other) == pytest.approx(base, abs=1e-10)
    assert MF.linear_cka(feats @ q * 0.01, other @ q.T * 50) == pytest.approx(base, abs=1e-10)
    assert MF.linear_cka(feats, feats @ q * 2.0) == pytest.approx(1.0, abs=1e-10)


def test_cka_centers_features(feats):
    """An offset added to every sample changes nothing (a missing centering would)."""
    assert MF.linear_cka(feats, feats + 5.0) == pytest.approx(1.0, abs=1e-10)


def test_cka_not_invariant_to_anisotropic_scaling(feats):
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 30.0])
    assert MF.linear_cka(feats, feats * scale) < 0.9


def test_cka_of_independent_noise_is_small():
    x = torch.randn(500, 10, generator=_gen(4))
    y = torch.randn(500, 10, generator=_gen(5))
    assert 0 <= MF.linear_cka(x, y) < 0.2


def test_cka_is_symmetric(feats):
    other = torch.randn(200, 4, generator=_gen(6)) + feats[:, :4]
    assert MF.linear_cka(feats, other) == pytest.approx(MF.linear_cka(other, feats), abs=1e-12)


def test_cka_flattens_conv_features_and_lies_in_unit_interval():
    x = torch.randn(50, 2, 3, 3, generator=_gen(7))
    y = torch.randn(50, 5, generator=_gen(8))
    value = MF.linear_cka(x, y)
    assert 0.0 <= value <= 1.0
    assert MF.linear_cka(x, x.flatten(1)) == pytest.approx(1.0, abs=1e-12)


# --------------------------------------------------------------------------- weight change


def test_relative_change_zero_for_identical_weights():
    w = {"a": torch.randn(3, 3, generator=_gen(0)), "b": torch.randn(5, generator=_gen(1))}
    assert MF.relative_change(w, {k: v.clone() for k, v in w.items()}) == {"a": 0.0, "b": 0.0}


def test_relative_change_known_value():
    assert MF.relative_change({"w": torch.ones(4)}, {"w": 2 * torch.ones(4)}) == {"w": pytest.approx(1.0)}
    # ||(1,1,1,1) - (1,1,1,3)|| / ||(1,1,1,1)|| = 2 / 2
    after = torch.tensor([1.0, 1.0, 1.0, 3.0])
    assert MF.relative_change({"w": torch.ones(4)}, {"w": after})["w"] == pytest.approx(1.0)


def test_relative_change_skips_tensors_missing_after():
    out = MF.relative_change({"a": torch.ones(2), "b": torch.ones(2)}, {"a": torch.zeros(2)})
    assert out == {"a": pytest.approx(1.0)}


def test_grouped_change_pools_squared_norms_within_a_group():
    before = {"a.w": torch.ones(4), "a.b": torch.full((2,), 2.0), "c.w": torch.full((3,), 2.0)}
    after = {"a.w": torch.full((4,), 2.0), "a.b": torch.full((2,), 2.0), "c.w": torch.zeros(3)}
    out = MF.grouped_change(before, after, lambda name: name.split(".")[0])
    assert list(out) == ["a", "c"]
    # group a: sum ||dW||^2 = 4 + 0, sum ||W||^2 = 4 + 8  ->  sqrt(4 / 12)
    assert out["a"] == pytest.approx(math.sqrt(4 / 12))
    assert out["a"] != pytest.approx(0.5)  # not the mean of the per-tensor changes (1 and 0)
    assert out["c"] == pytest.approx(1.0)


def test_grouped_change_with_one_tensor_per_group_equals_relative_change():
    gen = _gen(3)
    before = {f"l{i}": torch.randn(5, generator=gen) for i in range(3)}
    after = {k: v + torch.randn(5, generator=gen) for k, v in before.items()}
    grouped = MF.grouped_change(before, after, lambda n: n)
    rel = MF.relative_change(before, after)
    assert grouped == pytest.approx(rel, rel=1e-9)


# --------------------------------------------------------------------------- avg_gap


UNLEARNED = {"forget_acc": 0.9, "retain_acc": 0.95, "test_acc": 0.85, "mia_efficacy": 0.2,
             "test_forget_acc": 0.5}
RETRAIN = {"forget_acc": 0.1, "retain_acc": 0.97, "test_acc": 0.88, "mia_efficacy": 0.9,
           "test_forget_acc": 0.0}


def test_avg_gap_to_itself_is_zero():
    assert MF.avg_gap(RETRAIN, RETRAIN) == 0.0


def test_avg_gap_known_value_over_the_four_keys():
    # |0.9-0.1| + |0.95-0.97| + |0.85-0.88| + |0.2-0.9| = 0.8 + 0.02 + 0.03 + 0.7; test_forget_acc unused
    assert MF.avg_gap(UNLEARNED, RETRAIN) == pytest.approx(1.55 / 4)
    assert MF.avg_gap(RETRAIN, UNLEARNED) == pytest.approx(1.55 / 4)


@pytest.mark.parametrize("unlearned, retrain", [
    (UNLEARNED, None),
    (UNLEARNED, {}),
    ({**UNLEARNED, "mia_efficacy": None}, RETRAIN),
    (UNLEARNED, {**RETRAIN, "forget_acc": None}),
    (UNLEARNED, {k: v for k, v in RETRAIN.items() if k != "test_acc"}),
])
def test_avg_gap_is_none_without_reference_or_with_missing_value(unlearned, retrain):
    assert MF.avg_gap(unlearned, retrain) is None


# --------------------------------------------------------------------------- MIA efficacy


def _uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=_gen(seed))


MEMBERS = _uniform(200, 0.9, 1.0, 10)
NON_MEMBERS = _uniform(250, 0.0, 0.5, 11)


def test_mia_calls_non_member_like_targets_forgotten():
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, _uniform(100, 0.0, 0.5, 12)) > 0.9


def test_mia_calls_member_like_targets_remembered():
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, _uniform(100, 0.9, 1.0, 13)) < 0.1


def test_mia_is_a_fraction_tracking_the_mixture():
    target = torch.cat([_uniform(30, 0.0, 0.5, 14), _uniform(70, 0.9, 1.0, 15)])
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, target) == pytest.approx(0.3, abs=0.05)


def test_mia_none_for_empty_target_or_shadow():
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, torch.empty(0)) is None
    assert MF.mia_efficacy(torch.empty(0), NON_MEMBERS, MEMBERS) is None
    assert MF.mia_efficacy(MEMBERS, torch.empty(0), MEMBERS) is None


def test_mia_same_seed_same_value():
    target = _uniform(100, 0.4, 0.95, 16)
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, target, seed=3, draws=1) == \
        MF.mia_efficacy(MEMBERS, NON_MEMBERS, target, seed=3, draws=1)


@pytest.mark.parametrize("draws", [0, 1, 5])
def test_mia_known_answers_hold_for_every_fitting_mode(draws):
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, _uniform(100, 0.0, 0.5, 12), draws=draws) > 0.9
    assert MF.mia_efficacy(MEMBERS, NON_MEMBERS, _uniform(100, 0.9, 1.0, 13), draws=draws) < 0.1


def _same_distribution(seed: int):
    """Members and non-members from one distribution (a model that does not overfit), unequal sizes."""
    return _uniform(900, 0.5, 1.0, seed), _uniform(300, 0.5, 1.0, seed + 1), _uniform(150, 0.5, 1.0, seed + 2)


def test_stable_mia_on_identical_distributions_is_about_half_and_ignores_the_seed():
    members, nonmembers, target = _same_distribution(20)
    values = [MF.mia_efficacy(members, nonmembers, target, seed=s) for s in range(20)]
    assert max(values) == min(values)  # no draw: the seed cannot move it
    assert 0.3 <= values[0] <= 0.7  # balanced class weights: no side favoured by its size


def test_salun_single_draw_moves_with_the_seed_where_the_stable_fit_does_not():
    # the failure the stable fit removes: on indistinguishable sides one draw decides the verdict
    members, nonmembers, target = _same_distribution(30)
    drawn = [MF.mia_efficacy(members, nonmembers, target, seed=s, draws=1) for s in range(20)]
    assert max(drawn) - min(drawn) > 0.05


def test_mia_unbalanced_sides_without_class_weights_would_call_everything_a_member():
    # 900 members vs 300 non-members from one distribution: an unweighted SVC says "member" nearly
    # everywhere; the balanced fit must not (this is why class_weight="balanced")
    members, nonmembers, target = _same_distribution(40)
    assert MF.mia_efficacy(members, nonmembers, target) > 0.25


def test_mia_quantile_summary_keeps_the_verdict_on_large_sides():
    big_in, big_out = _uniform(20000, 0.9, 1.0, 50), _uniform(20000, 0.0, 0.5, 51)
    assert MF.mia_efficacy(big_in, big_out, _uniform(100, 0.0, 0.5, 52), max_samples=500) > 0.9
    q = MF.quantiles(torch.arange(1000.0), 10)
    assert q.tolist() == [50.0, 150.0, 250.0, 350.0, 450.0, 550.0, 650.0, 750.0, 850.0, 950.0]


def test_roc_auc_known_values():
    assert MF.roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert MF.roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert MF.roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0])) == 0.25
    assert MF.roc_auc(torch.ones(5), torch.ones(7)) == 0.5  # ties count half
    assert MF.roc_auc(torch.empty(0), torch.ones(3)) is None


def test_auc_standard_error_known_value_and_shrinks_with_n():
    # Hanley & McNeil at AUC 0.5: Q1 = 1/3, Q2 = 1/3 -> var = (0.25 + (m-1)/12 + (n-1)/12) / (m n)
    assert MF.auc_standard_error(0.5, 10, 10) == pytest.approx(math.sqrt((0.25 + 18 / 12) / 100))
    assert MF.auc_standard_error(0.5, 1000, 1000) < MF.auc_standard_error(0.5, 10, 10)


def test_tpr_at_fpr_known_values():
    members = torch.tensor([10.0, 9.0, 0.985, 0.5])
    nonmembers = torch.arange(100.0) / 100  # 0.00 .. 0.99
    assert MF.tpr_at_fpr(members, nonmembers, 0.0) == 0.5  # above every non-member: 2 of 4
    assert MF.tpr_at_fpr(members, nonmembers, 0.01) == 0.75  # threshold 0.985 lets 0.99 by
    assert MF.tpr_at_fpr(members, nonmembers, 0.5) == 1.0


# --------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("k", [2, 7, 10])
def test_entropy_of_uniform_is_log_k(k):
    assert MF.entropy(torch.full((3, k), 1.0 / k)) == pytest.approx([math.log(k)] * 3, abs=1e-6)


def test_entropy_of_one_hot_is_zero_and_finite():
    out = MF.entropy(F.one_hot(torch.tensor([0, 3, 4]), 5).float())
    assert torch.isfinite(out).all()
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_entropy_known_value_for_two_point_distribution():
    assert float(MF.entropy(torch.tensor([[0.25, 0.75]]))[0]) == pytest.approx(
        -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


# --------------------------------------------------------------------------- stratified_subset


@pytest.mark.parametrize("n", [1, 7, 50, 123])
def test_stratified_subset_returns_n_sorted_unique_valid_indices(n):
    labels = torch.randint(0, 5, (200,), generator=_gen(0))
    idx = stratified_subset(labels, n, seed=1)
    assert len(idx) == n
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert int(idx.min()) >= 0 and int(idx.max()) < 200


@pytest.mark.parametrize("k, per_class, n", [(10, 30, 50), (10, 30, 17), (4, 25, 33), (3, 11, 5)])
def test_stratified_subset_balanced_classes_within_one_of_proportional(k, per_class, n):
    labels = (torch.arange(k * per_class) % k)[torch.randperm(k * per_class, generator=_gen(2))]
    counts = torch.bincount(labels[stratified_subset(labels, n, seed=4)], minlength=k)
    assert (counts.double() - n / k).abs().max() <= 1.0


def test_stratified_subset_seeded():
    labels = torch.randint(0, 5, (300,), generator=_gen(0))
    a = stratified_subset(labels, 40, seed=2)
    assert torch.equal(a, stratified_subset(labels, 40, seed=2))
    assert not torch.equal(a, stratified_subset(labels, 40, seed=3))


@pytest.mark.parametrize("n", [20, 21, 100])
def test_stratified_subset_n_at_least_len_returns_everything(n):
    labels = torch.randint(0, 3, (20,), generator=_gen(0))
    assert torch.equal(stratified_subset(labels, n), torch.arange(20))


def test_stratified_subset_unbalanced_classes_within_one_of_proportional():
    labels = torch.tensor([0] * 5 + [1] * 4 + [2] * 5)
    counts = torch.bincount(labels[stratified_subset(labels, 4, seed=0)], minlength=3)
    expected = 4 * torch.tensor([5, 4, 5]) / 14
    assert (counts.double() - expected).abs().max() <= 1.0


# --------------------------------------------------------------------------- stage features / shift


STAGES = ["conv1", "conv2", "fc"]


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 6, 3, padding=1), bn=nn.BatchNorm2d(6), relu1=nn.ReLU(),
        conv2=nn.Conv2d(6, 6, 3, padding=1), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(6, 4)))


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=_gen(9))


def test_stage_features_are_pooled_per_channel(images):
    feats = stage_features(_net(), STAGES, images, batch_size=20)  # several chunks
    assert {s: tuple(f.shape) for s, f in feats.items()} == {"conv1": (64, 6), "conv2": (64, 6), "fc": (64, 4)}


def test_stage_features_match_a_direct_forward_pass(images):
    net = _net().eval()
    with torch.no_grad():
        direct = net.conv1(images.float() / 255).mean((2, 3))
    feats = stage_features(net, ["conv1"], images, batch_size=20)
    assert torch.allclose(feats["conv1"], direct, atol=1e-6)


def test_feature_shift_of_a_model_against_itself_is_zero(images):
    net = _net()
    shift = feature_shift(net, net, STAGES, images)
    assert list(shift) == STAGES
    assert all(abs(v) < 1e-9 for v in shift.values())


def test_feature_shift_appears_at_the_rerandomised_stage_and_after(images):
    net = _net(0)
    other = copy.deepcopy(net)
    torch.manual_seed(123)
    other.conv2.reset_parameters()
    shift = feature_shift(net, other, STAGES, images)
    assert abs(shift["conv1"]) < 1e-9
    assert shift["conv2"] > 1e-3
    assert shift["fc"] > 1e-3


@pytest.mark.parametrize("training", [True, False])
def test_stage_features_restore_mode_and_leave_batchnorm_stats_alone(images, training):
    net = _net().train(training)
    stats = net.bn.running_mean.clone()
    stage_features(net, STAGES, images)
    assert all(m.training == training for m in net.modules())
    assert torch.equal(net.bn.running_mean, stats)  # ran in eval mode, not with batch statistics


def test_stage_features_removes_its_hooks(images):
    net = _net()
    stage_features(net, STAGES, images)
    assert all(not m._forward_hooks for m in net.modules())


# --------------------------------------------------------------------------- evaluate


K = 4


def _labelled_source(train_per_class: int = 10, test_per_class: int = 5) -> Source:
    """Images whose pixel [0, 0, 0] holds the class id (the rest is noise)."""
    def image_set(per_class: int, seed: int) -> ImageSet:
        labels = (torch.arange(K * per_class) % K)[torch.randperm(K * per_class, generator=_gen(seed))]
        images = torch.randint(0, 256, (len(labels), 1, 4, 4), dtype=torch.uint8, generator=_gen(seed + 1))
        images[:, 0, 0, 0] = labels.to(torch.uint8)
        return ImageSet(images, labels)
    return Source(image_set(train_per_class, 0), image_set(test_per_class, 5), [str(i) for i in range(K)])


class Oracle(nn.Module):
    """Large logit for the class encoded in pixel [0, 0, 0]."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # evaluation reads the device off a parameter

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return F.one_hot(cls, K).float() * 20 + self.dummy


class AlwaysZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.tensor([20.0] + [0.0] * (K - 1)).expand(len(x), K) + self.dummy


@pytest.fixture(scope="module")
def data():
    return InMemoryData(_labelled_source(), val_fraction=0.2, split_seed=0, augment={})


def test_evaluate_oracle_scores_perfectly(data):
    split = class_split(data.labels, data.pool, [2])
    out = evaluate(Oracle(), data, split)
    assert set(out) == {"forget_acc", "retain_acc", "test_acc", "test_forget_acc", "mia_efficacy", "mia_auc",
                        "mia_loss_acc", "forget_score", "nomus"}
    assert out["forget_acc"] == out["retain_acc"] == out["test_acc"] == out["test_forget_acc"] == 1.0


def test_evaluate_constant_predictor_known_accuracies(data):
    # 10 train samples per class, 2 to validation -> 8 per class in the pool; 5 test per class
    split = class_split(data.labels, data.pool, [2])
    assert len(split.forget) == 8 and len(split.retain) == 24
    out = evaluate(AlwaysZero(), data, split)
    assert out["forget_acc"] == 0.0
    assert out["retain_acc"] == pytest.approx(8 / 24)
    assert out["test_acc"] == pytest.approx(5 / 15)  # forgotten class 2 excluded from test_acc
    assert out["test_forget_acc"] == 0.0


def test_evaluate_constant_predictor_forgetting_the_predicted_class(data):
    split = class_split(data.labels, data.pool, [0])
    out = evaluate(AlwaysZero(), data, split)
    assert out["forget_acc"] == 1.0 and out["test_forget_acc"] == 1.0
    assert out["retain_acc"] == 0.0 and out["test_acc"] == 0.0


def test_evaluate_sample_forgetting_has_no_test_forget_acc_and_uses_whole_test_set(data):
    split = ForgetSplit(data.pool[:5], data.pool[5:], None)
    out = evaluate(AlwaysZero(), data, split)
    assert out["test_forget_acc"] is None
    assert out["test_acc"] == pytest.approx(5 / 20)
    assert out["forget_acc"] == pytest.approx(float((data.labels[data.pool[:5]] == 0).float().mean()))


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_model_mode(data, training):
    net = Oracle().train(training)
    evaluate(net, data, class_split(data.labels, data.pool, [1]))
    assert net.training == training


# --------------------------------------------------------------------------- study metrics (CKA, probe)


def test_cka_hand_computed_value():
    """X = the 4 points (±1, 0), (0, ±1); Y = X's first column: ‖YᵀX‖² = 4, ‖XᵀX‖ = √8, ‖YᵀY‖ = 2."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert MF.linear_cka(x, x[:, :1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_cka_of_independent_features_is_near_zero():
    x, y = torch.randn(4000, 3, generator=_gen(7)), torch.randn(4000, 3, generator=_gen(8))
    assert MF.linear_cka(x, y) < 0.01


def test_total_change_is_the_norm_ratio_over_all_tensors():
    before = {"a": torch.ones(3), "b": torch.zeros(4)}
    after = {"a": torch.ones(3), "b": torch.full((4,), 0.5)}
    assert MF.total_change(before, after) == pytest.approx(math.sqrt(4 * 0.25 / 3))
    assert MF.total_change(before, before) == 0.0


def test_probe_is_perfect_on_separable_features_and_chance_on_indistinguishable_ones():
    centres = torch.eye(3) * 10
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.1 * torch.randn(60, 3, generator=_gen(2))
    assert MF.linear_probe_accuracy(x[:30], y[:30], x[30:], y[30:]) == 1.0
    # each test point appears twice, labelled 0 and 1: one prediction per point, so exactly half are right
    pts = torch.randn(10, 3, generator=_gen(3))
    x2, y2 = torch.cat([pts, pts]), torch.cat([torch.zeros(10), torch.ones(10)]).long()
    assert MF.linear_probe_accuracy(x2, y2, x2, y2) == 0.5
    assert MF.linear_probe_accuracy(x, y, x[:0], y[:0]) is None


class OracleFeatures(Oracle):
    def features(self, x):
        return self(x)


def test_probe_forget_acc_reads_the_forgotten_classes_on_a_held_out_half(data):
    from mu_runner.evaluation.features import probe_forget_acc
    from mu_runner.metrics.scoring import half_split

    fit, score = half_split(data.test_labels, seed=0)
    assert len(set(fit.tolist()) & set(score.tolist())) == 0 and len(fit) + len(score) == len(data.test_labels)
    for c in range(K):  # stratified: each class split in halves
        n = int((data.test_labels == c).sum())
        assert int((data.test_labels[fit] == c).sum()) == n // 2
    assert probe_forget_acc(OracleFeatures(), data, [2], seed=0) == 1.0
    assert probe_forget_acc(OracleFeatures(), data, None) is None  # sample forgetting: no forgotten class


def test_shift_subsets_separate_forget_and_retain_images(data):
    from mu_runner.evaluation.features import shift_subsets

    split = class_split(data.labels, data.pool, [1])
    sub = shift_subsets(data, split, n=100)
    cls = {name: set((x[:, 0, 0, 0]).tolist()) for name, x in sub.items()}  # pixel [0,0,0] = class
    assert cls == {"forget": {1}, "retain": {0, 2, 3}}
    samples = ForgetSplit(data.pool[:4], data.pool[4:], None)
    sub = shift_subsets(data, samples, n=100)
    assert len(sub["forget"]) == len(sub["retain"]) == 4
    assert torch.equal(sub["forget"], data.images[data.pool[:4]])  # sample forgetting: D_f itself
    assert not any(torch.equal(r, f) for r in sub["retain"] for f in sub["forget"])
