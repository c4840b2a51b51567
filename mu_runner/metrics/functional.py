"""Metric functions: plain tensors and numbers in, numbers out. No Lightning, no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from sklearn.svm import SVC
from torch import Tensor


def accuracy(preds: Tensor, labels: Tensor) -> float | None:
    """Fraction of correct predictions; None for an empty set (e.g. no forgotten test class)."""
    if labels.numel() == 0:
        return None
    return float((preds == labels).float().mean())


def mia_efficacy(shadow_in: Tensor, shadow_out: Tensor, target: Tensor, seed: int = 0) -> float | None:
    """SalUn's MIA-efficacy: fraction of `target` (forget samples) an SVC calls non-members.

    The SVC (C=3, RBF, gamma="auto") learns member (retain) vs non-member (test) from a scalar
    feature such as the true-class confidence. Higher means more forgotten; a class-wise
    retrained model scores about 1.
    """
    if target.numel() == 0 or shadow_in.numel() == 0 or shadow_out.numel() == 0:
        return None
    n = min(len(shadow_in), len(shadow_out))
    gen = torch.Generator().manual_seed(int(seed))
    shadow_in = shadow_in[torch.randperm(len(shadow_in), generator=gen)[:n]]
    shadow_out = shadow_out[torch.randperm(len(shadow_out), generator=gen)[:n]]
    x = torch.cat([shadow_in, shadow_out]).double().reshape(-1, 1).numpy()
    y = np.concatenate([np.ones(n), np.zeros(n)])
    svc = SVC(C=3, kernel="rbf", gamma="auto").fit(x, y)
    pred = svc.predict(target.double().reshape(-1, 1).numpy())
    return float((pred == 0).mean())


def entropy(probs: Tensor) -> Tensor:
    """Per-row Shannon entropy (nats)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of two n x p feature matrices, in float64.

    1 for identical features, invariant to orthogonal rotation and isotropic scaling.
    """
    x = x.double().flatten(1)
    y = y.double().flatten(1)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    num = (y.T @ x).norm() ** 2
    den = (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def relative_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, float]:
    """||W_u - W_o||_F / (||W_o||_F + 1e-12) for every tensor present in both."""
    return {
        n: float((after[n].double() - w.double()).norm() / (w.double().norm() + 1e-12))
        for n, w in before.items()
        if n in after
    }


def grouped_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor],
                   group_of: Callable[[str], str]) -> dict[str, float]:
    """Per group: sqrt(sum ||dW||^2 / sum ||W_o||^2), groups in first-seen order."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for n, w in before.items():
        g = group_of(n)
        num[g] = num.get(g, 0.0) + float((after[n].double() - w.double()).norm() ** 2)
        den[g] = den.get(g, 0.0) + float(w.double().norm() ** 2)
    return {g: math.sqrt(num[g] / (den[g] + 1e-24)) for g in num}


GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")


def avg_gap(unlearned: Mapping[str, float | None], retrain: Mapping[str, float | None] | None) -> float | None:
    """Mean absolute gap to the retrained model over forget/retain/test accuracy and MIA.

    (|UA - UA_r| equals |FA - FA_r|.) None without a reference or with a missing value.
    """
    if not retrain:
        return None
    gaps = [unlearned.get(k) is not None and retrain.get(k) is not None for k in GAP_KEYS]
    if not all(gaps):
        return None
    return sum(abs(float(unlearned[k]) - float(retrain[k])) for k in GAP_KEYS) / len(GAP_KEYS)
