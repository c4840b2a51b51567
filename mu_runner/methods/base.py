"""The unlearning stage: a LightningModule that owns the method; Lightning owns the loop.

A method subclasses `UnlearningModule`, declares what it reads in `data_plan()` (one frozen
`DataPlan`: the splits with their batch sizes, the anchor, the schedule; docs/design.md, Data plan)
and writes `unlearning_loss(batch)`, where `batch` maps the served splits to (x, y). It reads
anything else only through `self.data` (a `MethodData`), which refuses every split the plan does not
declare. A one-shot method (no optimizer step) subclasses `OneShotModule` and writes `edit()`.
Set-up work (masks, teachers, relabelling) goes in `on_train_start`, so the unlearning timer
includes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, MethodData
from mu_runner.errors import ConfigError, DivergedError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]
Batch = dict[str, tuple[Tensor, Tensor]]
ARTIFACT_PREFIX = "artifact."  # cache-entry keys stored next to an original's weights (e.g. mnemonic codes)


@dataclass(frozen=True)
class OriginalRecipe:
    """A method's own original (`UnlearningModule.original_recipe`): cached apart from the plain one.

    `key` joins the original's cache spec; `training(net, optimizer, scheduler, epochs, batch_size,
    seed, data=InMemoryData)` returns the module that trains it, whose `artifacts()` (name -> tensor)
    the runner stores in the cache entry and hands back as `original.artifacts`.
    """

    key: dict
    training: Callable[..., UnlearningModule]


class UnlearningModule(L.LightningModule):
    """Base of every method: optimizer from a partial, loss checked for NaN, `train/loss` logged."""

    from_scratch: bool = False  # True: the runner hands over a fresh network, not the original
    forget_kinds: tuple[str, ...] = ("classes", "random", "indices")  # the forget sets it can handle
    prep_seconds: float | None = None  # one-off set-up cost (`prepare`), reported apart from unlearn_seconds
    prep_cached: bool | None = None  # True: prep_seconds is the cost measured when the cache entry was made
    skipped_steps: int = 0  # training steps whose unlearning_loss was None (in global_step, no update)
    min_epochs: int = 1  # the least `method.epochs` that does anything (validate.py refuses fewer)
    network_check: bool = True  # validate.check_network builds it on an untrained backbone before any training
    phase: str | None = None  # set by the runner for the original / reference trainings (names who diverged)
    lr_key: str = "method.optimizer.lr"  # the knob a DivergedError points to

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 1,
                 batch_size: int = 128, seed: int = 0) -> None:
        super().__init__()
        if int(epochs) < 0 or int(batch_size) <= 0:
            raise ConfigError(f"method.epochs={epochs}, method.batch_size={batch_size}: need epochs >= 0, batch_size > 0")
        self.net, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.epochs, self.batch_size, self.seed = int(epochs), int(batch_size), int(seed)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def who(self) -> str:
        """`method grad_ascent` (the yaml's name = the module's), or `original training` for the runner's."""
        return f"{self.phase} training" if self.phase else f"method {type(self).__module__.rsplit('.', 1)[-1]}"

    @property
    def target_min_epochs(self) -> int:
        """Epochs before a stopping rule (callbacks.forget_target) may judge; 0: from the first check."""
        return 0

    def data_plan(self) -> DataPlan:
        """Every split this method reads, with batch sizes for those it trains on (docs/design.md, Data plan).

        Called once per fit, when the stage's data is set up; the data module serves exactly this.
        """
        raise NotImplementedError(f"{self.name} declares no data plan (UnlearningModule.data_plan)")

    @property
    def data(self) -> MethodData:
        """The stage's data as this method may read it: the splits of its plan, nothing else."""
        return self.trainer.datamodule.method_data

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @classmethod
    def original_recipe(cls, method_cfg) -> OriginalRecipe | None:
        """How this method's original is trained, if not like everybody's (None: the shared plain one).

        The original's recipe is part of a method that needs it (mnemonic codes are mixed into
        training); the retrained reference stays the plain retrain.
        """
        return None

    @classmethod
    def validation_use(cls, method_cfg, forget_kind: str) -> str | None:
        """What this method reads the validation images for with these settings (None: nothing), so
        that `data.val_fraction=0` is refused up front (validate.py) instead of failing late."""
        return None

    def prepare(self, cache, spec: dict, original: nn.Module, data: MethodData, fit: Callable) -> None:
        """One-off set-up shared by every forget set (e.g. weight filters trained on D_tr).

        The runner calls it before the unlearning timer starts: cache the artifact under `spec`
        (what determines the original) plus the method's own hyper-parameters, never the forget
        set, and set `prep_seconds` / `prep_cached`. `data` serves the plan's splits but no forget
        set (forget and retain are refused); `fit(module, epochs)` trains a LightningModule on the
        whole training pool (served to it as split `retain`, by its own plan) with the run's
        trainer. Default: nothing.
        """

    def choices(self) -> dict:
        """What the method chose on its own during the run (a step on a grid...): metrics.json `method_choices`."""
        return {}

    def unlearning_loss(self, batch: Batch) -> Tensor | None:
        """The loss of one step; None skips the step (with `trainer.should_stop`: a stopping rule)."""
        raise NotImplementedError

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        loss = self.unlearning_loss(batch)
        if loss is None:  # Lightning still calls optimizer.step, which moves no weight without gradients,
            self.skipped_steps += 1  # but counts it in global_step
            if self._trainer is not None and self.trainer.world_size > 1:  # DDP refuses a skipped step: every
                self.ddp_skip = True  # rank takes a zero loss and no weight moves (mu_runner.ddp.DdpSteps)
                return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return None
        if not torch.isfinite(loss):  # before backward: a NaN never reaches the weights
            from mu_runner.callbacks.divergence import diverged
            raise diverged(self, f"loss = {loss.item()}", self.global_step + 1)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # DDP: the global batch's loss
        return loss

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return None
        optimizer = self.optimizer_factory(params=[p for p in self.net.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}


class OneShotModule(UnlearningModule):
    """A method that edits weights once and takes no optimizer step (SSD, mnemonic codes...)."""

    def __init__(self, net: nn.Module, batch_size: int = 128, seed: int = 0) -> None:
        super().__init__(net, optimizer=None, epochs=1, batch_size=batch_size, seed=seed)

    def data_plan(self) -> DataPlan:
        """No batch is trained: a one-shot method declares only the splits `edit` reads (default: none)."""
        return DataPlan()

    def edit(self) -> None:
        raise NotImplementedError

    def on_train_start(self) -> None:
        with torch.enable_grad():
            self.edit()
        self.trainer.should_stop = True  # no batch is trained; on_train_end still fires

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:  # pragma: no cover
        raise RuntimeError(f"{self.name} is one-shot and must not train")


def check_finite(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise DivergedError(what)
