"""One evaluator for every model of a run: the original, the unlearned and the retrained model are
scored by the same `Evaluator.score`, and `Evaluator.evaluate` adds the analyses (how the network
changed) and, when asked, the per-example attack. It returns numbers; `outputs.py` writes files.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.errors import ConfigError
from mu_runner.evaluation.features import feature_shift, probe_forget_acc, shift_subsets
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import predict, stratified_subset

MIA_FEATURES = ("confidence", "entropy")


@dataclass
class EvaluationResult:
    """What `Evaluator.evaluate` found. Score dicts use metrics.json's keys; `per_example` holds
    the per-example attack's scores (one list per model) for the file beside metrics.json."""

    original: dict
    unlearned: dict
    retrain: dict | None
    analysis: dict
    privacy: dict | None = None
    per_example: dict | None = None
    seconds: float = 0.0


def mia_feature(probs: Tensor, labels: Tensor, kind: str) -> Tensor:
    """The population attack's scalar feature: true-class confidence, or prediction entropy."""
    if kind == "entropy":
        return MF.entropy(probs)
    return probs.gather(1, labels.view(-1, 1)).flatten() if len(labels) else torch.empty(0)


def member_score(feature: Tensor, kind: str) -> Tensor:
    """Larger means "looks like a member": high confidence, low entropy."""
    return -feature if kind == "entropy" else feature


class Evaluator:
    """Scores models on one forget split. `settings` is the `eval` config group (mia, mia_seed,
    mia_draws, mia_max_samples, feature_samples, probe_samples)."""

    def __init__(self, data: InMemoryData, split: ForgetSplit, settings: Mapping, seed: int = 0) -> None:
        self.data, self.split, self.seed = data, split, int(seed)
        self.mia = str(settings.get("mia", "confidence"))
        if self.mia not in MIA_FEATURES:
            raise ConfigError(f"eval.mia={self.mia!r}: allowed {', '.join(MIA_FEATURES)}")
        mia_seed = settings.get("mia_seed")
        self.mia_seed = self.seed if mia_seed is None else int(mia_seed)
        self.mia_draws = int(settings.get("mia_draws", 0) or 0)
        self.mia_max_samples = settings.get("mia_max_samples", 5000)
        self.feature_samples = int(settings.get("feature_samples", 2000))
        self.probe_samples = settings.get("probe_samples")

    # ---- the metric suite -------------------------------------------------------------------
    def unseen_test(self) -> Tensor:
        """Test images that are class-matched non-members of the forget set: the forgotten
        classes' test images (class forgetting), every test image (sample forgetting)."""
        test_labels = self.data.test_labels.cpu()
        if self.split.classes is None:
            return torch.ones_like(test_labels, dtype=torch.bool)
        return torch.isin(test_labels, torch.tensor(self.split.classes))

    def score(self, net: nn.Module) -> dict[str, float | None]:
        """forget/retain/test accuracy, test accuracy on forgotten classes, MIA-efficacy and its
        AUC, the loss-MIA accuracy with its forgetting score, and NoMUS."""
        data, split, kind = self.data, self.split, self.mia
        labels, test_labels = data.labels.cpu(), data.test_labels.cpu()
        p_forget, p_retain = predict(net, data.images, split.forget), predict(net, data.images, split.retain)
        p_test = predict(net, data.test_images)
        y_f, y_r = labels[split.forget], labels[split.retain]
        is_forget_class = self.unseen_test() if split.classes is not None else torch.zeros_like(test_labels, dtype=torch.bool)
        keep, unseen = ~is_forget_class, self.unseen_test()
        feat_f = mia_feature(p_forget, y_f, kind)
        scores = {
            "forget_acc": MF.accuracy(p_forget.argmax(1), y_f),
            "retain_acc": MF.accuracy(p_retain.argmax(1), y_r),
            "test_acc": MF.accuracy(p_test[keep].argmax(1), test_labels[keep]),
            "test_forget_acc": None if split.classes is None
            else MF.accuracy(p_test[is_forget_class].argmax(1), test_labels[is_forget_class]),
            "mia_efficacy": MF.mia_efficacy(
                mia_feature(p_retain, y_r, kind), mia_feature(p_test[keep], test_labels[keep], kind), feat_f,
                self.mia_seed, self.mia_draws, self.mia_max_samples),
            "mia_auc": MF.roc_auc(member_score(feat_f, kind),
                                  member_score(mia_feature(p_test[unseen], test_labels[unseen], kind), kind)),
        }
        mia_loss = MF.mia_loss_acc(MF.per_sample_loss(p_forget, y_f),
                                   MF.per_sample_loss(p_test[unseen], test_labels[unseen]), self.mia_seed)
        fs = MF.forget_score(mia_loss)
        return {**scores, "mia_loss_acc": mia_loss, "forget_score": fs, "nomus": MF.nomus(scores["test_acc"], fs)}

    # ---- the analyses -------------------------------------------------------------------------
    def analyse(self, original: nn.Module, unlearned: nn.Module, reference: nn.Module | None) -> dict:
        """How the network changed: weight change (whole, per stage, per tensor), feature shift on
        test images, on forget and on retain samples and to the retrained model, and the
        forget-class linear probe of every model."""
        data, split, seed = self.data, self.split, self.seed
        device = data.device
        original.to(device)
        before = {n: p.detach().cpu() for n, p in original.named_parameters()}
        after = {n: p.detach().cpu() for n, p in unlearned.named_parameters()}
        stages = [f"body.{s}" for s in unlearned.stage_names]
        idx = stratified_subset(data.test_labels.cpu(), self.feature_samples, seed)
        images = data.test_images[idx.to(data.test_images.device)]
        out = {
            "layer_change": MF.grouped_change(before, after, unlearned.stage_of),
            "layer_change_params": MF.relative_change(before, after),
            "feature_shift": _strip(feature_shift(original, unlearned, stages, images)),
            "weight_change": MF.total_change(before, after),
        }
        subsets = shift_subsets(data, split, self.feature_samples, seed)
        for name, imgs in subsets.items():
            shift = feature_shift(original, unlearned, stages, imgs) if len(imgs) > 1 else {}
            out[f"feature_shift_{name}"] = _strip(shift) or None
        out["feature_shift_to_retrain"] = None
        if reference is not None:
            reference.to(device)
            both = torch.cat(list(subsets.values()))
            out["feature_shift_to_retrain"] = _strip(feature_shift(reference, unlearned, stages, both))
        out["probe_forget_acc"] = self.probe(unlearned)
        return out

    def probe(self, net: nn.Module) -> float | None:
        return probe_forget_acc(net, self.data, self.split.classes, self.seed, self.probe_samples)

    def evaluate(self, original: nn.Module, unlearned: nn.Module, reference: nn.Module | None,
                 umia=None) -> EvaluationResult:
        """Score the three models with `score`, run the analyses, and the per-example attack
        `umia` (an object with `.attack(models) -> (summary, per_example)`) when given."""
        start = time.perf_counter()
        device = self.data.device
        models = {"original": original.to(device), "unlearned": unlearned,
                  "retrain": None if reference is None else reference.to(device)}
        scores = {name: (None if net is None else self.score(net)) for name, net in models.items()}
        retrain = scores["retrain"]
        for name in ("original", "unlearned", "retrain"):
            if scores[name] is not None:
                scores[name]["avg_gap"] = MF.avg_gap(scores[name], retrain)
                scores[name]["acc_gap"] = MF.acc_gap(scores[name], retrain)
        analysis = self.analyse(original, unlearned, reference)
        for name in ("original", "retrain"):
            if scores[name] is not None:
                scores[name]["probe_forget_acc"] = self.probe(models[name])
        privacy = per_example = None
        if umia is not None:
            privacy, per_example = umia.attack({k: v for k, v in models.items() if v is not None})
            for name, summary in privacy.items():
                scores[name].update({f"umia_{k}": v for k, v in summary.items()})
        return EvaluationResult(scores["original"], scores["unlearned"], retrain, analysis, privacy, per_example,
                                time.perf_counter() - start)


def _strip(shift: dict[str, float]) -> dict[str, float]:
    return {s.removeprefix("body."): v for s, v in shift.items()}
