"""Mnemonic codes (docs/methods.md, mnemonic): code-mixed original in its own cache entry; one-shot
θ ± α_l·η^l from the codes alone; data-free selection reads no split; exact training codes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config, optimizer_steps
from torch import nn

from mu_runner.cache import Cache
from mu_runner.data.loaders import TensorLoader
from mu_runner.errors import CheckpointError, ConfigError
from mu_runner.methods.functional import Candidate, walk_grid
from mu_runner.methods.mnemonic import (
    CODE_SALT,
    Mnemonic,
    code_fisher,
    make_codes,
    score_candidate,
    step_sizes,
)
from mu_runner.run import _recipe_spec, build, fit_supervised, load_data, new_net

EPS32 = torch.finfo(torch.float32).eps


class Forbidden:
    """Stands in for the data while `edit` runs: any attribute read is recorded and refused."""

    def __init__(self, log: list) -> None:
        self.log = log

    def __getattr__(self, name):
        self.log.append(name)
        raise AttributeError(f"data.{name} read by a data-free method")


def fit_mnemonic(tmp, cache, *overrides, forbid_data=False):
    """Build and fit; record optimizer steps, backward passes, and the data `edit` reads."""
    cfg = compose_config([*TINY, "method=mnemonic", "forget.k=2", "reference=none", f"paths.cache_dir={cache}",
                          *overrides], tmp)
    stage = build(cfg)  # may train (and cache) the code-mixed original: not counted below
    rec = {"backward": 0, "loaders": [], "forbidden": []}
    stage.module.net.body.fc.weight.register_hook(lambda g: rec.__setitem__("backward", rec["backward"] + 1))
    real_edit, real_iter, inside = stage.module.edit, TensorLoader.__iter__, []

    def edit():
        inside.append(True)
        data, stage.datamodule.data = stage.datamodule.data, (Forbidden(rec["forbidden"]) if forbid_data
                                                              else stage.datamodule.data)
        try:
            real_edit()
        finally:
            stage.datamodule.data = data
            inside.clear()

    def iterate(loader):
        if inside:
            rec["loaders"].append(loader.indices.clone())
        return real_iter(loader)

    stage.module.edit = edit
    with pytest.MonkeyPatch.context() as mp, optimizer_steps() as rec["steps"]:
        mp.setattr(TensorLoader, "__iter__", iterate)
        stage.fit()
    return stage, rec


@pytest.fixture(scope="module")
def mn(shared_cache, tmp_path_factory):
    """The line rule (one η, from the original), no extra step: the tests below check its algebra."""
    return fit_mnemonic(tmp_path_factory.mktemp("mnemonic"), shared_cache, "method.path=line", "method.margin_steps=0")


@pytest.fixture(scope="module")
def mn_codes(mn, shared_cache, tmp_path_factory):
    return fit_mnemonic(tmp_path_factory.mktemp("codes"), shared_cache, "method.selection=codes", forbid_data=True)


def test_mnemonic_takes_no_optimizer_step_and_one_backward_per_class(mn):
    stage, rec = mn
    assert rec["steps"] == [] and stage.trainer.global_step == 0
    assert rec["backward"] == stage.data.num_classes == len(stage.split.classes) + 8  # |C_F| + |C_R|


def test_each_perturbed_tensor_moves_by_one_global_sign_times_alpha_eta(mn):
    stage, _ = mn
    m = stage.module
    before, after = dict(stage.original.named_parameters()), dict(m.net.named_parameters())
    assert m.sign in (1, -1)
    moved = 0
    for n in m.perturbed:
        a, b = after[n].detach().double(), before[n].detach().double()
        expected = m.sign * m.alpha[n] * m.eta[n]
        # float32 rounding of θ_o + s·α·η is the only slack: rtol 1e-6 plus one ulp of the weight
        tol = 1e-6 * expected.abs() + EPS32 * torch.maximum(a.abs(), b.abs())
        assert ((a - b) - expected).abs().le(tol).all(), n
        lam1 = m.lambda1 / m.eta_max  # relative λ1 (the default): in units of the largest η
        assert m.alpha[n] == (lam1 if m.lambda2 is None else min(lam1, m.lambda2 / float(m.eta[n].max()))), n
        moved += int(((a - b).abs() > tol).sum())  # so that the opposite sign would fail
    assert moved > 0


def test_only_conv_and_linear_weights_move_the_rest_is_bit_identical(mn):
    stage, _ = mn
    m = stage.module
    expected = {f"{k}.weight" for k, mod in m.net.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert set(m.perturbed) == expected and "body.fc.weight" in expected
    original = stage.original.state_dict()
    for k, v in m.net.state_dict().items():  # BN affine, biases, running stats, normalisation
        if k not in m.perturbed:
            assert torch.equal(v, original[k]), k


def test_relative_lambda1_is_the_largest_change_of_any_weight(mn):
    stage, _ = mn
    m = stage.module
    assert m.relative and m.lambda2 is None  # the defaults
    before, after = dict(stage.original.named_parameters()), dict(m.net.named_parameters())
    largest = 0.0
    for n in m.perturbed:  # up to float32 rounding of the updated weight
        a, b = after[n].detach().double(), before[n].detach().double()
        ulp = EPS32 * torch.maximum(a.abs(), b.abs())
        assert ((a - b).abs() <= m.lambda1 + ulp).all(), n
        largest = max(largest, float((a - b).abs().max()))
    assert largest == pytest.approx(m.lambda1, rel=1e-5)  # the weight with the largest η moves by λ1
    assert m.choices()["lambda1_absolute"] == pytest.approx(m.lambda1 / m.eta_max)


def test_step_sizes_on_known_eta_relative_is_scale_free_and_lambda2_caps_per_tensor():
    eta = {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([1.0, 0.5])}
    assert step_sizes(eta, 1.0, None, relative=True) == {"a": 0.25, "b": 0.25}  # λ1 / max η = 1 / 4
    assert step_sizes(eta, 1.0, 0.5, relative=True) == {"a": 0.125, "b": 0.25}  # λ2 / max η_a = 0.5 / 4 binds
    assert step_sizes(eta, 0.1, 0.2, relative=False) == {"a": 0.05, "b": 0.1}  # the paper's absolute λ1
    for scale in (1e-6, 1e3):  # relative: the edit α·η does not depend on the scale of η; absolute: it does
        scaled = {n: e * scale for n, e in eta.items()}
        for n, alpha in step_sizes(scaled, 1.0, None, relative=True).items():
            torch.testing.assert_close(alpha * scaled[n], 0.25 * eta[n])
        assert step_sizes(scaled, 0.1, None, relative=False)["a"] * float(scaled["a"].max()) == pytest.approx(0.4 * scale)
    assert step_sizes({"a": torch.zeros(3)}, 1.0, None, relative=True) == {"a": 0.0}  # nothing to move


def test_score_candidate_reports_the_largest_own_class_probability_of_forget_images():
    """Known probabilities, K = 4, forget class 0: both class-0 images are misclassified, but the first
    still gives class 0 probability 0.3 (above chance, 1/4): outvoted, not forgotten with a margin."""
    probs = torch.tensor([[0.30, 0.40, 0.20, 0.10],   # class 0, predicted 1
                          [0.05, 0.05, 0.80, 0.10],   # class 0, predicted 2
                          [0.10, 0.70, 0.10, 0.10],   # class 1, right
                          [0.10, 0.10, 0.20, 0.60]])  # class 2, predicted 3

    class Fixed(nn.Module):
        def forward(self, x):
            return probs.log()[x[:, 0, 0, 0].long()]

    x, y = torch.arange(4.0).view(4, 1, 1, 1), torch.tensor([0, 0, 1, 2])
    score, forget_acc, retain_acc, prob = score_candidate(Fixed(), x, y, [0])
    assert (forget_acc, retain_acc) == (0.0, 0.5) and score == pytest.approx(1.5)
    assert prob == pytest.approx(0.30)  # > 1/K: does not count as forgetting
    assert score_candidate(Fixed(), x[1:], y[1:], [0])[3] == pytest.approx(0.05)  # <= 1/K: counts


def test_fisher_ratio_of_the_head_matches_brute_force_on_the_codes(mn):
    stage, _ = mn
    net, codes, forget = copy.deepcopy(stage.original).eval(), stage.module.codes, stage.split.classes
    w = net.body.fc.weight
    sq = [torch.autograd.grad(F.cross_entropy(net(codes[c][None]), torch.tensor([c])), w)[0].double() ** 2
          for c in range(len(codes))]
    f_f = torch.stack([sq[c] for c in forget]).mean(0)
    f_r = torch.stack([sq[c] for c in range(len(codes)) if c not in forget]).mean(0)
    torch.testing.assert_close(stage.module.eta["body.fc.weight"], f_f / (f_r + stage.module.eps), rtol=1e-6, atol=0)


def test_selection_val_reads_only_20_validation_images_per_class(mn):
    stage, rec = mn
    assert len(rec["loaders"]) == 1 and not rec["forbidden"]
    seen, val_labels = rec["loaders"][0], stage.data.labels.cpu()[stage.data.val]
    assert torch.isin(seen, stage.data.val).all() and len(seen.unique()) == len(seen)
    for c in range(stage.data.num_classes):
        assert int((stage.data.labels.cpu()[seen] == c).sum()) == min(20, int((val_labels == c).sum())), c
    assert stage.module.scores[stage.module.sign] >= stage.module.scores[-stage.module.sign]


def test_selection_codes_touches_no_data_split_and_still_forgets(mn_codes):
    stage, rec = mn_codes
    assert rec["loaders"] == [] and rec["forbidden"] == []  # no loader iterated, no data attribute read
    m, original = stage.module, dict(stage.original.named_parameters())
    assert any(not torch.equal(p, original[n]) for n, p in m.net.named_parameters())
    assert m.scores[m.sign] == max(m.scores.values())  # the curve (default) may have walked one sign only
    result = stage.evaluate()
    assert result.unlearned["forget_acc"] <= result.original["forget_acc"] - 0.1


@pytest.fixture(scope="module")
def mixing(tmp_path_factory):
    """The code-mixed recipe on 320 training images, 2 epochs, t_mix 0.2; every net input and CE target."""
    cfg = compose_config([*TINY, "method=mnemonic", "method.t_mix=0.2"], tmp_path_factory.mktemp("mix"))
    data, recipe, seen = load_data(cfg), Mnemonic.original_recipe(cfg.method), []
    made = {}

    def training(*args, **kwargs):
        module = made["module"] = recipe.training(*args, **kwargs)
        made["codes"] = module.codes.clone()
        module.net.register_forward_pre_hook(lambda _, inp: seen.append([module.current_epoch, inp[0].clone()]))
        return module

    real_ce = F.cross_entropy
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "cross_entropy", lambda logits, y, *a, **k: (seen[-1].append(y.clone()), real_ce(logits, y, *a, **k))[1])
        state = fit_supervised(cfg, data, data.pool[:320], new_net(cfg, data), type(recipe)(recipe.key, training))
    return made, seen, state, data


def test_training_replaces_samples_by_their_own_class_code_at_rate_t_mix(mixing):
    made, seen, _, _ = mixing
    codes = made["codes"].flatten(1)
    n = replaced = 0
    per_epoch = {0: 0, 1: 0}
    for epoch, x, y in seen:
        match = (x.flatten(1)[:, None, :] == codes[None]).all(2)  # (batch, K): input is exactly code c
        assert (match.sum(1) <= 1).all()
        rows = match.any(1)
        assert torch.equal(match[rows].float().argmax(1), y[rows])  # each code carries its own label
        n, replaced, per_epoch[epoch] = n + len(y), replaced + int(rows.sum()), per_epoch[epoch] + int(rows.sum())
    assert n == 640
    sigma = (n * 0.2 * 0.8) ** 0.5
    assert abs(replaced - 0.2 * n) <= 4 * sigma
    assert per_epoch[0] > 0 and per_epoch[1] > 0  # the same (un-augmented) codes in both epochs


def test_codes_are_unchanged_by_training_and_stored_with_the_weights(mixing):
    made, _, state, data = mixing
    net = made["module"].net
    regenerated = make_codes(data.num_classes, data.source.shape, net.mean, net.std, 0)
    assert torch.equal(made["codes"], regenerated) and torch.equal(made["module"].codes, regenerated)
    assert torch.equal(state["artifact.codes"], regenerated) and "artifact.codes_sha256" in state
    xi = torch.randn(regenerated.shape, generator=torch.Generator().manual_seed(CODE_SALT))  # seed 0
    torch.testing.assert_close((regenerated - net.mean) / net.std, xi)  # N(0, I) after the model's Normalize


def test_mnemonic_original_has_its_own_cache_entry_and_a_second_run_hits_it(mn, shared_cache, tmp_path):
    stage, _ = mn
    cache, spec = Cache(shared_cache), {"kind": "original", **_recipe_spec(stage.cfg)}
    recipe = Mnemonic.original_recipe(stage.cfg.method)
    own = cache.path("original", {**spec, "method_recipe": recipe.key})
    assert own != cache.path("original", spec) and own.exists()
    other_t = Mnemonic.original_recipe(compose_config([*TINY, "method=mnemonic", "method.t_mix=0.2"], tmp_path).method)
    assert cache.path("original", {**spec, "method_recipe": other_t.key}) != own
    assert json.loads(own.with_suffix(".json").read_text())["method_recipe"] == recipe.key
    again = build(compose_config([*TINY, "method=mnemonic", "forget.k=2", "reference=none",
                                  f"paths.cache_dir={shared_cache}"], tmp_path))
    assert again.cache_hits["original"] is True
    assert torch.equal(again.module.codes, stage.module.codes)


def test_unlearning_refuses_codes_other_than_the_training_codes(mn):
    stage, _ = mn
    tampered = copy.deepcopy(stage.original)
    tampered.artifacts = {**tampered.artifacts, "codes": tampered.artifacts["codes"].clone()}
    tampered.artifacts["codes"][0, 0, 0, 0] += 1e-3
    with pytest.raises(CheckpointError, match="SHA-256"):
        Mnemonic(tampered)
    with pytest.raises(ConfigError, match=r"method\.seed=1: does not generate the codes"):
        Mnemonic(copy.deepcopy(stage.original), seed=1)
    plain = copy.deepcopy(stage.original)
    plain.artifacts = {}
    with pytest.raises(ConfigError, match="carries no mnemonic codes"):
        Mnemonic(plain)


def test_lambda1_grid_stops_at_the_first_step_that_forgets_below_chance(mn):
    m = mn[0].module
    tried = sorted({c.value for c in m.candidates})
    assert tried == m.grid[: len(tried)]  # ascending, no step skipped
    chance = 1.0 / len(m.codes)
    for c in m.candidates:  # score = retain accuracy + forget error; forgets = misclassified AND below chance
        assert 0 <= c.forget_acc <= 1 and 0 <= c.retain_acc <= 1 and c.score == pytest.approx(c.retain_acc + 1 - c.forget_acc)
        assert c.forgets == (c.forget_acc <= m.forget_tolerance and m.forget_prob[(c.value, c.variant)] <= chance)
    best = {lam: max((c for c in m.candidates if c.value == lam), key=lambda c: c.score) for lam in tried}
    forgets = [lam for lam in tried if best[lam].forgets]
    assert forgets in ([], [tried[-1]])  # margin_steps 0: the walk ends at the first step that forgets
    if forgets and best[forgets[0]].retain_acc >= m.base_retain - m.retain_budget:
        assert m.lambda1 == forgets[0] and m.choices()["forget_prob_max"] <= chance
    else:  # nothing forgets within the budget: the best-scoring tried step
        assert best[m.lambda1].score == max(c.score for c in m.candidates)
        assert forgets or tried == m.grid
    assert m.scores == {c.variant: c.score for c in m.candidates if c.value == m.lambda1}
    assert m.scores[m.sign] == max(m.scores.values())


def test_grid_walk_on_known_accuracies():
    """functional.walk_grid on scripted (retain, forget) accuracies, base retain 0.9, tolerance 1 point."""
    def walk(table, budget=1.0, max_extra=None):
        grid = [0.2, 0.4, 0.8, 1.6]
        accs = dict(zip(grid, table, strict=False))

        def try_value(v):
            r, f = accs[v]
            return [Candidate(v, s, r + 1 - f, f, r, f <= 0.01) for s in (1, -1)]
        tried, chosen = walk_grid(grid, try_value, 0.9, 0.01, budget, max_extra)
        assert chosen.variant == 1  # equal scores: the first variant kept
        return chosen.value, sorted({c.value for c in tried})

    assert walk([(0.9, 0.5), (0.9, 0.0), (0.895, 0.0), (0.85, 0.0)]) == (0.8, [0.2, 0.4, 0.8, 1.6])  # 1.6 costs 5
    assert walk([(0.9, 0.0), (0.85, 0.0), (0.9, 0.0), (0.9, 0.0)]) == (0.2, [0.2, 0.4])  # stops at the first cost
    assert walk([(0.8, 0.0), (0.8, 0.0), (0.9, 0.0), (0.9, 0.0)]) == (1.6, [0.2, 0.4, 0.8, 1.6])  # measured from
    assert walk([(0.8, 0.0), (0.75, 0.0), (0.9, 0.0), (0.9, 0.0)]) == (0.2, [0.2, 0.4])  # the first forgetting step
    assert walk([(0.9, 0.5), (0.9, 0.3), (0.9, 0.2), (0.8, 0.1)]) == (0.8, [0.2, 0.4, 0.8, 1.6])  # none: best score
    assert walk([(0.9, 0.5), (0.9, 0.0), (0.9, 0.3), (0.9, 0.0)]) == (0.4, [0.2, 0.4, 0.8])  # 0.8 stops forgetting
    # a budget: the first step that forgets costs 40 points > 5, so the walk stops there and keeps the best score
    assert walk([(0.9, 0.5), (0.88, 0.2), (0.5, 0.0), (0.9, 0.0)], budget=0.05) == (0.4, [0.2, 0.4, 0.8])
    assert walk([(0.9, 0.5), (0.88, 0.2), (0.5, 0.0), (0.9, 0.0)]) == (1.6, [0.2, 0.4, 0.8, 1.6])  # no budget
    # max_extra: at most that many steps beyond the first that forgets, and nothing stronger is tried
    table = [(0.9, 0.5), (0.9, 0.0), (0.9, 0.0), (0.9, 0.0)]
    assert walk(table, max_extra=0) == (0.4, [0.2, 0.4])  # mnemonic's default (margin_steps 0)
    assert walk(table, max_extra=1) == (0.8, [0.2, 0.4, 0.8])
    assert walk(table) == (1.6, [0.2, 0.4, 0.8, 1.6])  # None: no limit (ssd)
    assert walk([(0.9, 0.5), (0.9, 0.3), (0.9, 0.2), (0.8, 0.1)], max_extra=0) == (0.8, [0.2, 0.4, 0.8, 1.6])


@pytest.mark.parametrize("key, value", [("selection", "data"), ("t_mix", "0"), ("lambda1", "-1"), ("lambda2", "0"), ("eps", "0"),
                                        ("lambda1_grid", "[]"), ("lambda1_grid", "[0.2,-1]"), ("forget_tolerance", "1"),
                                        ("retain_tolerance", "-0.1"), ("max_forget_prob", "0"), ("margin_steps", "-1"),
                                        ("retain_budget", "2"), ("path", "curve")])
def test_mnemonic_rejects_bad_hyperparameters_before_training(tiny, key, value):
    cfg = tiny("method=mnemonic", f"method.{key}={value}")
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        build(cfg)
    assert not any(Path(cfg.paths.cache_dir).rglob("*.safetensors"))


@pytest.fixture(scope="module")
def mn_refresh(mn, shared_cache, tmp_path_factory):
    """The defaults (path=refresh, margin_steps 1) on a grid whose first step cannot forget."""
    return fit_mnemonic(tmp_path_factory.mktemp("refresh"), shared_cache, "method.lambda1_grid=[0.000001,0.5,1,2,4,8]")


def walk_curve(stage, sign: int, upto: float):
    """The curve recomputed outside the module: from θ_o, per grid step up to `upto`, η at the current
    weights and a step of the λ1 increment / max η. Returns (weights, the line's θ_o + s·upto·η_o / max η_o)."""
    m = stage.module
    net = copy.deepcopy(stage.original).eval()
    params = {f"{k}.weight": mod.weight for k, mod in net.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    done, line = 0.0, None
    for lam in [v for v in m.grid if v <= upto]:
        f_f, f_r = code_fisher(net, m.codes, params, list(stage.split.classes))
        eta = {n: f_f[n] / (f_r[n] + m.eps) for n in params}
        top = max(float(e.max()) for e in eta.values())
        if line is None:
            line = {n: p.detach().double() + sign * (upto / top) * eta[n] for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_((p.double() + sign * ((lam - done) / top) * eta[n]).to(p.dtype))
        done = lam
    return {n: p.detach() for n, p in params.items()}, line


def test_refresh_path_recomputes_eta_after_each_step_and_replays_to_the_chosen_one(mn_refresh):
    """Known answer: from θ_o, per grid step, η at the current weights and the λ1 increment / max η."""
    stage, _ = mn_refresh
    m = stage.module
    assert m.path == "refresh" and m.lambda1 >= 0.5  # 1e-6 moves no prediction: at least two steps
    expected, line = walk_curve(stage, m.sign, m.lambda1)
    after = dict(m.net.named_parameters())
    for n, p in expected.items():
        torch.testing.assert_close(after[n].detach(), p, rtol=1e-4, atol=1e-5)  # float32 Fisher sums
    moved = max(float((after[n].detach().double() - stage.original.get_parameter(n).detach().double()).abs().max())
                for n in expected)
    assert moved <= m.lambda1 * (1 + 1e-5)  # each increment moves a weight by at most itself
    apart = max(float((after[n].detach().double() - line[n]).abs().max()) for n in expected)
    assert m.choices()["lambda1_absolute"] is None and m.ends == {} and m.before == {}  # no weight copies kept
    assert apart > 1e-3  # η moved between steps: not the line's θ_o + s·λ1·η_o / max η_o


def test_refresh_path_replays_a_chosen_point_older_than_the_last_two_steps(mn, shared_cache, tmp_path, monkeypatch):
    """When the walk keeps an early step (the best-score fallback), its weights are no longer held:
    the curve is replayed from θ_o to it, and the result is that step's point, not the walk's end."""
    import mu_runner.methods.mnemonic as mnemonic

    def keep_the_second_step(grid, try_value, *args):
        tried = [c for v in grid for c in try_value(v)]
        return tried, next(c for c in tried if c.value == grid[1] and c.variant == -1)

    monkeypatch.setattr(mnemonic, "walk_grid", keep_the_second_step)
    stage, _ = fit_mnemonic(tmp_path, shared_cache, "method.lambda1_grid=[0.25,0.5,1,2]")
    m = stage.module
    assert (m.lambda1, m.sign) == (0.5, -1) and sorted({c.value for c in m.candidates}) == [0.25, 0.5, 1, 2]
    expected, _ = walk_curve(stage, -1, 0.5)
    after = dict(m.net.named_parameters())
    for n, p in expected.items():
        torch.testing.assert_close(after[n].detach(), p, rtol=1e-4, atol=1e-5)
