"""Metric functions: plain tensors and numbers in, numbers out. No Lightning, no I/O."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, cross_val_score
from sklearn.svm import SVC
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy


def accuracy(preds: Tensor, labels: Tensor) -> float | None:
    """Fraction of correct predictions (torchmetrics' micro-averaged multiclass accuracy); None for
    an empty set (e.g. no forgotten test class), where torchmetrics would say 0."""
    if labels.numel() == 0:
        return None
    num_classes = int(max(int(preds.max()), int(labels.max()))) + 1
    return float(multiclass_accuracy(preds, labels, num_classes, average="micro", validate_args=False))


def quantiles(x: Tensor, n: int | None) -> Tensor:
    """`x` sorted, or its n evenly spaced order statistics when it has more: a deterministic
    summary of a 1-d sample's distribution (no draw), to bound the SVC's cost on large sets."""
    x = x.double().flatten().sort().values
    if n is None or len(x) <= n:
        return x
    return x[((torch.arange(n, dtype=torch.float64) + 0.5) * len(x) / n).floor().long()]


def _svc_nonmember_rate(members: Tensor, nonmembers: Tensor, target: Tensor, balanced: bool) -> float:
    x = torch.cat([members, nonmembers]).double().reshape(-1, 1).numpy()
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    svc = SVC(C=3, kernel="rbf", gamma="auto", class_weight="balanced" if balanced else None).fit(x, y)
    return float((svc.predict(target.double().reshape(-1, 1).numpy()) == 0).mean())


def mia_efficacy(shadow_in: Tensor, shadow_out: Tensor, target: Tensor, seed: int = 0, draws: int = 0,
                 max_samples: int | None = 5000) -> float | None:
    """SalUn's MIA-efficacy: fraction of `target` (forget samples) an SVC calls non-members.

    The SVC (C=3, RBF, gamma="auto") learns member (retain) vs non-member (test) from a scalar
    feature such as the true-class confidence. Higher means more forgotten.

    draws=0 (our default): one SVC on *all* members and non-members with balanced class weights
    (each side summarised by at most `max_samples` evenly spaced quantiles, no draw), so the value
    depends on the model only. draws=1 is SalUn's `SVC_MIA` exactly: both sides subsampled to
    the smaller's size by a seeded draw, which on data without a generalisation gap decides the
    verdict (0.02 to 0.98 over 20 seeds for one model on digits). draws=R>1: the median over R
    seeded draws. Measured in docs/evaluation.md.
    """
    if target.numel() == 0 or shadow_in.numel() == 0 or shadow_out.numel() == 0:
        return None
    if draws <= 0:
        return _svc_nonmember_rate(quantiles(shadow_in, max_samples), quantiles(shadow_out, max_samples),
                                   target, balanced=True)
    n = min(len(shadow_in), len(shadow_out))
    gen = torch.Generator().manual_seed(int(seed))
    rates = []
    for _ in range(int(draws)):
        members = shadow_in[torch.randperm(len(shadow_in), generator=gen)[:n]]
        nonmembers = shadow_out[torch.randperm(len(shadow_out), generator=gen)[:n]]
        rates.append(_svc_nonmember_rate(members, nonmembers, target, balanced=False))
    return float(np.median(rates))


def roc_auc(member_scores: Tensor, nonmember_scores: Tensor) -> float | None:
    """Threshold-free attack AUC: P(score of a member > score of a non-member), ties count half
    (scikit-learn's roc_auc_score). 0.5: indistinguishable. None when a side is empty."""
    if member_scores.numel() == 0 or nonmember_scores.numel() == 0:
        return None
    from sklearn.metrics import roc_auc_score
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = torch.cat([member_scores.double().flatten(), nonmember_scores.double().flatten()]).numpy()
    return float(roc_auc_score(y, s))


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from n_members positives and n_nonmembers
    negatives: the sampling error to read an AUC of about 0.5 against."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc * auc)
           + (n_nonmembers - 1) * (q2 - auc * auc)) / (n_members * n_nonmembers)
    return math.sqrt(max(var, 0.0))


def tpr_at_fpr(member_scores: Tensor, nonmember_scores: Tensor, fpr: float) -> float | None:
    """The largest true-positive rate of a threshold whose false-positive rate is <= `fpr`
    (members score higher). With n non-members the FPR moves in steps of 1/n."""
    if member_scores.numel() == 0 or nonmember_scores.numel() == 0:
        return None
    from sklearn.metrics import roc_curve
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = torch.cat([member_scores.double().flatten(), nonmember_scores.double().flatten()]).numpy()
    fp, tp, _ = roc_curve(y, s)
    return float(tp[fp <= fpr + 1e-12].max())


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


ACC_KEYS = ("forget_acc", "retain_acc", "test_acc")


def acc_gap(unlearned: Mapping[str, float | None], retrain: Mapping[str, float | None] | None) -> float | None:
    """avg_gap without its MIA term: mean |gap| to the retrained model over forget/retain/test
    accuracy. A population MIA is only as informative as the original's generalisation gap."""
    if not retrain or any(unlearned.get(k) is None or retrain.get(k) is None for k in ACC_KEYS):
        return None
    return sum(abs(float(unlearned[k]) - float(retrain[k])) for k in ACC_KEYS) / len(ACC_KEYS)


def per_sample_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """CE of each sample, −log p_y, from softmax probabilities (finite even where p_y is 0)."""
    if labels.numel() == 0:
        return torch.empty(0)
    p_y = probs.gather(1, labels.view(-1, 1)).flatten()
    return -p_y.double().clamp_min(1e-38).log()  # float32's smallest normal: a loss <= 87.5


def mia_loss_acc(member_losses: Tensor, nonmember_losses: Tensor, seed: int = 0) -> float | None:
    """Loss-threshold MIA of the NeurIPS 2023 unlearning challenge kit (used by DLFD).

    Members (forget set, label 1) vs non-members (unseen data, label 0) by per-sample CE loss; the
    larger set is subsampled (seeded) to the smaller's size, a `LogisticRegression()` is scored by
    `StratifiedShuffleSplit(n_splits=10, random_state=0)`; value = mean CV accuracy (0.5 = chance).
    None with fewer than 10 samples on a side (too few for ten splits with a 10 % test fold).
    """
    n = min(len(member_losses), len(nonmember_losses))
    if n < 10:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    members = member_losses[torch.randperm(len(member_losses), generator=gen)[:n]]
    nonmembers = nonmember_losses[torch.randperm(len(nonmember_losses), generator=gen)[:n]]
    x = torch.cat([members, nonmembers]).double().reshape(-1, 1).numpy()
    y = np.concatenate([np.ones(n), np.zeros(n)])
    cv = StratifiedShuffleSplit(n_splits=10, random_state=0)
    return float(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy").mean())


def forget_score(mia_acc: float | None) -> float | None:
    """FS = |mia_loss_acc − 0.5|: 0 when forget losses look like unseen data's, at most 0.5."""
    return None if mia_acc is None else abs(float(mia_acc) - 0.5)


def nomus(test_acc: float | None, fs: float | None) -> float | None:
    """NoMUS = ½·(TA + 1 − 2·FS) (DLFD, arXiv 2409.14747): utility and indiscernibility, in [0, 1]."""
    if test_acc is None or fs is None:
        return None
    return 0.5 * (float(test_acc) + 1.0 - 2.0 * float(fs))


def total_change(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> float:
    """The whole network's relative weight change, sqrt(Σ‖ΔW‖² / Σ‖W_o‖²) over every tensor."""
    return grouped_change(before, after, lambda _name: "all")["all"]


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float | None:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fit on (train_x, train_y).

    Features are standardised with the training half's statistics; lbfgs, C = 1, max_iter 2000
    (docs/evaluation.md, probe_forget_acc). None with no test sample; a single training class predicts it.
    """
    if len(test_y) == 0:
        return None
    x, xt = train_x.double().numpy(), test_x.double().numpy()
    y, yt = train_y.numpy(), test_y.numpy()
    if len(np.unique(y)) < 2:
        return float((yt == y[0]).mean())
    mean, std = x.mean(0), x.std(0) + 1e-12
    clf = LogisticRegression(C=1.0, max_iter=2000)  # lbfgs, multinomial for more than two classes
    clf.fit((x - mean) / std, y)
    return float((clf.predict((xt - mean) / std) == yt).mean())
