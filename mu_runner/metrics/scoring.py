"""Scoring helpers shared by methods and the evaluator: eval-mode prediction on uint8 images,
accuracy on a split, seeded stratified subsets. Methods import these, never `mu_runner.evaluation`.

Scoring is in eval mode, float32, without augmentation; the model's mode is restored after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
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


def stratified_subset(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Up to n indices with classes represented in proportion (seeded)."""
    if n >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(labels), generator=gen)
    order = labels[perm].argsort(stable=True)  # grouped by class, random within class
    picks = ((torch.arange(n) + 0.5) * len(labels) / n).floor().long()  # midpoints: each class +-1
    return perm[order][picks].sort().values


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
