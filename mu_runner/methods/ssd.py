"""SSD: dampen the weights that matter far more to the forget set than to the training set.

Foster, Schoepf, Brintrup, "Fast Machine Unlearning Without Retraining Through Selective Synaptic
Dampening", AAAI 2024, arXiv:2308.07707.

One-shot (no optimizer step), eval mode, float32 forward passes:
  I_D = mean over D_tr batches of (∂CE_batch/∂θ)², I_f likewise over D_f (same batch size, fixed
  order, no augmentation); S = {i : I_f > α·I_D}; θ_i ← min(λ·I_D/I_f, 1)·θ_i on S.
Every parameter is eligible (BN affine and biases too, as in the authors' code); buffers are not
touched. Deliberate choices: importances are accumulated in float64, so that squares of tiny
gradients do not underflow to 0 (an underflowed I_D would put a weight into S for any finite α);
α = inf selects nothing (inf·0 is NaN and compares False), giving the original model back.

`alpha_grid` (our addition, on by default): no single α works on digits. The ratio I_f / I_D scales
with how badly the original fits the forget set — seed 2's class 8 (57 % train accuracy) has a
median ratio of 5.6 against 0.08 for seed 0's class 4 — so α 10 dampens 1.6 M weights and
collapses the model to 11 % there, while α 30 leaves class 4 unforgotten (validation numbers in
conf/method/ssd.yaml). The importances are computed once; the grid is walked from the gentlest α
(largest) down with `functional.walk_grid` on a selection set that never touches the test split:
- forget images: D_f, plus the forget classes' validation images for class forgetting; a step
  forgets when their accuracy is <= `forget_tolerance` (classes), or when D_f's accuracy is no
  higher than the validation accuracy (samples: the forget set looks like unseen data);
- retain images: the validation images of the retained classes (all of them for samples);
- the first α that forgets is taken if it costs at most `retain_budget` of validation retain
  accuracy, then smaller αs while they still forget within `retain_tolerance` of that first
  one's retain accuracy; when none does, the tried α with the best retain accuracy + forget error
  (samples: validation accuracy minus D_f's excess over it). `alpha_grid: null`: the fixed `alpha`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import OneShotModule
from mu_runner.methods.functional import Candidate, walk_grid


def importances(net: nn.Module, batches) -> dict[str, Tensor]:
    """Mean over batches of the squared batch-mean CE gradient, per parameter (float64)."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for x, y in batches:
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = F.cross_entropy(net(x.float()), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads, strict=False):
            if g is not None:
                total[n] += g.double().square()
        count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


class SSD(OneShotModule):
    """Selective Synaptic Dampening: θ_i ← min(λ·I_D/I_f, 1)·θ_i where I_f > α·I_D."""

    def __init__(self, net: nn.Module, alpha: float = 10.0, dampening: float = 1.0,
                 batch_size: int = 128, seed: int = 0, alpha_grid: list[float] | None = None,
                 forget_tolerance: float = 0.01, retain_tolerance: float = 0.01, retain_budget: float = 0.05) -> None:
        super().__init__(net, batch_size=batch_size, seed=seed)
        alpha, dampening = float(alpha), float(dampening)
        if math.isnan(alpha) or alpha < 0:
            raise ConfigError(f"method.alpha={alpha}: need alpha >= 0 (selection threshold; inf selects nothing)")
        if alpha_grid is not None and (len(alpha_grid) == 0 or not all(float(v) > 0 for v in alpha_grid)):
            raise ConfigError(f"method.alpha_grid={list(alpha_grid)}: need a non-empty list of values > 0 (or null)")
        for key, value in (("forget_tolerance", forget_tolerance), ("retain_tolerance", retain_tolerance),
                           ("retain_budget", retain_budget)):
            if not 0 <= float(value) <= 1:
                raise ConfigError(f"method.{key}={value}: need a fraction in [0, 1]")
        self.grid = sorted((float(v) for v in alpha_grid), reverse=True) if alpha_grid is not None else None
        self.forget_tolerance, self.retain_tolerance = float(forget_tolerance), float(retain_tolerance)
        self.retain_budget = float(retain_budget)
        self.candidates: list[Candidate] = []  # the grid walk, for inspection
        if not (math.isfinite(dampening) and dampening >= 0):
            raise ConfigError(f"method.dampening={dampening}: need a finite dampening >= 0 (λ)")
        self.alpha, self.dampening = alpha, dampening
        self.selected: dict[str, Tensor] = {}  # name -> bool mask of S, for inspection

    def data_plan(self) -> DataPlan:
        """No batch is trained: `edit` passes over D_f and D_tr = D_f ∪ D_r, and the α walk reads D_val."""
        val = (SplitSpec("val"),) if self.grid is not None else ()
        return DataPlan((SplitSpec("forget"), SplitSpec("train"), *val))

    def edit(self) -> None:
        was_training = self.net.training
        self.net.eval()  # scoring passes: BN uses its running statistics and does not update them
        try:
            self.imp_d = importances(self.net, self.data.batches("train", self.batch_size))
            self.imp_f = importances(self.net, self.data.batches("forget", self.batch_size))
            self.start = {n: p.detach().clone() for n, p in self.net.named_parameters() if n in self.imp_d}
            if self.grid is not None:
                self.alpha = self.walk()
            self.dampen(self.alpha)
        finally:
            self.net.train(was_training)
            self.imp_d = self.imp_f = self.start = None  # ~3x the model's size: not kept

    @classmethod
    def validation_use(cls, method_cfg, forget_kind: str) -> str | None:
        if method_cfg.get("alpha_grid") is not None:
            return "walks method.alpha_grid on validation images (or set method.alpha_grid=null: the fixed alpha)"
        return None

    @torch.no_grad()
    def dampen(self, alpha: float) -> None:
        """θ ← min(λ·I_D/I_f, 1)·θ where I_f > α·I_D, from the original weights."""
        for n, p in self.net.named_parameters():
            if n not in self.imp_d:
                continue
            d, f, p0 = self.imp_d[n], self.imp_f[n], self.start[n]
            chosen = f > alpha * d  # inf·0 = NaN -> False: α = inf selects nothing
            factor = (self.dampening * d / f).clamp(max=1.0)
            p.copy_(p0)
            p[chosen] = (p0.double()[chosen] * factor[chosen]).to(p.dtype)
            self.selected[n] = chosen

    def walk(self) -> float:
        """α chosen on the selection set (module docstring); `edit` then dampens from the original weights."""
        data, classes = self.data, self.data.forget_classes
        forget, val = data.indices("forget"), data.indices("val")
        val_labels = data.labels(val)
        if classes:
            in_forget = torch.isin(val_labels, torch.tensor(classes))
            forget, val = torch.cat([forget, val[in_forget]]), val[~in_forget]

        def scores(value: float) -> Candidate:
            forget_acc, retain_acc = data.accuracy(self.net, forget), data.accuracy(self.net, val)
            if classes:
                return Candidate(value, 0, retain_acc + 1 - forget_acc, forget_acc, retain_acc,
                                 forget_acc <= self.forget_tolerance)
            excess = max(0.0, forget_acc - retain_acc)
            return Candidate(value, 0, retain_acc - excess, forget_acc, retain_acc, excess == 0)

        def try_value(alpha: float) -> list[Candidate]:
            self.dampen(alpha)
            return [scores(alpha)]

        self.dampen(math.inf)
        self.base_retain = scores(math.inf).retain_acc
        self.candidates, chosen = walk_grid(self.grid, try_value, self.base_retain, self.retain_tolerance,
                                            self.retain_budget)
        return chosen.value

    def choices(self) -> dict:
        """What the run chose on its own (metrics.json `method_choices`)."""
        n_selected = sum(int(s.sum()) for s in self.selected.values())
        return {"alpha": self.alpha, "selected_fraction": n_selected / max(sum(s.numel() for s in self.selected.values()), 1),
                "alpha_tried": [c.value for c in self.candidates]}
