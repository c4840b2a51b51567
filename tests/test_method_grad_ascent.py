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

FAST = ("method=grad_ascent", "method.epochs=1", "method.stop_forget_acc=null", "reference=none")


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
    for (n, _), g in zip(net0.named_parameters(), expected, strict=False):
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
    params = zip(stage.module.net.parameters(), stage.original.parameters(), strict=False)
    assert any(not torch.equal(p, q) for p, q in params)


def test_unknown_bn_mode_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"method.bn_mode='frozen'.*eval, train"):
        make_method(tiny("method=grad_ascent", "method.bn_mode=frozen"), net=None)


def test_stop_rule_pools_small_batches_and_fires_at_the_target():
    ga = GradAscent(torch.nn.Linear(2, 2), batch_size=32, stop_forget_acc=0.1)  # class forgetting: the target
    assert not ga.forgotten(0, 3)  # a 3-sample remainder decides nothing on its own
    assert not ga.forgotten(5, 32)  # pooled: 5 / 35 = 0.14 > 0.1
    assert ga.forgotten(3, 32)  # 3 / 32 = 0.094
    assert not ga.forgotten(4, 32)  # 0.125
    with pytest.raises(ConfigError, match=r"method\.stop_forget_acc=1"):
        GradAscent(torch.nn.Linear(2, 2), stop_forget_acc=1)


def test_stop_rule_ends_the_run_before_the_step_that_would_pass_the_target(tiny, shared_cache, monkeypatch):
    """The run stops at the first pooled window at or below the target, and that step is not taken."""
    seen, weights = [], []
    real = GradAscent.forgotten

    def forgotten(self, c, n):
        seen.append((c, n))
        weights.append({k: v.detach().clone() for k, v in self.net.named_parameters()})
        return real(self, c, n)
    monkeypatch.setattr(GradAscent, "forgotten", forgotten)
    stage = build(tiny("method=grad_ascent", "method.epochs=20", "method.stop_forget_acc=0.5", "method.optimizer.lr=3e-3",
                       "reference=none", f"paths.cache_dir={shared_cache}"))
    stage.fit()
    m = stage.module
    assert m.stopped_at_step is not None and stage.trainer.current_epoch < 19  # stopped early
    assert m.skipped_steps == 1 and stage.trainer.global_step - 1 == m.stopped_at_step  # what metrics.json counts
    assert len(seen) >= 2 and not torch.equal(weights[0]["body.fc.weight"], weights[-1]["body.fc.weight"])
    windows, pool = [], [0, 0]  # the rule's pooling, replayed: >= batch_size predictions per decision
    for c, n in seen:
        pool = [pool[0] + c, pool[1] + n]
        if pool[1] >= m.batch_size:
            windows.append(pool[0] / pool[1])
            pool = [0, 0]
    assert pool == [0, 0]  # the last call closed a window
    assert windows[-1] <= 0.5 and all(acc > 0.5 for acc in windows[:-1])
    final = dict(m.net.named_parameters())
    assert all(torch.equal(final[k], v) for k, v in weights[-1].items())  # the stopping step was not taken
    assert m.choices() == {"stopped_at_step": m.stopped_at_step, "stop_forget_acc": 0.5}


def test_stop_rule_for_samples_is_the_originals_validation_accuracy(tiny, shared_cache):
    from mu_runner.metrics.scoring import accuracy_on
    stage = build(tiny("method=grad_ascent", "forget=random", "method.epochs=3", "reference=none",
                       f"paths.cache_dir={shared_cache}"))
    val = stage.data.val
    expected = accuracy_on(stage.original, stage.data, val)
    hand = (stage.original.eval()(stage.data.images[val].float() / 255).argmax(1) == stage.data.labels[val]).float().mean()
    assert expected == pytest.approx(float(hand))  # the original's accuracy on the validation images
    stage.fit()
    assert stage.module.target == expected and 0 < expected < 1
    assert stage.module.choices()["stop_forget_acc"] == expected


def test_metrics_json_counts_only_the_steps_taken_and_records_the_stop(tiny, shared_cache):
    import json
    from pathlib import Path

    from mu_runner.run import run
    cfg = tiny("method=grad_ascent", "method.epochs=20", "method.stop_forget_acc=0.5", "method.optimizer.lr=3e-3",
               "reference=none", f"paths.cache_dir={shared_cache}")
    run(cfg)
    m = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    stop = m["method_choices"]["stopped_at_step"]
    assert stop is not None and m["optimizer_steps"] == stop and m["method_choices"]["stop_forget_acc"] == 0.5
