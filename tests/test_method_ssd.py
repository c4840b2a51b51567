"""SSD (docs/methods.md, ssd): one-shot, only shrinks the selected weights, α = ∞ is a no-op, deterministic."""

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


def test_ssd_uses_squared_batch_mean_gradients_of_train_and_forget(shared_cache, tmp_path):
    """Brute force for the classifier bias: I = mean over batches of (∂CE_batch/∂b)², the rule on it
    (α 10, λ 0.5: θ <- min(λ I_D / I_f, 1) θ on the selected weights)."""
    stage, _ = fit_ssd(tmp_path, shared_cache, "method.alpha_grid=null", "method.dampening=0.5")
    net = stage.original.eval()
    bias = net.body.fc.bias

    def importance(split):
        sq = [torch.autograd.grad(F.cross_entropy(net(x), y), bias)[0].double() ** 2
              for x, y in stage.datamodule.batches(split, 128)]
        return torch.stack(sq).mean(0)

    i_d, i_f = importance("train"), importance("forget")
    chosen = i_f > 10.0 * i_d
    expected = torch.where(chosen, (bias.double() * (0.5 * i_d / i_f).clamp(max=1)).float(), bias)
    assert chosen.any()
    assert torch.equal(stage.module.selected["body.fc.bias"], chosen)
    torch.testing.assert_close(stage.module.net.body.fc.bias, expected, rtol=1e-5, atol=0)


def test_ssd_with_infinite_alpha_returns_the_original_bit_identical(shared_cache, tmp_path):
    stage, _ = fit_ssd(tmp_path, shared_cache, "method.alpha=1e30", "method.alpha_grid=null")  # `inf` too
    original = stage.original.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in stage.module.net.state_dict().items())


def test_ssd_twice_gives_bit_identical_models(ssd, shared_cache, tmp_path):
    a, b = state(ssd[0].module.net), state(fit_ssd(tmp_path, shared_cache)[0].module.net)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ssd_alpha_walk_follows_the_rule_on_the_selection_set(ssd):
    """The grid is walked from the gentlest α; the chosen one obeys functional.walk_grid on its own candidates."""
    stage, _ = ssd
    m = stage.module
    tried = [c.value for c in m.candidates]
    assert tried == m.grid[: len(tried)] and m.alpha in tried  # descending, no α skipped
    for c in m.candidates:  # classes: score = retain accuracy + forget error, forgets at the tolerance
        assert c.score == pytest.approx(c.retain_acc + 1 - c.forget_acc)
        assert c.forgets == (c.forget_acc <= m.forget_tolerance)
    from mu_runner.methods.functional import walk_grid
    replay = {c.value: c for c in m.candidates}
    _, chosen = walk_grid(m.grid, lambda a: [replay[a]], m.base_retain, m.retain_tolerance, m.retain_budget)
    assert chosen.value == m.alpha
    assert stage.module.choices()["alpha"] == m.alpha
    # the candidate's accuracies are the final model's, by hand: D_f + forget-class validation images,
    # and the retained classes' validation images
    data, classes = stage.data, stage.split.classes
    val, labels = data.val, data.labels.cpu()
    in_f = torch.isin(labels[val], torch.tensor(classes))
    net = m.net.eval()

    def acc(idx):
        with torch.no_grad():
            return float((net(data.images[idx].float() / 255).argmax(1) == labels[idx]).float().mean())
    assert chosen.forget_acc == pytest.approx(acc(torch.cat([stage.split.forget, val[in_f]])))
    assert chosen.retain_acc == pytest.approx(acc(val[~in_f]))


def test_ssd_alpha_walk_for_samples_asks_the_forget_set_to_look_unseen(shared_cache, tmp_path):
    """Sample forgetting: a step forgets when D_f's accuracy is at most the validation accuracy."""
    cfg = compose_config([*TINY, "method=ssd", "forget=random", "reference=none", f"paths.cache_dir={shared_cache}"],
                         tmp_path)
    stage = build(cfg)
    stage.fit()
    m = stage.module
    assert m.candidates and m.alpha in [c.value for c in m.candidates]
    for c in m.candidates:
        assert c.forgets == (c.forget_acc <= c.retain_acc)
        assert c.score == pytest.approx(c.retain_acc - max(0.0, c.forget_acc - c.retain_acc))


def test_ssd_alpha_walk_reads_no_test_image(shared_cache, tmp_path, monkeypatch):
    """The selection set is D_f + validation images: the test split is out of reach during the edit."""
    from mu_runner.data.plan import MethodData
    cfg = compose_config([*TINY, "method=ssd", "forget.k=2", "reference=none", f"paths.cache_dir={shared_cache}"],
                         tmp_path)
    stage = build(cfg)
    scored, real_edit, real_acc = [], stage.module.edit, MethodData.accuracy

    def edit():  # the test images and labels are gone while SSD edits: any read of them fails
        images, labels = stage.data.test_images, stage.data.test_labels
        stage.data.test_images = stage.data.test_labels = None
        try:
            real_edit()
        finally:
            stage.data.test_images, stage.data.test_labels = images, labels

    def accuracy(self, net, indices):
        scored.append(indices.clone())
        return real_acc(self, net, indices)
    stage.module.edit = edit
    monkeypatch.setattr(MethodData, "accuracy", accuracy)
    stage.fit()
    pool_and_val = torch.cat([stage.data.pool, stage.data.val])
    assert scored and all(torch.isin(idx, pool_and_val).all() for idx in scored)  # training-set indices only
    assert any(torch.isin(idx, stage.data.val).any() for idx in scored)  # validation images were used
    assert stage.module.candidates  # the walk ran


@pytest.mark.parametrize("key, value", [("alpha", "-1"), ("dampening", "-0.5"), ("alpha_grid", "[]"),
                                        ("alpha_grid", "[10,-1]"), ("retain_budget", "2")])
def test_ssd_rejects_bad_hyperparameters(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        build(tiny("method=ssd", f"method.{key}={value}"))
