"""The metric suite run on every model of a run (original, unlearned, retrained): DESIGN §3.

Evaluation is in eval mode, float32, without augmentation; the model's mode is restored after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.metrics import functional as MF


@contextmanager
def scoring(net: nn.Module):
    """Eval mode, no grad, no autocast; the previous train/eval mode comes back afterwards."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=_device(net).type, enabled=False):
            yield
    finally:
        net.train(was_training)


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def predict(net: nn.Module, images: Tensor, indices: Tensor | None = None, batch_size: int = 1024) -> Tensor:
    """Softmax probabilities of `images[indices]` (uint8) in chunks, on the model's device."""
    idx = torch.arange(len(images)) if indices is None else indices
    out = []
    with scoring(net):
        for chunk in idx.split(batch_size):
            x = images[chunk.to(images.device)].to(_device(net)).float().div_(255)
            out.append(net(x).float().softmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy_on(net: nn.Module, data: InMemoryData, indices: Tensor) -> float:
    """Accuracy of `net` on training-set images `data.images[indices]` (eval mode, fp32); 0 when empty."""
    acc = MF.accuracy(predict(net, data.images, indices).argmax(1), data.labels.cpu()[indices.cpu()])
    return 0.0 if acc is None else acc


def _mia_feature(probs: Tensor, labels: Tensor, kind: str) -> Tensor:
    if kind == "entropy":
        return MF.entropy(probs)
    return probs.gather(1, labels.view(-1, 1)).flatten() if len(labels) else torch.empty(0)


def evaluate(net: nn.Module, data: InMemoryData, split: ForgetSplit, seed: int = 0,
             mia: str = "confidence") -> dict[str, float | None]:
    """forget/retain/test accuracy, test accuracy on forgotten classes, MIA efficacy, and the
    loss-MIA accuracy with its forgetting score and NoMUS (non-members: D_te, class-wise D_te^F)."""
    labels, test_labels = data.labels.cpu(), data.test_labels.cpu()
    p_forget = predict(net, data.images, split.forget)
    p_retain = predict(net, data.images, split.retain)
    p_test = predict(net, data.test_images)
    y_f, y_r = labels[split.forget], labels[split.retain]
    is_forget_class = torch.zeros_like(test_labels, dtype=torch.bool)
    if split.classes is not None:
        is_forget_class = torch.isin(test_labels, torch.tensor(split.classes))
    keep = ~is_forget_class
    feat_test = _mia_feature(p_test[keep], test_labels[keep], mia)
    scores = {
        "forget_acc": MF.accuracy(p_forget.argmax(1), y_f),
        "retain_acc": MF.accuracy(p_retain.argmax(1), y_r),
        "test_acc": MF.accuracy(p_test[keep].argmax(1), test_labels[keep]),
        "test_forget_acc": None if split.classes is None
        else MF.accuracy(p_test[is_forget_class].argmax(1), test_labels[is_forget_class]),
        "mia_efficacy": MF.mia_efficacy(
            _mia_feature(p_retain, y_r, mia), feat_test, _mia_feature(p_forget, y_f, mia), seed),
    }
    unseen = is_forget_class if split.classes is not None else keep  # class-matched non-members
    mia_loss = MF.mia_loss_acc(MF.per_sample_loss(p_forget, y_f),
                               MF.per_sample_loss(p_test[unseen], test_labels[unseen]), seed)
    fs = MF.forget_score(mia_loss)
    return {**scores, "mia_loss_acc": mia_loss, "forget_score": fs, "nomus": MF.nomus(scores["test_acc"], fs)}


def stratified_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Up to n indices with classes represented in proportion (seeded)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(labels), generator=gen)
    order = labels[perm].argsort(stable=True)  # grouped by class, random within class
    picks = ((torch.arange(n) + 0.5) * len(labels) / n).floor().long()  # midpoints: each class +-1
    return perm[order][picks].sort().values


def stage_features(net: nn.Module, stages: list[str], images: Tensor, batch_size: int = 512) -> dict[str, Tensor]:
    """Outputs of the named modules, global-average-pooled to channels (tokens for ViTs)."""
    modules = dict(net.named_modules())
    feats: dict[str, list[Tensor]] = {s: [] for s in stages}

    def hook(name: str):
        def fn(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            feats[name].append((out.mean((2, 3)) if out.dim() == 4 else out.mean(1) if out.dim() == 3 else out).float().cpu())
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


def half_split(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded, stratified 50/50 split of range(len(labels)): (fit half, score half)."""
    gen = torch.Generator().manual_seed(int(seed))
    fit, score = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fit.append(idx[: len(idx) // 2])
        score.append(idx[len(idx) // 2:])
    return torch.cat(fit).sort().values, torch.cat(score).sort().values


def probe_forget_acc(net: nn.Module, data: InMemoryData, classes: list[int] | None, seed: int = 0,
                     max_samples: int | None = None) -> float | None:
    """Do the penultimate features still encode the forgotten classes? (METHODS.md probe_forget_acc)

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
