"""WF-Net (docs/methods.md, weight_filter): filters trained once on a frozen θ_o; unlearning = switching rows."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_config, optimizer_steps

from mu_runner.data.loaders import TensorLoader
from mu_runner.data.plan import MethodData
from mu_runner.errors import ConfigError
from mu_runner.methods.weight_filter import FilterTraining
from mu_runner.metrics.scoring import predict
from mu_runner.outputs import assemble
from mu_runner.run import build

# docs/methods.md's bound (row c: class c < 1/K, every other class within 5 points) needs a well-trained original
# (the 2-epoch tiny one is at 0.87 on the pool) and more filter steps than the ~10 per epoch tiny digits gives:
# measured with 10 filter epochs: worst other-class drop 0.21 (row 7 on class 4); with 20: 0.04. At the digits
# default lambda1 2 (chosen for ResNet-18) row 5 costs class 7 5.4 points on this tiny model; lambda1 1 holds.
FILTER_TINY = ["train.epochs=6", "method.epochs=20", "method.forget_weight=1"]
FORGET_SETS = (["forget.classes=[3]"], ["forget.classes=[5]"], ["forget.classes=[3,8]"])


@pytest.fixture(scope="module")
def wf(shared_cache, tmp_path_factory):
    """Three stages (forget {3}, {5}, {3, 8}) built on one fresh filter cache; every FilterTraining made."""
    tmp = tmp_path_factory.mktemp("wf")
    (shared_cache / "original").mkdir(exist_ok=True)
    (tmp / "cache").mkdir()
    (tmp / "cache" / "original").symlink_to(shared_cache / "original")  # the session's original
    trainings = []
    init = FilterTraining.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FilterTraining, "__init__", lambda self, *a, **k: (trainings.append(self), init(self, *a, **k))[1])
        stages = [build(compose_config([*TINY, "method=weight_filter", "reference=none", *FILTER_TINY,
                                        f"paths.cache_dir={tmp / 'cache'}", *o], tmp / f"run{i}"))
                  for i, o in enumerate(FORGET_SETS)]
    return stages, trainings


@pytest.fixture(scope="module")
def fitted(wf):
    """The first stage fitted, with every optimizer step and every batch a loader served meanwhile."""
    stage, served = wf[0][0], []
    iterate = TensorLoader.__iter__

    def spy(self):
        for batch in iterate(self):
            served.append(batch)
            yield batch
    with pytest.MonkeyPatch.context() as mp, optimizer_steps() as steps:
        mp.setattr(TensorLoader, "__iter__", spy)
        for read in ("batches", "loader", "indices", "images", "labels"):
            mp.setattr(MethodData, read, lambda self, *a, _read=read, **k: served.append((_read, a)) or [])
        stage.fit()
    return stage, steps, served


def test_filter_is_trained_once_and_reused_by_every_forget_set(wf):
    stages, trainings = wf
    assert len(trainings) == 1 and trainings[0].trainer.global_step > 0
    assert [s.module.prep_cached for s in stages] == [False, True, True]
    assert all(s.module.prep_seconds == stages[0].module.prep_seconds > 0 for s in stages)  # measured once
    for a, b in zip(stages[0].module.filter.alpha, stages[2].module.filter.alpha, strict=False):
        assert torch.equal(a, b)


def test_backbone_parameters_and_buffers_bit_identical_after_filter_training(wf):
    (stage, *_), (training,) = wf
    trained, original = training.net.net.state_dict(), stage.original.state_dict()
    assert trained.keys() == original.keys() and all(torch.equal(trained[k], original[k]) for k in trained)
    alpha = list(training.net.alpha)
    assert all(a.min() >= 0 and a.max() <= 1 for a in alpha)  # α ∈ [0, 1]
    assert sum(int((a < 0.5).sum()) for a in alpha) > 0  # the filters did train


def test_filters_cover_every_conv_and_linear_but_the_head(wf):
    filt = wf[0][0].module.filter
    wrapped = {n for n, m in filt.net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(filt.layers) == wrapped - {"body.fc"}
    assert all(a.shape == (10, filt.net.get_submodule(n).weight.shape[0]) for n, a in zip(filt.layers, filt.alpha, strict=False))


def test_no_row_gives_the_original_outputs_bit_identical(wf):
    stage = wf[0][0]
    x = stage.data.test_images[:64].float().div(255)
    filt = stage.module.filter.eval()
    filt.rows = None
    assert torch.equal(filt(x), stage.original.eval()(x))


def test_switching_rows_changes_no_stored_tensor(wf):
    filt = wf[0][0].module.filter.eval()
    before = {k: v.clone() for k, v in filt.state_dict().items()}
    x = wf[0][0].data.test_images[:16].float().div(255)
    outputs = []
    for rows in ([3], [5], [3, 8], torch.arange(16) % 10, None):
        filt.rows = rows
        outputs.append(filt(x))
    assert all(torch.equal(v, before[k]) for k, v in filt.state_dict().items())
    assert not torch.equal(outputs[0], outputs[1])  # the rows do differ


def test_unlearning_takes_no_optimizer_step_and_reads_no_data(fitted):
    stage, steps, served = fitted
    assert steps == [] and served == [] and stage.trainer.global_step == 0


def test_unlearned_net_holds_the_filtered_weights_of_the_active_row(fitted):
    stage = fitted[0]
    filt, net, original = stage.module.filter, stage.module.net, dict(stage.original.named_parameters())
    assert filt.rows == [3]
    for n, p in net.named_parameters():
        if n.removesuffix(".weight") in filt.layers:
            a = filt.alpha[filt.layers.index(n.removesuffix(".weight"))][3]
            assert torch.equal(p, original[n] * a.view(-1, *[1] * (p.dim() - 1))), n
        else:  # head, BN affine: untouched
            assert torch.equal(p, original[n]), n
    x = stage.data.test_images[:64].float().div(255)
    torch.testing.assert_close(net.eval()(x), filt.eval()(x), rtol=1e-4, atol=1e-4)
    m = assemble(stage, stage.evaluate())
    assert m["prep_seconds"] == stage.module.prep_seconds and m["prep_cached"] is False
    assert m["layer_change"]["fc"] == 0 and m["layer_change"]["layer1"] > 0


def test_several_classes_multiply_their_rows(wf):
    stage = wf[0][2]
    stage.module.switch([3, 8])
    filt, name = stage.module.filter, stage.module.filter.layers[-1]
    expected = stage.original.get_parameter(f"{name}.weight") * (filt.alpha[-1][3] * filt.alpha[-1][8]).view(-1, 1, 1, 1)
    assert torch.equal(stage.module.net.get_parameter(f"{name}.weight"), expected)
    stage.module.switch(None)  # back to θ_o
    assert all(torch.equal(p, q) for p, q in zip(stage.module.net.parameters(), stage.original.parameters(), strict=False))


def per_class_accuracy(net, stage, indices) -> torch.Tensor:
    labels = stage.data.labels.cpu()[indices]
    pred = predict(net, stage.data.images, indices).argmax(1)
    return torch.stack([(pred[labels == k] == k).float().mean() for k in range(10)])


def test_row_c_forgets_class_c_and_keeps_every_other_class(wf):
    """On the training pool: class c below 1/K, every other class within 5 points of θ_o."""
    stage = wf[0][0]
    filt, pool = stage.module.filter, stage.data.pool
    filt.rows = None
    base = per_class_accuracy(filt, stage, pool)
    for c in range(10):
        filt.rows = [c]
        acc = per_class_accuracy(filt, stage, pool)
        others = torch.arange(10) != c
        assert acc[c] < 0.1, (c, acc)
        assert (acc[others] >= base[others] - 0.05).all(), (c, acc - base)


@pytest.mark.parametrize("key, value", [("lr", "0"), ("rows_per_sample", "0"), ("alpha_weight", "-1")])
def test_weight_filter_rejects_bad_hyperparameters(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        build(tiny("method=weight_filter", f"method.{key}={value}"))
