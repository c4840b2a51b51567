"""A per-example membership attack for unlearning, U-LiRA style (`eval.umia=lira`).

Hayes et al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of
Privacy" (arXiv 2403.01218, 2024), built on LiRA (Carlini et al., "Membership Inference Attacks
From First Principles", IEEE S&P 2022, arXiv 2112.03570).

Shadows: S models trained with the original's recipe (`train`, same backbone) on seeded random
subsets of the attack's universe, the training pool and the test images (validation images are
left out), each subset as large as the original's training set, so that a shadow sees as many
images as the model it imitates. Every image is in exactly round(S·p) shadows, p = |pool| /
|universe| (Carlini et al.'s balanced design; p = 1/2 when the pool and the test set are equally
large, as in experiment=privacy). Each shadow is cached
like an original (keyed by recipe, S, the halves' seed and its index), holding only what the
attack needs: its logit-scaled confidence on every image and which images it trained on. A sweep
pays for them once: they do not depend on the forget set or on the method.

Attack on a model f, for each forget example and each never-seen example (the test images of the
forgotten classes, or every test image for sample forgetting): φ = z_y − log Σ_{y'≠y} exp z_{y'}
(the numerically stable logit of the true-class confidence); Gaussians fitted to φ under the
shadows that trained on the example (IN) and those that did not (OUT); the score is the
log-likelihood ratio log N(φ_f; μ_in, σ_in) − log N(φ_f; μ_out, σ_out). Reported per model
(original, unlearned, retrained): the AUC of telling forget examples from never-seen examples,
its Hanley–McNeil standard error, and the TPR at 1 % and 5 % FPR.

Simplifications, deliberate:
- The shadows are trained models, not unlearned ones: Hayes et al.'s U-LiRA also applies the
  unlearning method to each shadow so that the IN distribution is "trained then unlearned"; we
  test the unlearned model against "trained on it" vs "never trained on it", i.e. we ask whether
  it still looks like a model that saw the example. This costs S trainings once per recipe
  instead of S unlearning runs per method and forget set.
- Per-example means, but one variance for all IN and one for all OUT (Carlini et al.'s "fixed
  variance", recommended below 64 shadows); no query augmentations.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import _device, scoring

log = logging.getLogger("mu_runner")

FPRS = (0.01, 0.05)


def membership(shadows: int, n: int, seed: int, fraction: float = 0.5) -> Tensor:
    """A [shadows, n] bool matrix in which every column has exactly round(shadows * fraction)
    True (at least one, at most shadows - 1: every example has IN and OUT shadows), seeded."""
    k = min(max(round(shadows * fraction), 1), shadows - 1)
    gen = torch.Generator().manual_seed(int(seed))
    ranks = torch.rand(shadows, n, generator=gen).argsort(0).argsort(0)
    return ranks < k


def logit_confidence(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> Tensor:
    """φ = z_y − logsumexp_{y'≠y} z_{y'} per image (uint8 in), float64 on the CPU."""
    out = []
    with scoring(net):
        for idx in torch.arange(len(images)).split(batch_size):
            z = net(images[idx.to(images.device)].to(_device(net)).float().div_(255)).double().cpu()
            y = labels[idx.to(labels.device)].cpu().view(-1, 1)
            z_y = z.gather(1, y).flatten()
            others = z.scatter(1, y, float("-inf")).logsumexp(1)
            out.append(z_y - others)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def lira_scores(phi: Tensor, shadow_phi: Tensor, in_mask: Tensor) -> Tensor:
    """Log-likelihood ratio IN vs OUT of each target φ, from the shadows' φ [S, m] and membership
    [S, m]: per-example means, one pooled standard deviation per side (fixed variance)."""
    shadow_phi, inside = shadow_phi.double(), in_mask.bool()
    mu_in = (shadow_phi * inside).sum(0) / inside.sum(0).clamp_min(1)
    mu_out = (shadow_phi * ~inside).sum(0) / (~inside).sum(0).clamp_min(1)
    res_in = (shadow_phi - mu_in)[inside]
    res_out = (shadow_phi - mu_out)[~inside]
    sd_in = float(res_in.pow(2).mean().sqrt()) if res_in.numel() else 1.0
    sd_out = float(res_out.pow(2).mean().sqrt()) if res_out.numel() else 1.0
    sd_in, sd_out = max(sd_in, 1e-6), max(sd_out, 1e-6)

    def log_normal(x: Tensor, mu: Tensor, sd: float) -> Tensor:
        return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd)

    phi = phi.double()
    return log_normal(phi, mu_in, sd_in) - log_normal(phi, mu_out, sd_out)


def summarise(member: Tensor, nonmember: Tensor) -> dict:
    """AUC (forget vs never-seen), its standard error, TPR at 1 % and 5 % FPR, and the counts."""
    auc = MF.roc_auc(member, nonmember)
    out = {"auc": auc,
           "auc_se": None if auc is None else MF.auc_standard_error(auc, len(member), len(nonmember))}
    for fpr in FPRS:
        out[f"tpr_at_{round(fpr * 100)}pct_fpr"] = MF.tpr_at_fpr(member, nonmember, fpr)
    out.update({"n_forget": len(member), "n_unseen": len(nonmember)})
    return out


class LiRA:
    """The shadows' φ on every image and their membership; `.attack(models)` scores models."""

    def __init__(self, data: InMemoryData, split: ForgetSplit, shadow_phi: Tensor, in_mask: Tensor) -> None:
        self.data, self.split = data, split
        self.shadow_phi, self.in_mask = shadow_phi, in_mask
        self.n_pool = len(data.pool)

    @staticmethod
    def universe(data: InMemoryData) -> InMemoryData:
        """A view of `data` whose images are the pool's then the test images (ids < |pool| are
        pool positions, ids >= |pool| test images)."""
        view = copy.copy(data)
        pool = data.pool.to(data.images.device)
        view.images = torch.cat([data.images[pool], data.test_images.to(data.images.device)])
        view.labels = torch.cat([data.labels[pool.to(data.labels.device)], data.test_labels.to(data.labels.device)])
        return view

    @classmethod
    def build(cls, data: InMemoryData, split: ForgetSplit, shadows: int, seed: int, cache, recipe: dict,
              fit: Callable[[int, Tensor, InMemoryData], nn.Module]) -> tuple[LiRA, list[bool]]:
        """Train (or read from the cache) the S shadows; `fit(s, ids, universe)` trains shadow s
        on `universe` images `ids` and returns the network. Returns (attack, cache hit per shadow)."""
        universe = cls.universe(data)
        mask = membership(shadows, len(universe.labels), seed, len(data.pool) / len(universe.labels))
        phis, hits = [], []
        for s in range(shadows):
            spec = {"kind": "shadow", **recipe, "shadows": shadows, "lira_seed": int(seed), "index": s}

            def make(s=s) -> dict[str, Tensor]:
                log.info("shadow model %d/%d (eval.umia=lira)", s + 1, shadows)
                net = fit(s, mask[s].nonzero().flatten(), universe)
                return {"phi": logit_confidence(net, universe.images, universe.labels), "in": mask[s].to(torch.uint8)}

            state, hit = cache.get_or_create("shadow", spec, make)
            if not torch.equal(state["in"].bool(), mask[s]):
                raise RuntimeError(f"shadow cache entry {cache.path('shadow', spec)} has other halves than its key")
            phis.append(state["phi"].double())
            hits.append(hit)
        return cls(data, split, torch.stack(phis), mask), hits

    def targets(self) -> tuple[Tensor, Tensor]:
        """Universe ids of the forget examples and of the class-matched never-seen test images."""
        test_labels = self.data.test_labels.cpu()
        unseen = (torch.isin(test_labels, torch.tensor(self.split.classes)) if self.split.classes is not None
                  else torch.ones_like(test_labels, dtype=torch.bool))
        forget = torch.searchsorted(self.data.pool.cpu(), self.split.forget.cpu())  # pool positions
        return forget, unseen.nonzero().flatten() + self.n_pool

    def attack(self, models: dict[str, nn.Module]) -> tuple[dict, dict]:
        """({model: summary}, per-example scores for the file beside metrics.json)."""
        forget, unseen = self.targets()
        ids = torch.cat([forget, unseen])
        universe = self.universe(self.data)
        dev_ids = ids.to(universe.images.device)
        summaries, per_example = {}, {"forget_ids": self.split.forget.cpu().tolist(),
                                      "unseen_test_ids": (unseen - self.n_pool).tolist()}
        for name, net in models.items():
            phi = logit_confidence(net, universe.images[dev_ids], universe.labels[dev_ids])
            scores = lira_scores(phi, self.shadow_phi[:, ids], self.in_mask[:, ids])
            member, nonmember = scores[: len(forget)], scores[len(forget):]
            summaries[name] = summarise(member, nonmember)
            per_example[name] = {"forget": member.tolist(), "unseen": nonmember.tolist()}
        return summaries, per_example
