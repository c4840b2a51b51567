"""Batches as index slices of tensors that already sit on the training device.

No per-sample Python work: a batch is `images[idx]`, augmentation is applied to the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

Batch = tuple[Tensor, Tensor]


def shift_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator, whole: int | None = None,
               take: slice = slice(None)) -> Tensor:
    """Random shift by up to `pad` pixels (zero padding) and optional horizontal flip, batched.

    Under DDP `x` is one rank's share `take` of a global batch of `whole` images: the random draws
    are made for the whole batch, as a single process makes them, and sliced, so each image gets
    the shift and flip it gets in a single-process run.
    """
    n, c, h, w = x.shape
    m = n if whole is None else int(whole)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (m,), generator=gen)[take].to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (m,), generator=gen)[take].to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        mask = (torch.rand(m, generator=gen) < 0.5)[take].to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


class TensorLoader:
    """An epoch of (x, y) batches over `indices`; x is float in [0, 1].

    Shuffling is seeded by (seed, epoch), so a rerun sees the same order. `batch_size` is global:
    under DDP (`rank`, `world_size` set by StageData) the epoch is padded to a multiple of
    `world_size` (wrapping around, like DDP's sampler), cut into global batches of `batch_size`,
    and rank r takes every `world_size`-th image of each, from the r-th on (`batch_size` must be a
    multiple of `world_size`). The ranks' shares of step i are then exactly a single process's
    batch i, augmented alike (`shift_flip`), so DDP changes no number but float reduction order
    (docs/design.md, Running at scale).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        indices: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: dict | None = None,
        drop_last: bool = False,
        targets: Tensor | Callable[[], Tensor | None] | None = None,
    ) -> None:
        self.images, self.labels, self.indices = images, labels, indices.cpu()
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, seed
        self.augment = augment if augment and (augment.get("pad") or augment.get("flip")) else None
        self.drop_last, self.epoch = drop_last, 0
        self.targets = targets  # optional per-index labels (e.g. reassigned), aligned with indices
        self.rank, self.world_size = 0, 1

    def _order(self) -> Tensor:
        order = torch.arange(len(self.indices))
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.indices), generator=gen)
            self.epoch += 1
        if self.world_size > 1:  # every rank gets ceil(n / world_size): wrap around, like DDP's sampler
            if self.batch_size % self.world_size:
                raise ValueError(f"batch size {self.batch_size} is not a multiple of the {self.world_size} "
                                 "DDP processes (batch sizes are global)")
            extra = -len(order) % self.world_size
            order = torch.cat([order, order[:extra]])
        return order  # the whole epoch; __iter__ takes this rank's share of every global batch

    @property
    def sampler(self) -> TensorLoader:
        """Lightning's fit loop calls `sampler.set_epoch(epoch)` before every epoch (fabric's
        `_set_sampler_epoch`): a training resumed from a checkpoint shuffles its epochs as before."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = math.ceil(len(self.indices) / self.world_size) * self.world_size  # padded for DDP
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        # callable targets are read when the epoch starts: a method may relabel in on_train_start
        targets = self.targets() if callable(self.targets) else self.targets
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7)
        device = self.images.device
        mine = slice(self.rank, None, self.world_size)
        for i in range(len(self)):
            step = order[i * self.batch_size : (i + 1) * self.batch_size]  # the global batch
            pos = step[mine]
            idx = self.indices[pos].to(device)
            x = self.images[idx].float().div_(255)
            if self.augment:
                x = shift_flip(x, int(self.augment.get("pad", 0)), bool(self.augment.get("flip")), gen,
                               whole=len(step), take=mine)
            y = self.labels[idx] if targets is None else targets[pos].to(device)
            yield x, y


class PairedLoader:
    """Batches as {split: (x, y)}: the anchor split sets the epoch length, the others cycle."""

    def __init__(self, loaders: dict[str, TensorLoader], anchor: str) -> None:
        if anchor not in loaders:
            raise ValueError(f"anchor split {anchor!r} not among {sorted(loaders)}")
        self.loaders, self.anchor = loaders, anchor

    @property
    def sampler(self) -> TensorLoader:
        """The anchor's epoch follows Lightning's (see TensorLoader.sampler); the cycled splits keep
        their own count of passes."""
        return self.loaders[self.anchor]

    def __len__(self) -> int:
        return len(self.loaders[self.anchor])

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        others = {k: _cycle(v) for k, v in self.loaders.items() if k != self.anchor}
        for batch in self.loaders[self.anchor]:
            yield {self.anchor: batch, **{k: next(it) for k, it in others.items()}}


class SequentialLoader:
    """Whole passes one split after another, as {split: (x, y)} batches.

    `plan()` is asked at the start of every epoch which splits to pass over, in order (e.g. SCRUB's
    max pass over the forget set in the first epochs only, then a min pass over the retain set).
    """

    def __init__(self, loaders: dict[str, TensorLoader], plan: Callable[[], list[str]]) -> None:
        self.loaders, self.plan = loaders, plan

    def __len__(self) -> int:  # an upper bound; an epoch may end sooner
        return sum(len(v) for v in self.loaders.values())

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        for name in self.plan():
            for batch in self.loaders[name]:
                yield {name: batch}


def _cycle(loader: TensorLoader) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("cannot cycle an empty split")


AugmentFn = Callable[[Tensor], Tensor]
