"""SSD (METHODS.md §B ssd): one-shot, only shrinks the selected weights, α = ∞ is a no-op, deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config, optimizer_steps

from mu_runner.errors import ConfigError
from mu_runner.run import build


def fit_ssd(tmp, cache, *overrides):
    cfg = compose_config([*TINY, "method=ssd", "forget.k=2", "reference=none", f"paths.cache_dir={cache}",
                          *overrides], tmp)
    stage = build(cfg)  # may train (and cache) the original: not counted below
    with optimizer_steps() as steps:
        stage.fit()
    return stage, steps


@pytest.fixture(scope="module")
def ssd(shared_cache, tmp_path_factory):
    """One SSD run with the default α, λ on tiny digits (forgetting 2 classes), and its optimizer steps."""
    return fit_ssd(tmp_path_factory.mktemp("ssd"), shared_cache)


def state(net) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_ssd_takes_no_optimizer_step(ssd):
    stage, steps = ssd
    assert steps == [] and stage.trainer.global_step == 0


def test_ssd_only_shrinks_selected_weights_keeping_their_sign(ssd):
    stage, _ = ssd
    before, after = dict(stage.original.named_parameters()), dict(stage.module.net.named_parameters())
    n_selected = n_shrunk = 0
    for n, p in after.items():
        s, p0 = stage.module.selected[n], before[n]
        assert torch.equal(p[~s], p0[~s]), n  # outside S: bit-identical
        assert (p[s] * p0[s] >= 0).all() and (p[s].abs() <= p0[s].abs()).all(), n
        n_selected += int(s.sum())
        n_shrunk += int((p[s] != p0[s]).sum())
    assert n_shrunk > 0 and n_selected < sum(p.numel() for p in after.values())
    for k, v in stage.original.named_buffers():  # running stats are not edited
        assert torch.equal(dict(stage.module.net.named_buffers())[k], v), k


def test_ssd_uses_squared_batch_mean_gradients_of_train_and_forget(ssd):
    """Brute force for the classifier bias: I = mean over batches of (∂CE_batch/∂b)², the rule on it."""
    stage, _ = ssd
    net = stage.original.eval()
    bias = net.body.fc.bias

    def importance(split):
        sq = [torch.autograd.grad(F.cross_entropy(net(x), y), bias)[0].double() ** 2
              for x, y in stage.datamodule.batches(split, 128)]
        return torch.stack(sq).mean(0)

    i_d, i_f = importance("train"), importance("forget")
    chosen = i_f > 10.0 * i_d
    expected = torch.where(chosen, (bias.double() * (i_d / i_f).clamp(max=1)).float(), bias)
    assert chosen.any()
    assert torch.equal(stage.module.selected["body.fc.bias"], chosen)
    torch.testing.assert_close(stage.module.net.body.fc.bias, expected, rtol=1e-5, atol=0)


def test_ssd_with_infinite_alpha_returns_the_original_bit_identical(shared_cache, tmp_path):
    stage, _ = fit_ssd(tmp_path, shared_cache, "method.alpha=1e30")  # `inf` selects nothing too
    original = stage.original.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in stage.module.net.state_dict().items())


def test_ssd_twice_gives_bit_identical_models(ssd, shared_cache, tmp_path):
    a, b = state(ssd[0].module.net), state(fit_ssd(tmp_path, shared_cache)[0].module.net)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key, value", [("alpha", "-1"), ("dampening", "-0.5")])
def test_ssd_rejects_negative_hyperparameters(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        build(tiny("method=ssd", f"method.{key}={value}"))
