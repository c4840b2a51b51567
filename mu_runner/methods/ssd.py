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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.errors import ConfigError
from mu_runner.methods.base import OneShotModule


def importances(net: nn.Module, batches) -> dict[str, Tensor]:
    """Mean over batches of the squared batch-mean CE gradient, per parameter (float64)."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for x, y in batches:
        with torch.autocast(device_type=x.device.type, enabled=False):
            loss = F.cross_entropy(net(x.float()), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                total[n] += g.double().square()
        count += 1
    return {n: t / max(count, 1) for n, t in total.items()}


class SSD(OneShotModule):
    """Selective Synaptic Dampening: θ_i ← min(λ·I_D/I_f, 1)·θ_i where I_f > α·I_D."""

    anchor = "forget"  # no batch is trained; the splits are read by fixed-order passes in `edit`

    def __init__(self, net: nn.Module, alpha: float = 10.0, dampening: float = 1.0,
                 batch_size: int = 128, seed: int = 0) -> None:
        super().__init__(net, batch_size=batch_size, seed=seed)
        alpha, dampening = float(alpha), float(dampening)
        if math.isnan(alpha) or alpha < 0:
            raise ConfigError(f"method.alpha={alpha}: need alpha >= 0 (selection threshold; inf selects nothing)")
        if not (math.isfinite(dampening) and dampening >= 0):
            raise ConfigError(f"method.dampening={dampening}: need a finite dampening >= 0 (λ)")
        self.alpha, self.dampening = alpha, dampening
        self.selected: dict[str, Tensor] = {}  # name -> bool mask of S, for inspection

    @property
    def batch_sizes(self) -> dict[str, int]:
        """The splits SSD reads (D_f and D_tr = D_f ∪ D_r)."""
        return {"forget": self.batch_size, "train": self.batch_size}

    def edit(self) -> None:
        was_training = self.net.training
        self.net.eval()  # scoring pass: BN uses its running statistics and does not update them
        try:
            imp_d = importances(self.net, self.datamodule.batches("train", self.batch_size))
            imp_f = importances(self.net, self.datamodule.batches("forget", self.batch_size))
        finally:
            self.net.train(was_training)
        with torch.no_grad():
            for n, p in self.net.named_parameters():
                if n not in imp_d:
                    continue
                d, f = imp_d[n], imp_f[n]
                chosen = f > self.alpha * d  # inf·0 = NaN -> False: α = inf selects nothing
                factor = (self.dampening * d / f).clamp(max=1.0)
                p[chosen] = (p.double()[chosen] * factor[chosen]).to(p.dtype)
                self.selected[n] = chosen
