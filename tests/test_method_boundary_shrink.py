"""boundary_shrink: targets outside C_F, a probe that never moves, bounded attacks, D_f only."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_config

from mu_runner.data.datamodule import InMemoryData
from mu_runner.errors import ConfigError
from mu_runner.methods.boundary_shrink import BoundaryShrink, fgsm
from mu_runner.run import build, load_data, make_method, new_net

EPS = 0.1


@pytest.fixture(scope="module")
def fitted(shared_cache, tmp_path_factory):
    """A fitted stage forgetting 3 classes; every (x, x', y, y_nbi) and every loader it built."""
    seen, loaders = [], []
    real_targets, real_loader = BoundaryShrink.boundary_targets, InMemoryData.loader

    def spy_targets(self, x, y):
        adv, y_nbi = real_targets(self, x, y)
        seen.append((x, adv, y, y_nbi))
        return adv, y_nbi

    def spy_loader(self, indices, *args, **kwargs):
        loaders.append(indices.clone())
        return real_loader(self, indices, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BoundaryShrink, "boundary_targets", spy_targets)
        mp.setattr(InMemoryData, "loader", spy_loader)
        stage = build(compose_config([*TINY, "method=boundary_shrink", "forget.k=3", "method.epochs=1",
                                      "method.batch_size=64", f"method.epsilon={EPS}", "method.optimizer.lr=1e-2",
                                      "reference=none", f"paths.cache_dir={shared_cache}"],
                                     tmp_path_factory.mktemp("boundary_shrink")))
        loaders.clear()  # the original's training (cache miss) also builds loaders
        stage.fit()
    return stage, seen, loaders


def test_no_target_is_the_true_label_or_a_forget_class(fitted):
    stage, seen, _ = fitted
    y_nbi, y = torch.cat([s[3] for s in seen]), torch.cat([s[2] for s in seen])
    assert len(y_nbi) == len(stage.split.forget)  # every forget sample relabelled, once per epoch
    assert not torch.isin(y_nbi, torch.tensor(stage.split.classes)).any()
    assert (y_nbi != y).all()


def test_attack_stays_within_epsilon_on_the_255_grid(fitted):
    _, seen, _ = fitted
    for x, adv, _, _ in seen:
        assert (adv - x).abs().max() <= EPS + 1 / 255 + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        torch.testing.assert_close(adv * 255, (adv * 255).round(), rtol=0, atol=1e-4)
    assert any((adv != x).any() for x, adv, _, _ in seen)


def test_probe_is_bit_identical_to_the_original_after_unlearning(fitted):
    stage, _, _ = fitted
    probe, original = stage.module.probe.state_dict(), stage.original.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in probe.items())  # parameters and BN buffers
    net = stage.module.net.state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in net.items())  # the student did move


def test_only_the_forget_split_is_ever_loaded(fitted):
    stage, _, loaders = fitted
    assert stage.module.data_plan().names == ("forget",)
    assert loaders and all(torch.equal(ix.sort().values, stage.split.forget.sort().values) for ix in loaders)


def probe_module(tiny, *overrides):
    """A module on random weights whose probe is that net (code-faithful targets: no split needed)."""
    cfg = tiny("method=boundary_shrink", "method.mask_forget_classes=false", *overrides)
    data = load_data(cfg)
    net = new_net(cfg, data).eval()
    module = make_method(cfg, net=net)
    module._probe = [net]
    return module, data.images[:32].float() / 255, data.labels[:32]


def test_fitted_net_keeps_the_running_stats_of_the_original(fitted):
    stage, _, _ = fitted  # bn_mode: eval (default)
    stats = {k: v for k, v in stage.module.net.state_dict().items() if "running_" in k}
    assert stats and all(torch.equal(v, stage.original.state_dict()[k]) for k, v in stats.items())


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_only_bn_mode_train_lets_forget_batches_move_running_stats(tiny, bn_mode):
    module, x, y = probe_module(tiny, f"method.bn_mode={bn_mode}")
    before = {k: v.clone() for k, v in module.net.state_dict().items() if "running_" in k}
    module.net.train()  # what Lightning does, then the batch-start hook
    module.on_train_batch_start({"forget": (x, y)}, 0)
    module.unlearning_loss({"forget": (x, y)})
    same = all(torch.equal(v, module.net.state_dict()[k]) for k, v in before.items())
    assert same == (bn_mode == "eval")


def test_code_faithful_flag_takes_the_plain_argmax(tiny):
    module, x, y = probe_module(tiny)
    net = module.probe
    adv, y_nbi = module.boundary_targets(x, y)
    assert torch.equal(y_nbi, net(adv).argmax(1))
    assert torch.equal(adv, fgsm(net, x, y, module.epsilon))


@pytest.mark.parametrize("key, value", [("epsilon", 0), ("epsilon", 2), ("bn_mode", "frozen")])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}="):
        make_method(tiny("method=boundary_shrink", f"method.{key}={value}"), net=None)
