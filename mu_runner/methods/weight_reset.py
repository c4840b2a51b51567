"""Weight resetting / pruning: reset the weights most tied to the forget set, then repair on D_r.

Liao & Lin, "Machine unlearning by label reassignment vs weight resetting" (IEEE ISM 2024,
DOI 10.1109/ISM63611.2024.00022; no arXiv, no code). The papers' findings are verified from the
abstracts only, so the procedure below is [design], per docs/methods.md, weight_reset:

1. Score every eligible weight at θ_o (eval mode, no optimizer): `grad_forget` |Σ_batches ∇θ CE(D_f)|
   (default), `grad_ratio` g_f² / (g_r² + 1e-12) with g_r from a seeded 10 % subset of D_r, or
   `magnitude` |θ| (a class-agnostic control).
2. Eligible = conv and linear weights (BatchNorm and biases excluded). Select `scope: global` the top
   `ratio` of all eligible weights jointly (ties by flat index), `per_layer` the top `ratio` of
   each tensor, or `layers` = every eligible weight of the named modules (EU-k-like).
3. `mode: prune` sets them to 0 and keeps them there through the repair (gradient mask, then after
   every step θ ← 0 and the optimizer state cleared there, as SalUn keeps its mask); `mode: reinit`
   redraws them from each module's default initialiser (`reset_parameters`, seeded) and trains them.
4. `recalibrate_bn`: one no-grad pass over D_r (un-augmented, cumulative average) refreshes the
   BatchNorm running statistics, which are stale after a reset.
5. Repair: `epochs` of CE on D_r (0: no optimizer step at all; data plan: retain in batches, D_f
   read by the gradient scores only); `freeze` as in random_label
   keeps everything outside `trainable` (and its BatchNorm statistics) fixed.
`ratio_per_class` (null by default) makes the reset proportional to the number k of forget classes:
⌊k·r·N⌋ weights, as the paper's "proportional to the number of removed classes" reading needs.
`selected` (name → bool mask) and `reset_per_stage` (stage → count) are kept for the analysis.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import (
    batchnorm_eval,
    check_modules,
    forget_gradients,
    freeze_except,
    pin_,
    top_fraction_mask,
    under,
)

SCORES = ("grad_forget", "grad_ratio", "magnitude")
SCOPES = ("global", "per_layer", "layers")
MODES = ("prune", "reinit")


def eligible_weights(net: nn.Module) -> dict[str, nn.Module]:
    """Parameter name of every conv / linear weight → its module (BatchNorm and biases excluded)."""
    return {f"{name}.weight" if name else "weight": m for name, m in net.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))}


def select_weights(scores: dict[str, Tensor], scope: str, ratio: float,
                   layers: list[str] | None = None) -> dict[str, Tensor]:
    """Boolean masks, True on the weights to reset (ties broken by flat index)."""
    if scope == "global":  # exactly floor(ratio·N) of all eligible weights
        return top_fraction_mask(scores, ratio, count=floor_count(ratio, sum(s.numel() for s in scores.values())))
    if scope == "per_layer":
        return {n: top_fraction_mask({n: s}, ratio, count=floor_count(ratio, s.numel()))[n] for n, s in scores.items()}
    return {n: torch.full_like(s, any(under(n.removeprefix("body."), p) for p in layers or []), dtype=torch.bool)
            for n, s in scores.items()}


def floor_count(ratio: float, n: int) -> int:
    """floor(ratio·n), immune to binary rounding (3 x 0.01 x 1000 is 30, not 29)."""
    return math.floor(round(ratio * n, 6))


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches) -> None:
    """Running mean/var of every BatchNorm re-estimated as the plain average over `batches`."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training, momenta = net.training, [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        for x, _ in batches:
            net(x.float())
    finally:
        for m, momentum in zip(norms, momenta, strict=False):
            m.momentum = momentum
        net.train(was_training)


class WeightReset(UnlearningModule):
    """Reset (prune or re-initialise) the forget-salient weights, then an optional repair on D_r."""

    min_epochs = 0  # epochs are repair epochs: 0 resets only

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 5, batch_size: int = 256,
                 seed: int = 0, score: str = "grad_forget", scope: str = "global", ratio: float = 0.05,
                 layers: list[str] | None = None, mode: str = "reinit", recalibrate_bn: bool = False,
                 freeze: bool = False, trainable: list[str] | tuple[str, ...] = ("layer4", "fc"),
                 retain_score_fraction: float = 0.1, ratio_per_class: float | None = None) -> None:
        # Lightning needs one epoch to run the set-up hook; epochs=0 stops before any batch.
        super().__init__(net, optimizer, scheduler, max(int(epochs), 1), batch_size, seed)
        for key, value, allowed in (("score", score, SCORES), ("scope", scope, SCOPES), ("mode", mode, MODES)):
            if value not in allowed:
                raise ConfigError(f"method.{key}={value!r}: allowed {', '.join(allowed)}")
        if scope != "layers" and not 0 < float(ratio) <= 1:
            raise ConfigError(f"method.ratio={ratio}: need 0 < ratio <= 1 (fraction of eligible weights reset)")
        if ratio_per_class is not None and not 0 < float(ratio_per_class) <= 1:
            raise ConfigError(f"method.ratio_per_class={ratio_per_class}: need 0 < value <= 1 "
                              "(k forget classes reset floor(k * value * N) weights)")
        if scope == "layers" and not layers:
            raise ConfigError("method.scope=layers needs method.layers (module names), e.g. [layer4, fc]")
        if int(epochs) > 0 and optimizer is None:
            raise ConfigError(f"method.optimizer=null with method.epochs={epochs}: the repair needs an optimizer")
        if not 0 < float(retain_score_fraction) <= 1:
            raise ConfigError(f"method.retain_score_fraction={retain_score_fraction}: need 0 < value <= 1")
        self.repair_epochs, self.score, self.scope, self.ratio = int(epochs), score, scope, float(ratio)
        self.layers, self.mode, self.recalibrate_bn = list(layers or []), mode, bool(recalibrate_bn)
        self.freeze, self.trainable = bool(freeze), tuple(trainable)
        self.retain_score_fraction = float(retain_score_fraction)
        self.ratio_per_class = None if ratio_per_class is None else float(ratio_per_class)
        self.selected: dict[str, Tensor] = {}
        self.reset_per_stage: dict[str, int] = {}
        if self.freeze and net is not None:  # now: configure_optimizers skips frozen weights
            freeze_except(net, self.trainable)
        if scope == "layers" and net is not None:
            check_modules(net, self.layers, "method.layers")

    def data_plan(self) -> DataPlan:
        """Retain batches for the repair; D_f for the gradient scores (`magnitude` reads none)."""
        forget = (SplitSpec("forget"),) if self.score != "magnitude" else ()
        return DataPlan((SplitSpec("retain", self.batch_size), *forget), anchor="retain")

    def configure_optimizers(self):
        return super().configure_optimizers() if self.repair_epochs > 0 else None

    # -- 1. scores ------------------------------------------------------------------------------
    def weight_scores(self) -> dict[str, Tensor]:
        """Score of every eligible weight at θ_o (higher = more tied to the forget set)."""
        names = eligible_weights(self.net)
        params = dict(self.net.named_parameters())
        if self.score == "magnitude":
            return {n: params[n].detach().abs() for n in names}
        data = self.data
        frozen = [p for p in self.net.parameters() if not p.requires_grad]
        for p in frozen:  # frozen weights are scored (and reset) too; only their repair is off
            p.requires_grad_(True)
        try:
            g_f = forget_gradients(self.net, data.batches("forget"))
            if self.score == "grad_forget":
                return {n: g_f[n].abs() for n in names}
            retain = data.indices("retain")
            gen = torch.Generator().manual_seed(self.seed)
            n_r = max(1, round(self.retain_score_fraction * len(retain)))
            subset = retain[torch.randperm(len(retain), generator=gen)[:n_r]].sort().values
            g_r = forget_gradients(self.net, data.loader(subset, 256))
            return {n: g_f[n].square() / (g_r[n].square() + 1e-12) for n in names}
        finally:
            for p in frozen:
                p.requires_grad_(False)

    # -- 2./3. reset ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_(self) -> None:
        modules = eligible_weights(self.net)
        params = dict(self.net.named_parameters())
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(self.seed)
            for name, mask in self.selected.items():
                p = params[name]
                if self.mode == "prune":
                    fresh = torch.zeros_like(p)
                else:  # the module's own default initialiser, on a CPU copy, seeded
                    clone = copy.deepcopy(modules[name]).cpu()
                    clone.reset_parameters()
                    fresh = clone.weight.detach().to(p.device, p.dtype)
                p.copy_(torch.where(mask, fresh, p))

    @property
    def target_min_epochs(self) -> int:
        """Its forgetting is the reset itself; the repair epochs are its budget, so a stopping rule
        (callbacks.forget_target) judges only after them."""
        return self.repair_epochs

    def effective_ratio(self) -> float:
        """k * `ratio_per_class` for k forget classes (the "proportional" reset), else `ratio`."""
        classes = self.data.forget_classes
        if self.ratio_per_class is None or self.scope == "layers" or not classes:
            return self.ratio
        ratio = len(classes) * self.ratio_per_class
        if ratio > 1:
            raise ConfigError(f"method.ratio_per_class={self.ratio_per_class} x {len(classes)} classes > 1")
        return ratio

    def on_train_start(self) -> None:
        self.ratio = self.effective_ratio()
        self.selected = select_weights(self.weight_scores(), self.scope, self.ratio, self.layers)
        stage_of = getattr(self.net, "stage_of", None)
        counts: dict[str, int] = {}
        for name, mask in self.selected.items():
            stage = stage_of(name) if stage_of else name
            counts[stage] = counts.get(stage, 0) + int(mask.sum())
        self.reset_per_stage = counts
        self.reset_()
        if self.recalibrate_bn:
            recalibrate_batchnorm(self.net, self.data.batches("retain"))
        if self.repair_epochs == 0:
            self.trainer.should_stop = True  # reset only: no batch, no optimizer step

    def choices(self) -> dict:
        return {"ratio": self.ratio, "reset_weights": int(sum(self.reset_per_stage.values()))}

    # -- 5. repair ------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.freeze:  # frozen modules keep their BatchNorm statistics too
            batchnorm_eval(self.net.body, keep=lambda name: any(under(name, t) for t in self.trainable))

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.mode == "prune":
            params = dict(self.net.named_parameters())
            for name, mask in self.selected.items():
                if params[name].grad is not None:
                    params[name].grad.masked_fill_(mask, 0)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.mode == "prune":  # weight decay and momentum would revive pruned weights
            params = dict(self.net.named_parameters())
            pin_(self.net, {n: ~m for n, m in self.selected.items()},
                 {n: torch.zeros_like(params[n]) for n in self.selected}, getattr(optimizer, "optimizer", optimizer))
