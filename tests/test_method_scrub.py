"""scrub: the teacher never moves, the student does, exactly M max passes, M = α = 0 is finetune."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose_config
from omegaconf import open_dict

from mu_runner.errors import ConfigError
from mu_runner.methods.scrub import Scrub, distill_kl
from mu_runner.run import build, make_method

FAST = ("reference=none", "callbacks.eval_every_n_epochs=0")


@pytest.fixture(scope="module")
def fitted(shared_cache, tmp_path_factory):
    """2 epochs with M = 1: each step's (epoch, split, batch size), and the student after epoch 0."""
    steps, after_first = [], {}
    real_loss = Scrub.unlearning_loss

    def spy_loss(self, batch):
        (name, (x, _)), = batch.items()
        steps.append((self.current_epoch, name, len(x)))
        return real_loss(self, batch)

    def spy_epoch_end(self):
        if self.current_epoch == 0:
            after_first.update({k: v.clone() for k, v in self.net.state_dict().items()})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Scrub, "unlearning_loss", spy_loss)
        mp.setattr(Scrub, "on_train_epoch_end", spy_epoch_end, raising=False)
        stage = build(compose_config([*TINY, "method=scrub", "method.epochs=2", "method.max_steps=1",
                                      "method.forget_batch_size=32", "method.batch_size=256", *FAST,
                                      f"paths.cache_dir={shared_cache}"], tmp_path_factory.mktemp("scrub")))
        stage.fit()
    return stage, steps, after_first


def test_teacher_is_bit_identical_to_the_original(fitted):
    stage, _, _ = fitted
    teacher, original = stage.module.teacher.state_dict(), stage.original.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in teacher.items())  # parameters and BN buffers


def test_student_moves_in_the_first_epoch(fitted):
    stage, _, after_first = fitted  # guards the optimizer built on the teacher's parameters
    assert after_first and any(not torch.equal(v, after_first[k]) for k, v in stage.original.named_parameters())


def test_forget_split_is_passed_over_exactly_max_steps_times(fitted):
    stage, steps, _ = fitted
    n_f, n_r = len(stage.split.forget), len(stage.split.retain)
    forget_epochs = sorted({e for e, name, _ in steps if name == "forget"})
    assert forget_epochs == [0]  # M = 1 pass, not M + 1 (a 0-based `epoch <= M`)
    assert sum(n for _, name, n in steps if name == "forget") == n_f  # a whole pass
    assert sum(n for _, name, n in steps if name == "retain") == 2 * n_r  # one min pass per epoch
    assert max(n for _, name, n in steps if name == "forget") == 32  # forget_batch_size honoured
    assert sum(name == "forget" for _, name, _ in steps) == math.ceil(n_f / 32)
    names = [name for e, name, _ in steps if e == 0]  # the max pass comes first in its epoch
    assert names == sorted(names)  # "forget" < "retain"


def test_no_max_pass_no_kl_pure_ce_is_bit_identical_to_finetune(tiny, shared_cache):
    common = (*FAST, f"paths.cache_dir={shared_cache}", "method.epochs=1", "method.batch_size=256")
    scrub_cfg = tiny("method=scrub", *common, "method.max_steps=0", "method.alpha=0", "method.gamma=1",
                     "method.scheduler.milestones=[1]")
    finetune_cfg = tiny("method=finetune", *common)
    with open_dict(finetune_cfg):  # the same optimizer and lr schedule
        finetune_cfg.method.optimizer = scrub_cfg.method.optimizer
        finetune_cfg.method.scheduler = scrub_cfg.method.scheduler
    states = []
    for cfg in (scrub_cfg, finetune_cfg):
        stage = build(cfg)
        stage.fit()
        states.append(stage.module.net.state_dict())
    assert stage.module.data_plan().names == ("retain",)
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert any(not torch.equal(v, stage.original.state_dict()[k]) for k, v in states[0].items())


def test_divergence_is_tau_squared_kl_teacher_to_student():
    torch.manual_seed(0)
    s, t, tau = torch.randn(5, 4), torch.randn(5, 4), 3.0
    p_t, p_s = (t / tau).softmax(1), (s / tau).softmax(1)
    expected = tau**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(distill_kl(s, t, tau), expected)
    assert distill_kl(t, t, tau).abs() < 1e-6
    torch.testing.assert_close(distill_kl(s, t, 1.0), F.kl_div(s.log_softmax(1), t.softmax(1), reduction="batchmean"))


@pytest.mark.parametrize("key, value", [("max_steps", -1), ("forget_batch_size", 0), ("temperature", 0),
                                        ("alpha", -1), ("gamma", -0.5)])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}="):
        make_method(tiny("method=scrub", f"method.{key}={value}"), net=None)
