"""weight_reset (docs/methods.md, weight_reset): exactly floor(k·N) weights reset, pruned stay 0, E_r = 0 edits only them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, compose_config, optimizer_steps
from torch import nn

from mu_runner.errors import ConfigError
from mu_runner.methods.weight_reset import eligible_weights, recalibrate_batchnorm, select_weights
from mu_runner.run import build


def fit(tmp, cache, *overrides):
    cfg = compose_config([*TINY, "method=weight_reset", "method.epochs=1", "forget.k=2", "reference=none",
                          "method.ratio_per_class=null",  # these tests pin `ratio` itself
                          f"paths.cache_dir={cache}", *overrides], tmp)
    stage = build(cfg)
    with optimizer_steps() as steps:
        stage.fit()
    return stage, len(steps)


def n_eligible(net) -> int:
    params = dict(net.named_parameters())
    return sum(params[n].numel() for n in eligible_weights(net))


@pytest.fixture(scope="module")
def pruned(shared_cache, tmp_path_factory):
    """prune 5 % globally, then one repair epoch with SGD momentum 0.9 and weight decay 5e-4."""
    return fit(tmp_path_factory.mktemp("wr_prune"), shared_cache, "method.mode=prune", "method.ratio=0.05")


def test_exactly_floor_k_n_eligible_weights_are_reset_and_only_conv_linear_weights(pruned):
    stage, steps = pruned
    module = stage.module
    assert set(module.selected) == set(eligible_weights(module.net))
    assert all("bn" not in n and n.endswith("weight") for n in module.selected)  # no BN, no biases
    assert sum(int(m.sum()) for m in module.selected.values()) == math.floor(0.05 * n_eligible(module.net))
    assert sum(module.reset_per_stage.values()) == math.floor(0.05 * n_eligible(module.net))
    assert steps > 0


def test_pruned_weights_are_exactly_zero_after_the_repair_despite_momentum_and_decay(pruned):
    stage, _ = pruned
    params = dict(stage.module.net.named_parameters())
    original = dict(stage.original.named_parameters())
    moved = 0
    for n, m in stage.module.selected.items():
        assert (params[n][m] == 0).all(), n
        moved += int((params[n][~m] != original[n][~m]).sum())
    assert moved > 0  # the repair trained the other weights


def test_reset_only_takes_no_step_and_keeps_everything_else_bit_identical(tmp_path, shared_cache):
    stage, steps = fit(tmp_path, shared_cache, "method.epochs=0", "method.scope=per_layer",
                       "method.ratio=0.1")
    assert steps == 0 and stage.trainer.global_step == 0
    after = dict(stage.module.net.named_parameters())
    for n, p0 in stage.original.named_parameters():
        m = stage.module.selected.get(n)
        if m is None:
            assert torch.equal(after[n], p0), n
            continue
        assert torch.equal(after[n][~m], p0[~m]), n
        assert int(m.sum()) == math.floor(0.1 * p0.numel()), n  # per_layer: floor(k·|W|) of each tensor
        assert (after[n][m] != p0[m]).float().mean() > 0.9, n  # redrawn
    buffers = dict(stage.module.net.named_buffers())
    assert all(torch.equal(buffers[k], v) for k, v in stage.original.named_buffers())


def test_reinit_is_deterministic_under_the_seed(tmp_path, shared_cache):
    runs = [fit(tmp_path / f"r{i}", shared_cache, "method.epochs=0", f"method.seed={s}")[0]
            for i, s in enumerate((0, 0, 1))]
    w = [dict(r.module.net.named_parameters()) for r in runs]
    names = list(runs[0].module.selected)
    assert all(torch.equal(w[0][n], w[1][n]) for n in names)
    assert any(not torch.equal(w[0][n], w[2][n]) for n in names)


def test_freeze_keeps_everything_outside_trainable_bit_identical_but_the_reset(tmp_path, shared_cache):
    stage, steps = fit(tmp_path, shared_cache, "method.freeze=true", "method.scope=layers",
                       "method.layers=[layer3]", "method.trainable=[layer3,fc]")
    assert steps > 0
    after = dict(stage.module.net.named_parameters())
    after_buffers = dict(stage.module.net.named_buffers())
    for n, p0 in stage.original.named_parameters():
        if not (n.startswith(("body.layer3.", "body.fc."))):
            assert torch.equal(after[n], p0), n
    for n, b0 in stage.original.named_buffers():
        if n.startswith("body.layer") and not n.startswith("body.layer3."):
            assert torch.equal(after_buffers[n], b0), n  # frozen BatchNorm statistics too
    sel = stage.module.selected
    assert all(bool(m.all()) == n.startswith("body.layer3.") for n, m in sel.items())  # whole modules


def test_select_weights_breaks_ties_by_flat_index_and_layers_by_name():
    scores = {"body.a.weight": torch.ones(4), "body.b.weight": torch.ones(4)}
    glob = select_weights(scores, "global", 0.3)  # floor(0.3·8) = 2, all tied: the first two
    assert glob["body.a.weight"].tolist() == [True, True, False, False] and not glob["body.b.weight"].any()
    layers = select_weights(scores, "layers", 0.0, ["b"])
    assert not layers["body.a.weight"].any() and layers["body.b.weight"].all()


def test_recalibrate_batchnorm_is_the_plain_average_of_batch_statistics():
    bn = nn.BatchNorm1d(3).eval()
    batches = [(torch.randn(8, 3) + 2, None), (torch.randn(8, 3) - 1, None)]
    recalibrate_batchnorm(bn, batches)
    mean = torch.stack([x.mean(0) for x, _ in batches]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training  # restored


@pytest.mark.parametrize("override, match", [
    ("method.mode=zero", "method.mode='zero': allowed prune, reinit"),
    ("method.ratio=0", "method.ratio=0"),
    ("method.scope=layers", "method.scope=layers needs method.layers"),
    ("method.score=fisher", "allowed grad_forget, grad_ratio, magnitude"),
])
def test_bad_values_are_config_errors(tiny, override, match):
    with pytest.raises(ConfigError, match=match):
        build(tiny("method=weight_reset", override))
