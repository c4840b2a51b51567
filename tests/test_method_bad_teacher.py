"""bad_teacher: frozen teachers, a seeded ρ-subset of D_r, the right teacher per row, S drifts to T_d."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_recording_loaders, same_state

from mu_runner.errors import ConfigError
from mu_runner.methods.bad_teacher import random_teacher
from mu_runner.run import make_method

RHO = 0.3


@pytest.fixture(scope="module")
def fitted(shared_cache, tmp_path_factory):
    """One epoch on the tiny model; the index sets of every loader the stage built."""
    return fit_recording_loaders(["method=bad_teacher", "method.epochs=1", f"method.retain_fraction={RHO}",
                                  "method.forget_batch_size=32", "method.batch_size=96", "method.optimizer.lr=1e-3",
                                  "reference=none", "callbacks.eval_every_n_epochs=0",
                                  f"paths.cache_dir={shared_cache}"], tmp_path_factory.mktemp("bad_teacher"))



def test_both_teachers_are_bit_identical_after_unlearning(fitted):
    stage, _ = fitted
    module = stage.module
    assert same_state(module.competent, stage.original)
    assert same_state(module.incompetent, random_teacher(stage.original, module.bad_teacher_seed))  # deterministic
    assert not same_state(module.incompetent, stage.original)
    assert not same_state(module.incompetent, random_teacher(stage.original, module.bad_teacher_seed + 1))


def test_retain_subset_is_a_seeded_rho_fraction_of_the_retain_split(fitted):
    stage, loaders = fitted
    subset, retain = stage.module.retain_subset, stage.split.retain
    assert len(subset) == round(RHO * len(retain)) and len(subset.unique()) == len(subset)
    assert torch.isin(subset, retain).all()
    assert torch.equal(stage.module.retain_subset_of(retain), subset)  # same seed, same subset
    seen = sorted(len(ix) for ix in loaders)  # only D_f and the subset are ever loaded
    assert seen == sorted([len(stage.split.forget), len(subset)])
    assert any(torch.equal(ix.sort().values, subset) for ix in loaders)


def test_forget_rows_follow_the_incompetent_teacher_and_retain_rows_the_competent(fitted):
    stage, _ = fitted
    module, data = stage.module, stage.data
    xf = data.images[stage.split.forget[:8]].float() / 255
    xr = data.images[stage.split.retain[:8]].float() / 255
    q = module.teacher_log_probs(xf, xr)
    with torch.no_grad():
        torch.testing.assert_close(q[:8], module.incompetent(xf).log_softmax(1))
        torch.testing.assert_close(q[8:], module.competent(xr).log_softmax(1))


def kl_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(1)


def mean_js(p: torch.Tensor, q: torch.Tensor) -> float:
    m = (p + q) / 2
    return float((kl_rows(p, m) / 2 + kl_rows(q, m) / 2).mean())


def test_student_moves_towards_the_incompetent_teacher_on_the_forget_set(fitted):
    stage, _ = fitted
    x = stage.data.images[stage.split.forget].float() / 255
    with torch.no_grad():
        bad = stage.module.incompetent(x).softmax(1)
        before = mean_js(stage.original.eval()(x).softmax(1), bad)
        after = mean_js(stage.module.net.eval()(x).softmax(1), bad)
    assert after < before, (before, after)


def test_loss_is_batchmean_kl_from_the_tagged_teacher_to_the_student_at_temperature(fitted):
    stage, _ = fitted
    module, data, tau = stage.module, stage.data, 2.0
    f, r = stage.split.forget[:5], stage.split.retain[:7]
    xf, xr = data.images[f].float() / 255, data.images[r].float() / 255
    module.temperature = tau
    try:
        with torch.no_grad():
            module.net.eval()  # BatchNorm on running stats: rows independent of the batch
            loss = module.unlearning_loss({"forget": (xf, data.labels[f]), "retain": (xr, data.labels[r])})
            q = torch.cat([module.incompetent(xf), module.competent(xr)]).div(tau).softmax(1)
            s = module.net(torch.cat([xf, xr])).div(tau).log_softmax(1)
    finally:
        module.temperature = 1.0
    expected = (q * (q.log() - s)).sum(1).mean()  # one mean over all 12 rows, not per split
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("key, value", [("retain_fraction", 0), ("retain_fraction", 1.5), ("forget_batch_size", 0),
                                        ("temperature", 0)])
def test_impossible_values_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}="):
        make_method(tiny("method=bad_teacher", f"method.{key}={value}"), net=None)
