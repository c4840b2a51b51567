"""random_label: every forget sample gets one allowed wrong label (seeded), served to training;
nearest_wrong is θ_o's best allowed class; freeze leaves everything outside `trainable` untouched."""

from __future__ import annotations

import pytest
import torch

from mu_runner.errors import ConfigError
from mu_runner.methods.random_label import RandomLabel
from mu_runner.run import build, load_data, make_method, new_net


def fitted(tiny, cache, *extra: str, monkeypatch=None, seen=None):
    stage = build(tiny("method=random_label", "method.epochs=1", "method.batch_size=128",
                       "reference=none", f"paths.cache_dir={cache}", *extra))
    if seen is not None:  # record the splits and targets of every training batch
        real = RandomLabel.unlearning_loss
        monkeypatch.setattr(RandomLabel, "unlearning_loss", lambda self, b: (
            seen.append({k: y.clone() for k, (_, y) in b.items()}), real(self, b))[1])
    stage.fit()
    return stage


def test_three_forget_classes_relabelled_into_retained_classes_and_served(tiny, shared_cache, monkeypatch):
    seen = []
    stage = fitted(tiny, shared_cache, "forget.k=3", "+trainer.max_steps=3",
                   monkeypatch=monkeypatch, seen=seen)
    m, cf = stage.module, torch.tensor(stage.split.classes)
    true = stage.data.labels.cpu()[stage.split.forget]
    assert len(cf) == 3 and m.new_labels.shape == true.shape  # every forget sample has a new label
    assert (m.new_labels != true).all() and not torch.isin(m.new_labels, cf).any()
    assert m.target_counts.sum() == len(true) and (m.target_counts[cf] == 0).all()
    served = torch.cat([b["forget"] for b in seen])
    assert len(served) > 0 and not torch.isin(served, cf).any()  # the loader serves the new labels


def test_nearest_wrong_equals_brute_force_masked_argmax_of_original_logits(tiny, shared_cache):
    stage = fitted(tiny, shared_cache, "forget.k=3", "method.relabel=nearest_wrong",
                   "+trainer.max_steps=1")
    x = stage.data.images[stage.split.forget].float() / 255
    true = stage.data.labels.cpu()[stage.split.forget].tolist()
    with torch.no_grad():
        logits = stage.original.eval()(x).tolist()
    for row, y, y_new in zip(logits, true, stage.module.new_labels.tolist(), strict=False):
        allowed = [k for k in range(len(row)) if k != y and k not in stage.split.classes]
        assert y_new == max(allowed, key=lambda k: row[k])


def test_same_seed_same_labels_other_seed_other_labels_sample_wise_never_the_true_one(tiny, shared_cache):
    def run(seed):
        return fitted(tiny, shared_cache, "forget=random", "forget.fraction=0.1",
                                  f"method.seed={seed}", "+trainer.max_steps=1")
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.module.new_labels, b.module.new_labels)
    assert not torch.equal(a.module.new_labels, c.module.new_labels)
    true = a.data.labels.cpu()[a.split.forget]
    assert (a.module.new_labels != true).all()
    assert (a.module.target_counts > 0).sum() >= 9  # sample-wise: any class but the true one


def test_freeze_keeps_parameters_and_buffers_outside_trainable_bit_identical(tiny, shared_cache):
    stage = fitted(tiny, shared_cache, "method.freeze=true", "+trainer.max_steps=3")
    before = stage.original.state_dict()
    moved = set()
    for name, value in stage.module.net.state_dict().items():
        inside = name.startswith(("body.layer4.", "body.fc."))
        if not inside:
            assert torch.equal(value, before[name]), name
        elif not torch.equal(value, before[name]):
            moved.add(name.split(".")[1])
    assert moved == {"layer4", "fc"}  # or a method that trains nothing would pass


def test_sequential_schedule_passes_over_forget_then_retain(tiny, shared_cache, monkeypatch):
    seen = []
    stage = fitted(tiny, shared_cache, "method.schedule=sequential",
                   "+trainer.limit_train_batches=4", monkeypatch=monkeypatch, seen=seen)
    order = [next(iter(b)) for b in seen]
    n_f = -(-len(stage.split.forget) // 128)
    assert order == ["forget"] * n_f + ["retain"] * (len(order) - n_f) and len(order) > n_f


@pytest.mark.parametrize("key, value", [("relabel", "uniform"), ("schedule", "shuffled")])
def test_unknown_modes_are_config_errors(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method.{key}='{value}'"):
        make_method(tiny("method=random_label", f"method.{key}={value}"), net=None)


def test_trainable_prefix_that_names_no_module_is_a_config_error(tiny):
    cfg = tiny("method=random_label", "method.freeze=true", "method.trainable=[layer4,layer9]")
    with pytest.raises(ConfigError, match=r"method.trainable=.*'layer9'"):
        make_method(cfg, net=new_net(cfg, load_data(cfg)))
