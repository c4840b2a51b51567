"""Backbones from timm, wrapped so that input normalisation is the model's first module.

Methods that build or perturb inputs (boundary attacks, noise, codes) then work in pixel space,
[0, 1], whatever the dataset's statistics (docs/methods.md, General rules).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from mu_runner.errors import ConfigError

# Parameter-name prefixes that belong to the stem, before the first stage.
STEM = ("conv1", "bn1", "act1", "maxpool", "stem", "patch_embed", "cls_token", "pos_embed", "reg_token")


class Classifier(nn.Module):
    """A timm network with per-channel normalisation (buffers, not parameters) in front."""

    def __init__(self, body: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=True)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.body((x - self.mean) / self.std)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (pooled, before the classifier)."""
        h = self.body.forward_features((x - self.mean) / self.std)
        return self.body.forward_head(h, pre_logits=True)

    @property
    def head_name(self) -> str:
        """Name of the classifier module inside `body` (`fc` for ResNets, `head` for ViTs)."""
        head = self.body.get_classifier()
        return next(n for n, m in self.body.named_modules() if m is head)

    @property
    def stage_names(self) -> list[str]:
        """Modules whose outputs are the network's stages (timm's feature_info), e.g. layer1..4."""
        names = [f["module"] for f in getattr(self.body, "feature_info", [])]
        return [n for n in names if n and n.split(".")[0] not in STEM]

    @property
    def stage_channels(self) -> dict[str, int]:
        """Stage name -> its output channels (timm's feature_info)."""
        return {f["module"]: f["num_chs"] for f in getattr(self.body, "feature_info", []) if f.get("module")}

    def stage_of(self, param_name: str) -> str:
        """Stage a parameter belongs to: stem, a stage name (layer3, blocks.5), or the head."""
        name = param_name.removeprefix("body.")
        for stage in self.stage_names:
            if name.startswith(stage + "."):
                return stage
        if name.split(".")[0] in STEM:
            return "stem"
        if name.startswith(self.head_name + "."):
            return self.head_name
        return name.split(".")[0]


def _small_stem(body: nn.Module, in_chans: int) -> None:
    """Replace a ResNet stem by one 3x3 stride-1 conv and drop the max-pool (CIFAR-style)."""
    width = body.bn1.num_features
    body.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
    body.maxpool = nn.Identity()


def build_classifier(
    name: str,
    num_classes: int,
    in_chans: int,
    img_size: int,
    mean: list[float],
    std: list[float],
    small_stem: bool | str = "auto",
    model_args: dict | None = None,
    pretrained: bool = False,
    checkpoint: str | None = None,
) -> Classifier:
    """Build any timm classification model `name` for `img_size` inputs.

    Models that take timm's `img_size` argument (ViT, DeiT, Swin, ...) get the data's size, and for
    small images (<= 64 px, `small_stem`) a patch of 2 px (<= 16 px) or 4 px where they take
    `patch_size`; ResNet-style stems get a 3x3 stride-1 stem without max-pool. `model_args` go to
    `timm.create_model` as they are. `pretrained=true` loads the local `checkpoint` through timm's
    `pretrained_cfg_overlay` (its own head and input-channel adaptation; nothing is downloaded).
    Whether the model takes this input size is checked by the runner with one forward pass of a single
    sample before any training (`stage_sizes`).
    """
    if small_stem not in ("auto", True, False):
        raise ConfigError(f"backbone.small_stem={small_stem!r}: allowed auto, true, false")
    small = img_size <= 64 if small_stem == "auto" else bool(small_stem)
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans, "pretrained": bool(pretrained),
                    **(model_args or {})}
    if pretrained:
        if not checkpoint or not Path(str(checkpoint)).is_file():
            raise ConfigError(f"backbone.pretrained=true needs backbone.checkpoint=<a local weights file> "
                              f"(got {checkpoint!r}); no model hub is reached")
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
    sized = {"img_size": img_size, **({"patch_size": 2 if img_size <= 16 else 4} if small else {})}
    body = None
    for extra in (sized, {"img_size": img_size}, {}):  # the richest set of arguments the family takes
        try:
            body = timm.create_model(name, **{**extra, **kwargs})
            break
        except TypeError as err:
            if not any(f"'{k}'" in str(err) for k in extra):
                raise ConfigError(f"backbone.model_args={dict(model_args or {})}: {err}") from None
        except RuntimeError as err:  # timm: "Unknown model (...)", a checkpoint that does not load
            raise ConfigError(f"backbone.name={name!r}: {str(err).splitlines()[0]}") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"backbone.checkpoint={checkpoint!r}: {str(err).splitlines()[0]}") from None
    if small and hasattr(body, "maxpool") and hasattr(body, "conv1"):
        _small_stem(body, in_chans)
    # channels-last: about 25 % faster on CPU (oneDNN) and what tensor cores want on GPU
    return Classifier(body, mean, std).to(memory_format=torch.channels_last)


def to_nchw(out: Tensor, channels: int | None) -> Tensor:
    """A 4-D stage output as N, C, H, W (Swin-style stages return N, H, W, C)."""
    if channels is not None and out.shape[1] != channels and out.shape[-1] == channels:
        return out.permute(0, 3, 1, 2)
    return out


def stage_sizes(net: Classifier, shape: tuple[int, int, int]) -> dict[str, list[int]]:
    """Spatial size (h, w) of each stage's output for one input of `shape`, from one CPU forward pass
    of a single zero sample (token stages report []). Bad input for the backbone fails here, before
    any training, as one ConfigError line."""
    modules = dict(net.body.named_modules())
    sizes: dict[str, list[int]] = {}

    def hook(name: str):
        def fn(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            sizes[name] = list(to_nchw(out, net.stage_channels.get(name)).shape[2:4]) if out.dim() == 4 else []
        return fn

    handles = [modules[s].register_forward_hook(hook(s)) for s in net.stage_names if s in modules]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *shape, device=next(net.parameters()).device))
    except Exception as err:  # noqa: BLE001 - any failure of the forward pass is a config problem
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"backbone cannot take {shape[0]}x{shape[1]}x{shape[2]} inputs: {first}") from None
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return sizes


def one_by_one(sizes: dict[str, list[int]]) -> list[str]:
    """Stages whose feature map is 1x1: a 3x3 kernel there sees 8 padding taps of 9."""
    return [s for s, hw in sizes.items() if hw == [1, 1]]
