"""RL: train on the forget data with wrong labels (each sample relabelled once) and on D_r.

Golatkar, Achille, Soatto, "Eternal Sunshine of the Spotless Net", CVPR 2020, arXiv:1911.04933
(SalUn's RL); Graves, Nagisetty, Ganesh, "Amnesiac Machine Learning", AAAI 2021,
arXiv:2010.10981. `nearest_wrong` follows Boundary Unlearning (Chen et al., CVPR 2023,
arXiv:2303.11570); `freeze` follows Liao & Lin's selective layer-wise freezing.

Each forget sample gets one new label y' ∈ A(y) (C_R class-wise, else every class but y) in
`on_train_start`: `random_other` draws it from a generator seeded by `seed` (SalUn's `randint(0, K)`
may return y itself), `nearest_wrong` takes θ_o's highest-scoring allowed class (eval mode, no
augmentation). Schedules (`schedule:` in the yaml -> the data plan's `Schedule`): `mixed` ->
PAIRED, each retain batch (the anchor) paired with a cycled relabelled forget batch of the same
size in one forward, L = CE(forget') + CE(retain) [design; deviation: the specification's "shuffle
D_f' ∪ D_r" sees each forget sample once per epoch, here D_f is cycled along a pass over D_r];
`sequential` -> SEQUENTIAL, one pass over D_f', then one over D_r, per epoch (SalUn's CIFAR-10
code). The relabelled targets reach the forget loader through the plan (`SplitSpec.targets`).
`target_counts` holds the per-class count of the new labels (also logged).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, Schedule, SplitSpec, every_epoch
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import (
    batchnorm_eval,
    freeze_except,
    nearest_wrong_labels,
    random_other_labels,
    under,
)
from mu_runner.metrics.scoring import scoring

log = logging.getLogger("mu_runner")
RELABEL = ("random_other", "nearest_wrong")
SCHEDULES = {"mixed": Schedule.PAIRED, "sequential": Schedule.SEQUENTIAL}  # the yaml's name -> the data plan's


class RandomLabel(UnlearningModule):
    """CE on D_f with fixed wrong labels plus CE on D_r; with `freeze`, only `trainable` learns."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 10,
                 batch_size: int = 256, seed: int = 0, relabel: str = "random_other",
                 schedule: str = "mixed", freeze: bool = False,
                 trainable: list[str] | tuple[str, ...] = ("layer4", "fc")) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if relabel not in RELABEL:
            raise ConfigError(f"method.relabel={relabel!r}: allowed {', '.join(RELABEL)}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"method.schedule={schedule!r}: allowed {', '.join(SCHEDULES)}")
        self.relabel, self.schedule = relabel, SCHEDULES[schedule]
        self.freeze, self.trainable = bool(freeze), tuple(trainable)
        self.new_labels: Tensor | None = None
        self.target_counts: Tensor | None = None
        if self.freeze and net is not None:  # now: configure_optimizers skips frozen weights
            freeze_except(net, self.trainable)

    def _is_trainable(self, name: str) -> bool:
        """`name` is inside `net.body`; trainable entries are module-name prefixes there."""
        return any(under(name, p) for p in self.trainable)

    def data_plan(self) -> DataPlan:
        """D_r and the relabelled D_f: paired (retain the anchor) or a pass over each per epoch."""
        splits = (SplitSpec("retain", self.batch_size), SplitSpec("forget", self.batch_size, targets=self.forget_targets))
        if self.schedule is Schedule.SEQUENTIAL:
            return DataPlan(splits, schedule=Schedule.SEQUENTIAL, epoch_plan=every_epoch("forget", "retain"))
        return DataPlan(splits, anchor="retain")

    def forget_targets(self) -> Tensor:
        """New labels of the forget split, aligned with `data.indices("forget")`."""
        if self.new_labels is None:
            raise RuntimeError("random_label: forget targets read before on_train_start set them")
        return self.new_labels

    def on_train_start(self) -> None:
        data = self.data
        classes, k = data.forget_classes, data.num_classes
        labels = data.labels(data.indices("forget"))
        if self.relabel == "random_other":
            gen = torch.Generator().manual_seed(self.seed)
            new = random_other_labels(labels, k, classes, gen)
        else:
            with scoring(self.net):  # θ_o, eval mode, fp32, fixed order, no augmentation
                logits = torch.cat([self.net(x).float().cpu() for x, _ in data.batches("forget")])
            new = nearest_wrong_labels(logits, labels, classes)
        self.new_labels = new.cpu()
        self.target_counts = torch.bincount(self.new_labels, minlength=k)
        log.info("random_label: new forget labels per class %s", self.target_counts.tolist())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.freeze:  # frozen modules keep their BatchNorm statistics too
            batchnorm_eval(self.net.body, keep=self._is_trainable)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        if len(batch) == 1:  # sequential: one split per step
            (x, y), = batch.values()
            return F.cross_entropy(self.net(x), y)
        (xr, yr), (xf, yf) = batch["retain"], batch["forget"]
        logits = self.net(torch.cat([xf, xr]))  # one forward: BatchNorm sees the mixed batch
        return F.cross_entropy(logits[: len(xf)], yf) + F.cross_entropy(logits[len(xf):], yr)
