"""neggrad_plus: β = 1 is finetune bit for bit, β = 0 is grad_ascent step for step, L is weighted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mu_runner.errors import ConfigError
from mu_runner.run import build, load_data, make_method, new_net

SAME = ("epochs=1", "batch_size=64", "optimizer.lr=0.05", "optimizer.momentum=0.9",
        "optimizer.weight_decay=5e-4")


def method_cfg(tiny, name: str, *extra: str):
    return tiny(f"method={name}", *(f"method.{o}" for o in SAME), *extra)


def test_beta_one_is_bit_identical_to_finetune(tiny, shared_cache):
    states = []
    for name, extra in (("finetune", ()), ("neggrad_plus", ("method.beta=1.0",))):
        stage = build(method_cfg(tiny, name, *extra, "+trainer.max_steps=6", "reference=none",
                                 f"paths.cache_dir={shared_cache}"))  # the forget loader cycles twice
        stage.fit()
        states.append(stage.module.net.state_dict())
    ft, ngp = states
    assert all(torch.equal(v, ngp[k]) for k, v in ft.items())  # parameters and BN buffers
    assert any(not torch.equal(v, stage.original.state_dict()[k]) for k, v in ft.items())


@pytest.fixture
def net_and_batch(tiny):
    """Random initial weights and a hand-built forget/retain batch (no training needed)."""
    cfg = tiny()
    data = load_data(cfg)
    x, y = data.images[:96].float() / 255, data.labels[:96]
    return new_net(cfg, data), {"forget": (x[:32], y[:32]), "retain": (x[32:], y[32:])}


def one_step(module, batch) -> dict:
    """What Lightning does for one batch: train mode, the batch-start hook, loss, backward, step."""
    module.net.train()
    module.on_train_batch_start(batch, 0)
    module.unlearning_loss(batch).backward()
    module.optimizer_factory(params=list(module.net.parameters())).step()
    return module.net.state_dict()


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_beta_zero_step_equals_one_grad_ascent_step(tiny, net_and_batch, bn_mode):
    net, batch = net_and_batch
    ga = make_method(method_cfg(tiny, "grad_ascent", f"method.bn_mode={bn_mode}"), net=copy.deepcopy(net))
    ngp = make_method(method_cfg(tiny, "neggrad_plus", f"method.bn_mode={bn_mode}", "method.beta=0.0"),
                      net=copy.deepcopy(net))
    after_ga = one_step(ga, {"forget": batch["forget"]})
    after_ngp = one_step(ngp, batch)  # the retain half must not even be forwarded (BN statistics)
    assert all(torch.equal(v, after_ngp[k]) for k, v in after_ga.items())
    assert any(not torch.equal(v, net.state_dict()[k]) for k, v in after_ga.items())


def test_loss_is_beta_retain_ce_minus_one_minus_beta_forget_ce(tiny, net_and_batch):
    net, batch = net_and_batch
    module = make_method(method_cfg(tiny, "neggrad_plus", "method.beta=0.3"), net=net.eval())
    (xf, yf), (xr, yr) = batch["forget"], batch["retain"]
    with torch.no_grad():
        expected = 0.3 * F.cross_entropy(net(xr), yr) - 0.7 * F.cross_entropy(net(xf), yf)
        torch.testing.assert_close(module.unlearning_loss(batch), expected)


def test_retain_comes_first_so_its_loader_order_equals_finetune(tiny):
    module = make_method(method_cfg(tiny, "neggrad_plus", "method.forget_batch_size=16"), net=None)
    plan = module.data_plan()
    assert list(plan.batch_sizes().items()) == [("retain", 64), ("forget", 16)] and plan.anchor == "retain"


@pytest.mark.parametrize("key, value", [("beta", 1.5), ("beta", -0.1), ("forget_batch_size", 0),
                                        ("bn_mode", "x")])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}="):
        make_method(tiny("method=neggrad_plus", f"method.{key}={value}"), net=None)
