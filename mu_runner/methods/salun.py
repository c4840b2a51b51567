"""SalUn: random-label unlearning confined to the forget-salient weights.

Fan, Liu, Zhang, Wong, Wei, Liu, "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency in Both Image Classification and Generation", ICLR 2024 (spotlight), arXiv:2310.12508.

Mask: s = |Σ_batches ∇θ CE(D_f batch)| at θ_o (eval, no optimizer), ranked over all parameters
jointly (BN, biases too); m = 1 on the top `mask_ratio`. Ties [design]: only s > 0 can enter (a zero
gradient is no saliency), and ties at the threshold value are broken by a permutation seeded with
`seed`, not by parameter order; with fewer positive saliencies than the ratio asks, m is the positive
ones. On digits (8×8, ResNet-18: layer4 runs on 1×1 maps, 8 of 9 taps of each 3×3 kernel see only
padding) 67 % of s are exactly 0, so ratio 0.5 masks 33 %; the fraction masked and the fraction tied
at the threshold are `method_choices` (`mask_fraction`, `mask_ties`), and a warning is logged when
more than half are tied. Loss: CE(x_f, y'), y' fixed, ≠ y and class-wise in C_R, + α·CE(x_r, y_r).
`schedule:` in the yaml -> the data plan's `Schedule`: `sequential` -> SEQUENTIAL (CIFAR-10 code):
per epoch a pass over D_f, then over D_r. `mixed` -> PAIRED (CIFAR-100 code mixes D_f' into D_r)
[design]: retain batches (the anchor) paired with forget batches of ⌈B·|D_f|/|D_r|⌉ (`share_of`:
D_f once per epoch), one forward over both so that BN never sees a forget-only batch (that cost 20 points of val accuracy on digits). Masked-out weights stay θ_o
exactly: weight decay and momentum move weights whose gradient is zero, so after every step
θ ← m⊙θ + (1−m)⊙θ_o and optimizer-state tensors (momentum, Adam moments) are zeroed where m = 0.
BN running statistics are buffers and move in train mode, as in the authors' code.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, Schedule, SplitSpec, every_epoch
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import (
    forget_gradients,
    pin_,
    random_other_labels,
    threshold_ties,
    top_fraction_mask,
)

log = logging.getLogger("mu_runner")

SCHEDULES = {"sequential": Schedule.SEQUENTIAL, "mixed": Schedule.PAIRED}  # the yaml's name -> the data plan's


class SalUn(UnlearningModule):
    """Random labels on D_f plus α·CE on D_r, updating only the salient fraction of the weights."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 2, batch_size: int = 128, seed: int = 0, mask_ratio: float = 0.5,
                 retain_weight: float = 1.0, schedule: str = "sequential") -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if optimizer is None:
            raise ConfigError("method.optimizer=null: SalUn trains; give a torch.optim partial")
        if not 0.0 < float(mask_ratio) <= 1.0:
            raise ConfigError(f"method.mask_ratio={mask_ratio}: need 0 < mask_ratio <= 1 (fraction updated)")
        if not float(retain_weight) >= 0.0:
            raise ConfigError(f"method.retain_weight={retain_weight}: need retain_weight >= 0 (α)")
        if schedule not in SCHEDULES:
            raise ConfigError(f"method.schedule={schedule!r}: allowed {', '.join(SCHEDULES)}")
        self.mask_ratio, self.retain_weight = float(mask_ratio), float(retain_weight)
        self.schedule = SCHEDULES[schedule]
        self.mask: dict[str, Tensor] = {}  # name -> bool, True where the weight may change
        self.start: dict[str, Tensor] = {}  # θ_o, where every masked-out weight must stay
        self.forget_targets: Tensor | None = None
        self.mask_fraction: float | None = None  # fraction of all weights the mask lets change
        self.mask_ties: float | None = None  # fraction of all saliencies equal to the threshold value

    def data_plan(self) -> DataPlan:
        """D_r and the relabelled D_f: a pass over each per epoch, or paired with proportional forget batches."""
        retain = SplitSpec("retain", self.batch_size)
        if self.schedule is Schedule.SEQUENTIAL:
            forget = SplitSpec("forget", self.batch_size, targets=self.relabelled)
            return DataPlan((retain, forget), schedule=Schedule.SEQUENTIAL, epoch_plan=every_epoch("forget", "retain"))
        # mixed: one pass over D_r per epoch and, with proportional forget batches, one over D_f
        forget = SplitSpec("forget", self.batch_size, share_of="retain", targets=self.relabelled)
        return DataPlan((retain, forget), anchor="retain")

    def relabelled(self) -> Tensor | None:
        """Fixed relabelled targets of the forget split (aligned with its indices)."""
        return self.forget_targets

    def on_train_start(self) -> None:
        data = self.data
        grads = forget_gradients(self.net, data.batches("forget"))  # θ_o, eval mode, no optimizer
        self.mask = self.saliency_mask({n: g.abs() for n, g in grads.items()})
        self.start = {n: p.detach().clone() for n, p in self.net.named_parameters() if n in self.mask}
        labels = data.labels(data.indices("forget"))
        gen = torch.Generator().manual_seed(self.seed)
        self.forget_targets = random_other_labels(labels, data.num_classes, data.forget_classes, gen).cpu()

    def saliency_mask(self, saliency: dict[str, Tensor]) -> dict[str, Tensor]:
        """True on the top `mask_ratio` of the saliencies, only positive ones, ties broken under `seed`."""
        mask = top_fraction_mask(saliency, self.mask_ratio, positive_only=True,
                                 generator=torch.Generator().manual_seed(self.seed))
        total = sum(m.numel() for m in mask.values())
        self.mask_fraction = sum(int(m.sum()) for m in mask.values()) / max(total, 1)
        self.mask_ties = threshold_ties(saliency, self.mask_ratio)
        if self.mask_ties > 0.5:
            log.warning("salun: %.0f %% of the saliencies are tied at the mask threshold; only positive ones "
                        "enter (ties broken under seed %d): %.1f %% of the weights masked (method.mask_ratio=%s)",
                        100 * self.mask_ties, self.seed, 100 * self.mask_fraction, self.mask_ratio)
        return mask

    def choices(self) -> dict:
        """The fraction of weights actually masked and the fraction tied at the threshold (metrics.json)."""
        return {"mask_fraction": self.mask_fraction, "mask_ties": self.mask_ties}

    def unlearning_loss(self, batch: Batch) -> Tensor:
        """CE(x_f, y') + α·CE(x_r, y_r); the forget y are the relabelled targets the loader serves."""
        parts = [(batch[s], w) for s, w in (("forget", 1.0), ("retain", self.retain_weight)) if s in batch]
        # mixed: one forward over both, so BN batch statistics are never those of the forget set alone
        logits = self.net(torch.cat([x for (x, _), _ in parts])).split([len(y) for (_, y), _ in parts])
        return sum(w * F.cross_entropy(z, y) for z, ((_, y), w) in zip(logits, parts, strict=False))

    def on_before_optimizer_step(self, optimizer) -> None:
        for n, p in self.net.named_parameters():
            if p.grad is not None:
                p.grad.mul_(self.mask[n])

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.restore_masked(getattr(optimizer, "optimizer", optimizer))

    def restore_masked(self, optimizer: torch.optim.Optimizer) -> None:
        """θ ← m⊙θ + (1−m)⊙θ_o, optimizer state zeroed where m = 0 (decay and momentum act there)."""
        pin_(self.net, self.mask, self.start, optimizer)
