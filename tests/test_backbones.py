"""Any timm classification model at the data's image size, or one line before training; local
pretrained weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from mu_runner.errors import ConfigError
from mu_runner.models import build_classifier, one_by_one, stage_sizes


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_transformers_named_without_vit_take_small_images(name):
    net = build_classifier(name, 10, 3, 32, [0.5] * 3, [0.25] * 3)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    sizes = stage_sizes(net, (3, 32, 32))
    if name.startswith("swin"):  # NHWC stages read as N, C, H, W: 8, 4, 2, 1 px
        assert [hw for hw in sizes.values()] == [[8, 8], [4, 4], [2, 2], [1, 1]]
        assert one_by_one(sizes) == ["layers.3"]


def test_a_backbone_that_cannot_take_the_input_fails_in_one_line_before_training(tiny, monkeypatch):
    monkeypatch.setattr("mu_runner.run.get_original", lambda *a, **k: pytest.fail("trained before checking"))
    from mu_runner.run import build
    with pytest.raises(ConfigError, match=r"backbone cannot take 1x8x8 inputs") as err:
        build(tiny("backbone=resnet18", "backbone.name=convnext_atto"))
    assert "\n" not in str(err.value)


def test_pretrained_weights_come_from_a_local_checkpoint_with_timm_adapting_the_head(tmp_path):
    source = timm.create_model("test_resnet", num_classes=5, in_chans=1, pretrained=False)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    net = build_classifier("test_resnet", 10, 1, 64, [0.5], [0.25], small_stem=False, pretrained=True,
                           checkpoint=str(path))
    theirs, ours = source.state_dict(), net.body.state_dict()
    assert torch.equal(ours["layer1.0.conv1.weight"], theirs["layer1.0.conv1.weight"])
    assert torch.equal(ours["conv1.0.weight"], theirs["conv1.0.weight"])  # test_resnet: a deep stem
    assert ours["fc.weight"].shape[0] == 10  # a new head for this data's classes
    fresh = build_classifier("test_resnet", 10, 1, 64, [0.5], [0.25], small_stem=False)
    assert not torch.equal(fresh.body.state_dict()["layer1.0.conv1.weight"], theirs["layer1.0.conv1.weight"])


@pytest.mark.parametrize("checkpoint", [None, "missing.pth"])
def test_pretrained_needs_a_local_file(checkpoint):
    with pytest.raises(ConfigError, match=r"backbone\.pretrained=true needs backbone\.checkpoint"):
        build_classifier("test_resnet", 10, 1, 8, [0.5], [0.25], pretrained=True, checkpoint=checkpoint)
