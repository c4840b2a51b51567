"""All splits of one dataset as tensors on the training device, and the batches a stage asks for.

`InMemoryData` holds the source's images once; `StageData` (a LightningDataModule) serves the
splits a module declares (`module.batch_sizes`, e.g. {"forget": 32, "retain": 128}) as one
`PairedLoader` whose anchor split sets the epoch length. A method never sees a split it did not
declare: the test split is only reachable through evaluation code.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from mu_runner.data.forget import ForgetSplit
from mu_runner.data.loaders import PairedLoader, SequentialLoader, TensorLoader
from mu_runner.data.sources import Source

SPLITS = ("forget", "retain", "train", "val")  # train = forget + retain (the whole pool)


class InMemoryData:
    """Train pool / validation / test of one source; indices refer to the source's train set."""

    def __init__(self, source: Source, val_fraction: float, split_seed: int, augment: dict,
                 keep_out_of_val: list[int] | None = None) -> None:
        self.source, self.augment = source, dict(augment or {})
        self.images, self.labels = source.train.images, source.train.labels
        self.test_images, self.test_labels = source.test.images, source.test.labels
        self.pool, self.val = _val_split(self.labels, val_fraction, split_seed, keep_out_of_val)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def to(self, device: torch.device | str) -> InMemoryData:
        """Move every tensor to `device` once; batches are then slices on that device."""
        for name in ("images", "labels", "test_images", "test_labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.images.device

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel statistics of the training pool, for the model's normalisation layer."""
        x = self.images[self.pool.to(self.device)].float().div(255)
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).clamp_min(1e-3).tolist()

    def loader(self, indices: Tensor, batch_size: int, train: bool = False, seed: int = 0,
               targets: Tensor | None = None) -> TensorLoader:
        """Shuffled and augmented when `train`; in a fixed order, un-augmented otherwise."""
        return TensorLoader(self.images, self.labels, indices, batch_size, shuffle=train, seed=seed,
                            augment=self.augment if train else None, targets=targets)


def _val_split(labels: Tensor, fraction: float, seed: int, keep: list[int] | None) -> tuple[Tensor, Tensor]:
    """Per-class seeded validation split; ids in `keep` (deletion requests) stay in the pool."""
    gen = torch.Generator().manual_seed(int(seed))
    keep_t = torch.tensor(sorted(keep or []), dtype=torch.long)
    val = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[~torch.isin(idx, keep_t)]
        n = round(fraction * len(idx))
        val.append(idx[torch.randperm(len(idx), generator=gen)[:n]])
    val_t = torch.cat(val).sort().values if val else torch.empty(0, dtype=torch.long)
    pool = torch.arange(len(labels))
    return pool[~torch.isin(pool, val_t)], val_t


class StageData(L.LightningDataModule):
    """Serves the splits the fitted module declares, on the trainer's device."""

    def __init__(self, data: InMemoryData, split: ForgetSplit, seed: int = 0) -> None:
        super().__init__()
        self.data, self.split, self.seed = data, split, seed

    def indices(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; a method may use {SPLITS}")
        if name == "train":
            return torch.cat([self.split.forget, self.split.retain]).sort().values
        return {"forget": self.split.forget, "retain": self.split.retain, "val": self.data.val}[name]

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.data.to(self.trainer.strategy.root_device)

    def train_dataloader(self) -> PairedLoader | SequentialLoader:
        """The module's splits: paired batches (anchor sets the epoch) or sequential passes."""
        module = self.trainer.lightning_module
        loaders = {}
        for i, (name, size) in enumerate(module.batch_sizes.items()):
            indices = self.indices(name)
            if hasattr(module, "select"):  # e.g. a seeded subset of the retain set
                indices = module.select(name, indices)
            targets = (lambda n=name: module.targets(n)) if hasattr(module, "targets") else None
            loader = self.data.loader(indices, size, train=True, seed=self.seed + i, targets=targets)
            loader.rank, loader.world_size = self.trainer.global_rank, self.trainer.world_size
            loaders[name] = loader
        if getattr(module, "schedule", "paired") == "sequential":
            return SequentialLoader(loaders, module.epoch_plan)
        return PairedLoader(loaders, module.anchor)

    def batches(self, name: str, batch_size: int = 256) -> TensorLoader:
        """A fixed-order, un-augmented pass over one split, for set-up work (masks, importances)."""
        return self.data.loader(self.indices(name), batch_size, train=False)
