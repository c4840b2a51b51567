"""grad_ascent: reads D_f only, applies −∇CE; bn_mode: eval leaves BatchNorm statistics alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mu_runner.data.loaders import TensorLoader
from mu_runner.errors import ConfigError
from mu_runner.methods.functional import batchnorm_eval
from mu_runner.methods.grad_ascent import GradAscent
from mu_runner.run import build, make_method

FAST = ("method=grad_ascent", "method.epochs=1", "reference=none")


def test_grad_ascent_never_iterates_the_retain_split(tiny, shared_cache, monkeypatch):
    stage = build(tiny(*FAST, f"paths.cache_dir={shared_cache}"))  # trains the original: spy after
    seen = []
    real_iter = TensorLoader.__iter__
    monkeypatch.setattr(TensorLoader, "__iter__",
                        lambda self: (seen.append(set(self.indices.tolist())), real_iter(self))[1])
    stage.fit()
    forget = set(stage.split.forget.tolist())
    assert seen and all(s <= forget for s in seen)
    assert stage.trainer.global_step > 0


def test_one_step_applies_minus_ce_gradient_and_raises_that_batch_ce(tiny, shared_cache, monkeypatch):
    batches, grads = [], []
    real_loss = GradAscent.unlearning_loss
    monkeypatch.setattr(GradAscent, "unlearning_loss",
                        lambda self, b: (batches.append(b["forget"]), real_loss(self, b))[1])
    monkeypatch.setattr(GradAscent, "on_before_optimizer_step", lambda self, opt: grads.append(
        {n: p.grad.clone() for n, p in self.net.named_parameters()}))
    stage = build(tiny(*FAST, "+trainer.max_steps=1", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    assert len(batches) == len(grads) == 1
    (x, y), applied = batches[0], grads[0]
    net0 = copy.deepcopy(stage.original).train()
    batchnorm_eval(net0)  # what bn_mode=eval does during the step
    ce0 = F.cross_entropy(net0(x), y)
    expected = torch.autograd.grad(ce0, list(net0.parameters()))
    for (n, _), g in zip(net0.named_parameters(), expected):
        torch.testing.assert_close(applied[n], -g, rtol=1e-5, atol=1e-7, msg=n)
    net_u = stage.module.net.eval()  # BN in eval mode both times: the same function as in the step
    with torch.no_grad():
        assert F.cross_entropy(net_u(x), y) > F.cross_entropy(stage.original.eval()(x), y)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_bn_eval_mode_keeps_running_statistics_and_train_mode_moves_them(tiny, shared_cache, bn_mode):
    stage = build(tiny(*FAST, f"method.bn_mode={bn_mode}", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    orig = dict(stage.original.named_buffers())
    same = [torch.equal(b, orig[n]) for n, b in stage.module.net.named_buffers() if "running" in n]
    assert same and all(same) == (bn_mode == "eval")
    params = zip(stage.module.net.parameters(), stage.original.parameters())
    assert any(not torch.equal(p, q) for p, q in params)


def test_unknown_bn_mode_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"method.bn_mode='frozen'.*eval, train"):
        make_method(tiny("method=grad_ascent", "method.bn_mode=frozen"), net=None)
