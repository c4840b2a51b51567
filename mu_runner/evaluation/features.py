"""Features and probes of the analyses (how the network changed): stage features, feature shift,
penultimate features and the forget-class linear probe."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import _device, half_split, scoring, stratified_subset
from mu_runner.models import to_nchw


def stage_features(net: nn.Module, stages: list[str], images: Tensor, batch_size: int = 512) -> dict[str, Tensor]:
    """Outputs of the named modules, global-average-pooled to channels (tokens for ViTs)."""
    modules = dict(net.named_modules())
    feats: dict[str, list[Tensor]] = {s: [] for s in stages}

    channels = net.stage_channels if hasattr(net, "stage_channels") else {}

    def hook(name: str):
        def fn(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            if out.dim() == 4:
                out = to_nchw(out, channels.get(name.removeprefix("body."))).mean((2, 3))
            elif out.dim() == 3:
                out = out.mean(1)
            feats[name].append(out.float().cpu())
        return fn

    handles = [modules[s].register_forward_hook(hook(s)) for s in stages]
    try:
        with scoring(net):
            for chunk in images.split(batch_size):
                net(chunk.to(_device(net)).float().div_(255))
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v) for s, v in feats.items()}


def feature_shift(a: nn.Module, b: nn.Module, stages: list[str], images: Tensor) -> dict[str, float]:
    """Per stage: 1 - linear CKA between the two models' features on the same images."""
    fa, fb = stage_features(a, stages, images), stage_features(b, stages, images)
    return {s: 1.0 - MF.linear_cka(fa[s], fb[s]) for s in stages}


def penultimate_features(net: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """`net.features` (pooled, before the classifier) of uint8 images, float32 on the CPU."""
    with scoring(net):
        return torch.cat([net.features(chunk.to(_device(net)).float().div_(255)).float().cpu()
                          for chunk in images.split(batch_size)])


def probe_forget_acc(net: nn.Module, data: InMemoryData, classes: list[int] | None, seed: int = 0,
                     max_samples: int | None = None) -> float | None:
    """Do the penultimate features still encode the forgotten classes? (docs/evaluation.md, probe_forget_acc)

    A linear probe on frozen features of D_te (at most `max_samples`, stratified): fit on a
    stratified seeded half, accuracy on the other half's forget-class images. None for sample
    forgetting (no forgotten class).
    """
    if not classes:
        return None
    labels = data.test_labels.cpu()
    keep = stratified_subset(labels, max_samples, seed) if max_samples else torch.arange(len(labels))
    labels = labels[keep]
    fit, score = half_split(labels, seed)
    feats = penultimate_features(net, data.test_images[keep.to(data.test_images.device)])
    score = score[torch.isin(labels[score], torch.tensor(classes))]
    return MF.linear_probe_accuracy(feats[fit], labels[fit], feats[score], labels[score])


def shift_subsets(data: InMemoryData, split: ForgetSplit, n: int, seed: int = 0) -> dict[str, Tensor]:
    """Images for feature_shift on forget and on retain samples (at most n each, stratified).

    Class forgetting: test images of the forgotten / the retained classes (unseen by every model).
    Sample forgetting: the forget samples D_f / as many retain samples D_r (training images).
    """
    if split.classes:
        labels = data.test_labels.cpu()
        forget = torch.isin(labels, torch.tensor(split.classes))
        out = {}
        for name, mask in (("forget", forget), ("retain", ~forget)):
            idx = mask.nonzero().flatten()
            out[name] = data.test_images[idx[stratified_subset(labels[idx], n, seed)].to(data.test_images.device)]
        return out
    labels = data.labels.cpu()
    out = {}
    for name, idx in (("forget", split.forget.cpu()), ("retain", split.retain.cpu())):
        idx = idx[stratified_subset(labels[idx], min(n, len(split.forget)), seed)]
        out[name] = data.images[idx.to(data.images.device)]
    return out
