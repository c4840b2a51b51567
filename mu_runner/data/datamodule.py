"""All splits of one dataset as tensors on the training device, and the batches a stage asks for.

`InMemoryData` holds the source's images once; `StageData` (a LightningDataModule) serves what
the fitted module's `data_plan()` declares, from the plan alone: the served splits as one
`PairedLoader` (the anchor's pass is the epoch) or `SequentialLoader` (whole passes), and every
declared split through the module's `MethodData` view (`module.data`), which refuses the others. A
method never sees a split it did not declare: the test split is only reachable through evaluation
code (docs/design.md, Data plan).
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from mu_runner.data.forget import ForgetSplit
from mu_runner.data.loaders import PairedLoader, SequentialLoader, TensorLoader
from mu_runner.data.plan import SPLITS, DataPlan, MethodData, Schedule
from mu_runner.data.sources import Source
from mu_runner.errors import ConfigError


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
    """Serves the splits the fitted module's data plan declares, on the trainer's device.

    `split` None: no forget set (a method's `prepare`, shared by every forget set).
    """

    def __init__(self, data: InMemoryData, split: ForgetSplit | None, seed: int = 0) -> None:
        super().__init__()
        self.data, self.split, self.seed = data, split, seed
        self.plan: DataPlan | None = None
        self.method_data: MethodData | None = None

    def indices(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; a method may use {SPLITS}")
        if name == "val":
            return self.data.val
        if name == "train":
            return torch.cat([self.split.forget, self.split.retain]).sort().values
        return {"forget": self.split.forget, "retain": self.split.retain}[name]

    def attach(self, plan: DataPlan, who: str = "the method") -> MethodData:
        """Take `plan` as what is served, and make the view the module reads (`module.data`)."""
        self.plan, self.method_data = plan, MethodData(self, plan, who)
        return self.method_data

    def batch_sizes(self, plan: DataPlan) -> dict[str, int]:
        """The served splits' batch sizes, shares (`SplitSpec.share_of`) resolved on this stage's splits."""
        shares = {s.share_of for s in plan.served if s.share_of} | {s.name for s in plan.served if s.share_of}
        return plan.batch_sizes({name: len(self.indices(name)) for name in shares})

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.data.to(self.trainer.strategy.root_device)
            module = self.trainer.lightning_module
            self.attach(module.data_plan(), module.who)

    def train_dataloader(self) -> PairedLoader | SequentialLoader | IdleLoader:
        """The plan's served splits: paired batches (anchor sets the epoch) or sequential passes."""
        plan = self.plan
        sizes = self.batch_sizes(plan)
        check_batch_sizes(sizes, self.trainer.world_size)
        loaders = {}
        for i, spec in enumerate(plan.served):  # loader seeds by position among the served splits
            indices = self.indices(spec.name)
            if spec.select is not None:  # e.g. a seeded subset of the retain set
                indices = spec.select(indices)
            loader = self.data.loader(indices, sizes[spec.name], train=True, seed=self.seed + i, targets=spec.targets)
            # DDP: batch sizes are global, each rank takes its share of every batch (TensorLoader)
            loader.rank, loader.world_size = self.trainer.global_rank, self.trainer.world_size
            loaders[spec.name] = loader
        if not loaders:  # one-shot: Lightning asks for a loader; no batch is ever drawn from it
            return IdleLoader()
        if plan.schedule is Schedule.SEQUENTIAL:
            return SequentialLoader(loaders, lambda: plan.passes(self.trainer.current_epoch))
        return PairedLoader(loaders, plan.anchor)

    def batches(self, name: str, batch_size: int = 256) -> TensorLoader:
        """A fixed-order, un-augmented pass over one split (the runner's and tests'; a method reads
        through `module.data`)."""
        return self.data.loader(self.indices(name), batch_size, train=False)


class IdleLoader:
    """The loader of a plan that serves no split (one-shot methods): one step long, it yields none."""

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter(())


def check_batch_sizes(sizes: dict[str, int], world_size: int) -> None:
    """Under DDP every batch size is global and must split evenly among the processes."""
    bad = {name: size for name, size in sizes.items() if int(size) % int(world_size)}
    if world_size > 1 and bad:
        listed = ", ".join(f"{name} {size}" for name, size in bad.items())
        raise ConfigError(f"batch size ({listed}) is not a multiple of the {world_size} DDP processes: batch "
                          f"sizes are global (each process takes batch/{world_size}); choose a multiple of {world_size}")
