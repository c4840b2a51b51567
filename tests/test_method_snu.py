"""snu: class-labelled error-maximising noise, θ untouched while it is made, a capped retain subset
with no forget class, impair then repair, and Grad-CAM views that touch nothing and land as one PNG."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_recording_loaders, same_state

from mu_runner.errors import ConfigError
from mu_runner.methods.snu import error_maximising_noise, gradcam
from mu_runner.outputs import write_outputs
from mu_runner.run import make_method

B, COPIES, N_R = 8, 3, 20


def fit(shared_cache, tmp, *overrides):
    """Build and fit a tiny snu stage; also returns the index sets of every loader it built."""
    return fit_recording_loaders(["method=snu", f"method.noise_batch={B}", f"method.copies={COPIES}",
                                  "method.noise_steps=5", "method.batch_size=64", "method.optimizer.lr=1e-3",
                                  "method.repair_lr=5e-4", "reference=none", "callbacks.eval_every_n_epochs=0",
                                  f"paths.cache_dir={shared_cache}", *overrides], tmp)


@pytest.fixture(scope="module")
def fitted(shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snu")
    stage, loaders = fit(shared_cache, tmp, "forget.k=3", f"method.retain_per_class={N_R}", "method.gradcam_samples=4")
    write_outputs(stage, stage.evaluate(), Path(stage.cfg.paths.output_dir))
    return stage, loaders



def test_every_noise_image_carries_its_own_class(fitted):
    stage, _ = fitted
    noise, labels, classes = stage.module.noise, stage.module.noise_labels, stage.split.classes
    assert len(classes) == 3 and sorted(labels.unique().tolist()) == classes  # not all labelled 0
    assert len(noise) == len(labels) == COPIES * B * len(classes)
    for c in classes:
        rows = noise[labels == c]
        assert len(rows) == COPIES * B and len(rows.flatten(1).unique(dim=0)) == B  # B distinct, each `copies`x
        others = noise[labels != c].flatten(1)
        assert not (rows.flatten(1)[:, None] == others[None]).all(-1).any()  # no tensor under two labels


def test_noise_for_c_maximises_the_originals_error_on_c(fitted):
    stage, _ = fitted
    net, classes, shape = stage.original.eval(), stage.split.classes, tuple(stage.data.images.shape[1:])
    start, labels = error_maximising_noise(net, classes, B, shape, 0, 0.1, 0.1, stage.module.seed)  # the randn init
    made, _ = error_maximising_noise(net, classes, B, shape, 5, 0.1, 0.1, stage.module.seed)
    with torch.no_grad():
        ce_start = F.cross_entropy(net(start), labels, reduction="none")
        ce_made = F.cross_entropy(net(made), labels, reduction="none")
    for c in classes:  # each class block moved away from its own label
        assert ce_made[labels == c].mean() > ce_start[labels == c].mean() + 0.5


def test_noise_optimisation_leaves_theta_bit_identical(fitted):
    stage, _ = fitted
    net = copy.deepcopy(stage.original).train()
    before = copy.deepcopy(net)
    error_maximising_noise(net, stage.split.classes, B, tuple(stage.data.images.shape[1:]), 5, 0.1, 0.1, 0)
    assert same_state(net, before)  # BN ran in eval mode: running stats unchanged too
    assert net.training and all(p.grad is None for p in net.parameters())


def test_retain_subset_has_no_forget_class_and_n_r_per_class(fitted):
    stage, loaders = fitted
    labels = stage.data.labels.cpu()
    subset = stage.module.retain_subset
    counts = torch.bincount(labels[subset], minlength=stage.data.num_classes)
    assert counts[stage.split.classes].sum() == 0
    kept = [c for c in range(stage.data.num_classes) if c not in stage.split.classes]
    assert (counts[kept] == N_R).all() and torch.isin(subset, stage.split.retain).all()
    assert [sorted(ix.tolist()) for ix in loaders] == [subset.tolist()]  # D_f never loaded: noise needs no image
    stage.module.retain_per_class = 10**6  # capped by what each class has: all of D_r
    assert torch.equal(stage.module.retain_subset_of(stage.split.retain), stage.split.retain.sort().values)
    stage.module.retain_per_class = N_R
    assert torch.equal(stage.module.retain_subset_of(stage.split.retain), subset)  # seeded: the same subset


def test_impair_then_repair_epochs_with_a_fresh_optimizer_at_repair_lr(fitted):
    stage, _ = fitted
    module = stage.module
    steps_per_epoch = -(-len(module.retain_subset) // module.batch_size)
    assert stage.trainer.global_step == (module.impair_epochs + module.repair_epochs) * steps_per_epoch
    assert module.noise_share * steps_per_epoch >= len(module.noise) > module.noise_share * (steps_per_epoch - 1)
    assert [g["lr"] for g in module.optimizers().optimizer.param_groups] == [module.repair_lr]


def test_gradcam_touches_nothing_and_returns_maps_in_unit_interval(fitted):
    stage, _ = fitted
    net = copy.deepcopy(stage.original).train()
    before = copy.deepcopy(net)
    x = stage.data.images[stage.split.forget[:5]].float() / 255
    maps = gradcam(net, "body.layer3", x, torch.tensor([0, 1, 2, 3, 4]))
    assert not x.requires_grad  # the caller's images are not turned into autograd leaves
    assert maps.shape == (5, 8, 8) and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.5
    assert same_state(net, before) and net.training and all(p.grad is None for p in net.parameters())


def test_gradcam_grid_png_is_in_the_run_directory(fitted):
    stage, _ = fitted
    png = Path(stage.cfg.paths.output_dir) / "gradcam_views.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cams = stage.module.cams
    assert stage.module._layer == "body.layer3"  # auto: layer4 is 1x1 on 8x8 digits
    for when in ("before", "after"):
        for group in ("forget", "retain"):
            assert cams[when][group]["true"].shape == (4, 8, 8)
    x = stage.module.views["forget"][0]
    with torch.no_grad():  # "before" is θ_o, "after" the unlearned network
        assert torch.equal(cams["before"]["forget"]["label"], stage.original.eval()(x).argmax(1))
        assert torch.equal(cams["after"]["forget"]["label"], stage.module.net.eval()(x).argmax(1))
    assert not torch.equal(cams["before"]["forget"]["true"], cams["after"]["forget"]["true"])


def test_gaussian_on_forget_relabels_into_retained_classes(shared_cache, tmp_path):
    stage, _ = fit(shared_cache, tmp_path, "forget.k=2", "method.noise_mode=gaussian_on_forget",
                         "method.gradcam_samples=0", "+trainer.max_steps=1")
    module, forget = stage.module, stage.split.forget
    y = stage.data.labels.cpu()[forget].repeat(COPIES)
    assert len(module.noise) == COPIES * len(forget) and module.noise.min() >= 0 and module.noise.max() <= 1
    assert not torch.isin(module.noise_labels.cpu(), torch.tensor(stage.split.classes)).any()
    assert (module.noise_labels.cpu() != y).all()


def test_bad_noise_mode_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match=r"method\.noise_mode='blur': allowed error_max, gaussian_on_forget"):
        make_method(tiny("method=snu", "method.noise_mode=blur"), net=None)
