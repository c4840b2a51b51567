"""l1_sparse: γ₀ = 0 is finetune bit for bit, γ_e follows the linear schedule (constant when E₀ = E), weights get sparser."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mu_runner.methods.l1_sparse as L1
from mu_runner.errors import ConfigError
from mu_runner.methods.functional import l1_norm
from mu_runner.run import build, load_data, make_method, new_net

SAME = ("epochs=1", "batch_size=64", "optimizer.lr=0.05", "optimizer.momentum=0.9",
        "optimizer.weight_decay=5e-4")


def fitted(tiny, cache, name: str, *extra: str):
    stage = build(tiny(f"method={name}", *(f"method.{o}" for o in SAME), *extra,
                       "+trainer.max_steps=6", "reference=none", f"paths.cache_dir={cache}"))
    stage.fit()
    return stage


def test_gamma_zero_is_bit_identical_to_finetune_and_gamma_shrinks_the_l1_norm(tiny, shared_cache):
    ft = fitted(tiny, shared_cache, "finetune").module.net
    zero = fitted(tiny, shared_cache, "l1_sparse", "method.gamma0=0").module.net.state_dict()
    assert all(torch.equal(v, zero[k]) for k, v in ft.state_dict().items())  # parameters and buffers
    sparse = fitted(tiny, shared_cache, "l1_sparse", "method.gamma0=1e-3").module.net
    assert l1_norm(sparse.parameters()) < l1_norm(ft.parameters())


def test_gamma_schedule_matches_the_formula(tiny):
    module = make_method(tiny("method=l1_sparse", "method.epochs=5", "method.no_l1_epochs=2",
                              "method.gamma0=3e-4"), net=None)
    expected = [3e-4 * (1 - e / 3) for e in range(3)] + [0.0, 0.0]
    assert [module.gamma_at(e) for e in range(5)] == pytest.approx(expected, rel=1e-12, abs=0)
    assert module.gamma_at(0) == 3e-4 and module.gamma_at(3) == 0.0


def test_no_l1_epochs_equal_to_epochs_keeps_gamma0_constant_as_the_authors_code(tiny):
    """Their FT_iter: `elif unlearn_epochs - no_l1_epochs == 0: current_alpha = alpha` (not finetune)."""
    module = make_method(tiny("method=l1_sparse", "method.epochs=3", "method.no_l1_epochs=3",
                              "method.gamma0=3e-4"), net=None)
    assert [module.gamma_at(e) for e in range(3)] == [3e-4, 3e-4, 3e-4]


@pytest.mark.parametrize("no_l1, penalised", [(1, {0}), (2, {0, 1})])
def test_penalty_is_computed_in_exactly_the_epochs_the_schedule_penalises(tiny, shared_cache, monkeypatch, no_l1,
                                                                          penalised):
    epochs_with_penalty = []
    stage = build(tiny("method=l1_sparse", "method.epochs=2", f"method.no_l1_epochs={no_l1}",
                       "method.batch_size=256", "+trainer.limit_train_batches=2", "reference=none",
                       f"paths.cache_dir={shared_cache}"))
    monkeypatch.setattr(L1, "l1_norm", lambda params: (
        epochs_with_penalty.append(stage.module.current_epoch), l1_norm(params))[1])
    stage.fit()  # E0 = E (2): the penalty in every epoch, at gamma0, as the authors' code
    assert stage.trainer.current_epoch == 2 and set(epochs_with_penalty) == penalised


def test_penalty_gradient_is_gamma_times_sign_of_the_weights(tiny):
    cfg = tiny("method=l1_sparse", "method.gamma0=1e-2")
    data = load_data(cfg)
    net = new_net(cfg, data).eval()
    module = make_method(cfg, net=copy.deepcopy(net))
    x, y = data.images[:32].float() / 255, data.labels[:32]
    module.unlearning_loss({"retain": (x, y)}).backward()
    F.cross_entropy(net(x), y).backward()
    for (n, p), q in zip(module.net.named_parameters(), net.parameters(), strict=False):
        torch.testing.assert_close(p.grad - q.grad, 1e-2 * torch.sign(q), rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("key, value", [("gamma0", -1e-4), ("no_l1_epochs", 11), ("no_l1_epochs", -1)])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}="):
        make_method(tiny("method=l1_sparse", "method.epochs=10", f"method.{key}={value}"), net=None)
