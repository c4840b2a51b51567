"""A method's data, declared: `UnlearningModule.data_plan()` returns one frozen `DataPlan`.

The plan names every split the method reads (docs/design.md, Data plan): those it trains on, with
their batch sizes (`SplitSpec.batch_size`), and those it only reads for set-up or selection work
(`batch_size=None`: validation images for a stopping rule, D_tr for importances). `StageData` builds
the training batches from the plan alone, and hands the method a `MethodData` (its `self.data`)
that serves the declared splits and refuses every other one. The test split is not a split a plan
can name: it is the evaluator's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mu_runner.errors import ConfigError

if TYPE_CHECKING:
    from mu_runner.data.loaders import TensorLoader

SPLITS = ("forget", "retain", "train", "val")  # train = forget + retain (the whole pool); test: never


class Schedule(Enum):
    """How the served splits make the steps of an epoch."""

    PAIRED = "paired"  # every step {split: batch} of each served split; the anchor's pass is the epoch, the others cycle
    SEQUENTIAL = "sequential"  # whole passes, one split after another: {split: batch} of one split a step


class UndeclaredSplitError(RuntimeError):
    """A method read a split (or images of one) that its data plan does not declare."""


@dataclass(frozen=True)
class SplitSpec:
    """One split of a plan.

    `batch_size`: served as training batches of this size (global under DDP), shuffled and augmented;
    None: not served, only read through `MethodData` (fixed order, un-augmented). `share_of`: the
    served batch is this split's share of the named split's `batch_size`, max(1, ⌈B·|this|/|that|⌉),
    so that both are passed once per epoch. `select(indices) -> indices`: the subset served (e.g. a
    seeded ρ of D_r). `targets() -> labels | None`: labels that replace y, aligned with the served
    indices, read at every epoch start (a method may relabel in `on_train_start`).
    """

    name: str
    batch_size: int | None = None
    share_of: str | None = None
    select: Callable[[Tensor], Tensor] | None = None
    targets: Callable[[], Tensor | None] | None = None

    def __post_init__(self) -> None:
        if self.name not in SPLITS:
            raise ValueError(f"a data plan declares splits among {SPLITS}, not {self.name!r}"
                             + (" (the test split is the evaluator's)" if self.name == "test" else ""))
        if self.batch_size is None:
            if self.share_of or self.select or self.targets:
                raise ValueError(f"split {self.name!r}: share_of, select and targets shape served batches; "
                                 "give it a batch_size")
        elif isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size <= 0:
            raise ConfigError(f"batch size of split {self.name!r} = {self.batch_size}: need an integer > 0")

    @property
    def served(self) -> bool:
        return self.batch_size is not None


@dataclass(frozen=True)
class DataPlan:
    """The splits a method reads, the anchor of paired batches, the schedule, the sequential passes.

    `epoch_plan(epoch) -> split names`: with `Schedule.SEQUENTIAL`, the served splits passed over in
    that (0-based) epoch, in order (None: every served split, in declared order). Served splits get
    their loaders' seeds by position (seed + i among the served splits), so their order is part of
    the plan.
    """

    splits: tuple[SplitSpec, ...] = ()
    anchor: str | None = None
    schedule: Schedule = Schedule.PAIRED
    epoch_plan: Callable[[int], Sequence[str]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        names = [s.name for s in self.splits]
        if len(set(names)) != len(names):
            raise ValueError(f"a data plan declares each split once: {names}")
        served = [s.name for s in self.served]
        if self.anchor is not None and self.anchor not in served:
            raise ValueError(f"anchor split {self.anchor!r} is not among the served splits {served}")
        if self.schedule is Schedule.PAIRED and served and self.anchor is None:
            raise ValueError(f"paired batches of {served} need an anchor (the split whose pass is the epoch)")
        if self.epoch_plan is not None and self.schedule is not Schedule.SEQUENTIAL:
            raise ValueError("epoch_plan (passes per epoch) needs Schedule.SEQUENTIAL")
        for s in self.splits:
            if s.share_of is not None and s.share_of not in names:
                raise ValueError(f"split {s.name!r} is a share of {s.share_of!r}, which the plan does not declare")

    @property
    def names(self) -> tuple[str, ...]:
        """Every split the method may read."""
        return tuple(s.name for s in self.splits)

    @property
    def served(self) -> tuple[SplitSpec, ...]:
        """The splits served as training batches, in declared order."""
        return tuple(s for s in self.splits if s.served)

    def spec(self, name: str) -> SplitSpec:
        for s in self.splits:
            if s.name == name:
                return s
        raise KeyError(f"split {name!r} is not in the data plan {self.names}")

    def batch_sizes(self, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
        """Served split -> batch size; a `share_of` is resolved with the splits' `sizes` (counts)
        when they are given, else it is its base batch size."""
        out = {}
        for s in self.served:
            size = int(s.batch_size)
            if s.share_of is not None and sizes is not None:
                size = max(1, math.ceil(size * sizes[s.name] / max(sizes[s.share_of], 1)))
            out[s.name] = size
        return out

    def passes(self, epoch: int) -> list[str]:
        """Sequential schedule: the splits passed over in `epoch`, in order."""
        served = [s.name for s in self.served]
        passes = list(self.epoch_plan(int(epoch))) if self.epoch_plan is not None else served
        if not set(passes) <= set(served):
            raise ValueError(f"epoch {epoch} passes over {passes}; served splits are {served}")
        return passes


@dataclass(frozen=True)
class EveryEpoch:
    """An `epoch_plan` that passes over the same splits, in this order, in every epoch (a value:
    two plans that make it alike are equal)."""

    names: tuple[str, ...]

    def __call__(self, epoch: int) -> tuple[str, ...]:
        return self.names


def every_epoch(*names: str) -> EveryEpoch:
    return EveryEpoch(tuple(names))


class MethodData:
    """What a method may read (`UnlearningModule.data`): the splits of its plan, nothing else.

    Split names go through `indices(name)`; images and labels are read by index, and every index
    must lie in a declared split. Anything else raises `UndeclaredSplitError`. `touched` records the
    splits the method asked for, `refused` every refusal (a method that catches the error is still
    caught by tests/test_methods.py). `owner` is the StageData (its `data`, `split` and `indices`); for
    `prepare` (shared by every forget set) it has no forget split, and forget / retain are refused.
    """

    def __init__(self, owner, plan: DataPlan, who: str = "the method") -> None:
        self._owner, self.plan, self.who = owner, plan, who
        self.touched: set[str] = set()
        self.refused: list[str] = []
        self._allowed: Tensor | None = None

    # -- what every method may know ----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self._owner.data.num_classes

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._owner.data.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self._owner.data.device

    @property
    def forget_classes(self) -> list[int] | None:
        """The forgotten classes (None: sample forgetting): the task, not a split."""
        if self._owner.split is None:
            raise self._refuse("forget_classes", f"{self.who}: no forget set here (prepare is shared by every forget set)")
        return self._owner.split.classes

    # -- declared splits ---------------------------------------------------------------------------
    def _refuse(self, what: str, message: str) -> UndeclaredSplitError:
        self.refused.append(what)
        return UndeclaredSplitError(message)

    def _declared(self, name: str) -> None:
        if name not in self.plan.names:
            raise self._refuse(name, f"{self.who} reads split {name!r}, which its data plan does not declare "
                                     f"(declared: {', '.join(self.plan.names) or 'none'})")
        if name in ("forget", "retain") and self._owner.split is None:
            raise self._refuse(name, f"{self.who}: no {name} split here (prepare is shared by every forget set)")

    def indices(self, name: str) -> Tensor:
        """Positions of a declared split in the training set (train: forget + retain, sorted)."""
        self._declared(name)
        self.touched.add(name)
        return self._owner.indices(name)

    def size(self, name: str) -> int:
        return len(self.indices(name))

    def _checked(self, ids: Tensor) -> Tensor:
        if self._allowed is None:
            for name in self.plan.names:
                self._declared(name)
            parts = [self._owner.indices(n).cpu() for n in self.plan.names]
            self._allowed = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        ids = torch.as_tensor(ids)
        if not bool(torch.isin(ids.cpu(), self._allowed).all()):
            raise self._refuse("images", f"{self.who} reads training-set images outside its declared splits "
                                         f"({', '.join(self.plan.names) or 'none'})")
        return ids

    def labels(self, ids: Tensor) -> Tensor:
        """True labels of `ids` (on the CPU)."""
        return self._owner.data.labels.cpu()[self._checked(ids).cpu()]

    def images(self, ids: Tensor) -> Tensor:
        """Images of `ids` as floats in [0, 1], on the data's device, un-augmented."""
        data = self._owner.data
        return data.images[self._checked(ids).to(data.device)].float().div(255)

    def loader(self, ids: Tensor, batch_size: int = 256) -> TensorLoader:
        """A fixed-order, un-augmented pass over `ids` (a subset of declared splits)."""
        return self._owner.data.loader(self._checked(ids), batch_size, train=False)

    def batches(self, name: str, batch_size: int = 256) -> TensorLoader:
        """A fixed-order, un-augmented pass over one declared split, for set-up work (masks, importances)."""
        return self.loader(self.indices(name), batch_size)

    def predict(self, net: nn.Module, ids: Tensor) -> Tensor:
        """Softmax probabilities of `net` on `ids` (eval mode, fp32; metrics.scoring.predict)."""
        from mu_runner.metrics.scoring import predict
        return predict(net, self._owner.data.images, self._checked(ids))

    def accuracy(self, net: nn.Module, ids: Tensor) -> float:
        """Accuracy of `net` on `ids` (metrics.scoring.accuracy_on; 0 when empty)."""
        from mu_runner.metrics.scoring import accuracy_on
        return accuracy_on(net, self._owner.data, self._checked(ids))
