"""DLFD: fine-tune on retain samples perturbed so that their features move away from the forget set's.

Choi & Na, "Distribution-Level Feature Distancing for Machine Unlearning: Towards a Better
Trade-off Between Model Utility and Forgetting", AAAI 2025, arXiv:2409.14747.

One epoch over D_r (data plan: retain, the anchor, paired with forget batches that cycle; the
validation images are read by the monitor). While perturbing, each retain batch gets K signed
steps δ ← δ + a·sign ∇_δ J, J = w_f·OT(h(x_r + δ), h(x_f)) − w_r(t)·CE(f(x_r + δ), y_r), with w_r
linear from w_r0 to w_r1 over the epoch; then one SGD step on CE(f(x*), y_r), x* = clip(x_r + δ).
OT is log-domain Sinkhorn on the cost max(0, 1 − cos) (functional.sinkhorn_plan). D_f is only an
OT target, never a CE target. Every `monitor_every` batches: the forgetting score FS (loss-MIA, D_f
vs D_val, ≤ `monitor_samples` each, size-balanced) and validation accuracy; perturbing continues
while FS ≥ τ_FS, and the best-validation state with FS ≤ FS_max is restored at the epoch's end
(if none qualifies, the last state stays). `fs_units: chance` [design] reads τ_FS and FS_max as
multiples of the balanced score's chance level σ_n = 0.5/√n, n = MIA samples a side (under no
signal FS/σ_n has median ≈ 0.85 and 95th percentile ≈ 2 for n from 30 to 300): the card's absolute
0.15 / 0.09 were set for the public code's unbalanced score, which sits at the majority rate (0.2347
on digits whatever the model), so with ours they never let sample forgetting perturb.
Faults of the public code avoided (docs/methods.md, dlfd): OT on the *perturbed* features, not the
clean ones (`ot_on_clean: true` is the code-faithful mode, where OT gives δ no gradient); pixel
space [0, 1] (normalisation is inside the model); the monitor restores train mode; FS every k
batches on ≤ 300 samples, not a full MIA per batch; Sinkhorn on the cost's device; δ in an
L∞ ball of radius `epsilon`; balanced MIA sets; validation accuracy is `val`, not "test".
Deviations [design]: h = penultimate features (`feature: logits` is the code's); the PGD passes run
with the network in eval mode (BatchNorm statistics are neither used per batch nor updated by the
K probes); Sinkhorn `tol` 1e-3 instead of 0.1 (see sinkhorn_plan). Class-wise forgetting (the
paper is instance-level): FS uses the forget classes' validation images (class-matched, as the
metric), which stays near 0 whether or not the class is forgotten (and on digits rests on about 14
validation images a class), so there perturbing continues while forget_acc on the monitored D_f
subsample > τ_acc, and the states that qualify for restoring are those with forget_acc ≤ τ_acc; FS is
logged only. A forget set too small for the MIA (< 10 samples) counts as FS = 0.5.
The class defaults are the card's MUFAC values (ε-ball 0.3 [design]); the yaml's digits defaults (SGD
lr 0.03, a 0.015, ε 0.05) were chosen on the validation split (see the yaml).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import sinkhorn_plan
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import stratified_subset

FEATURES = ("penultimate", "logits")
FS_UNITS = ("absolute", "chance")


def chance_level(n: int) -> float:
    """σ_n = 0.5/√n: the spread of a balanced MIA accuracy at chance with n samples a side."""
    return 0.5 / max(int(n), 1) ** 0.5


@contextmanager
def eval_mode(net: nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def embed(net: nn.Module, x: Tensor, feature: str) -> tuple[Tensor, Tensor]:
    """(h, logits) from one pass: h = the penultimate features or the logits themselves."""
    h = net.features(x)
    logits = net.body.get_classifier()(h)
    return (logits if feature == "logits" else h), logits


def ot_distance(h_r: Tensor, h_f: Tensor, sinkhorn: dict | None = None) -> Tensor:
    """Σ P ⊙ C, C_ij = max(0, 1 − cos(h_r_i, h_f_j)), P the entropic plan between uniform weights."""
    cost = (1 - F.normalize(h_r.float(), dim=1) @ F.normalize(h_f.float(), dim=1).T).clamp_min(0)
    return (sinkhorn_plan(cost, **(sinkhorn or {})) * cost).sum()


def pgd_delta(net: nn.Module, x: Tensor, y: Tensor, h_f: Tensor, w_f: float, w_r: float, steps: int,
              step_size: float, epsilon: float, feature: str = "penultimate", ot_on_clean: bool = False,
              sinkhorn: dict | None = None) -> Tensor:
    """δ after `steps` signed ascent steps on J = w_f·OT(h(x'), h_f) − w_r·CE(f(x'), y), x' = clip(x + δ)."""
    delta = torch.zeros_like(x, requires_grad=True)
    if ot_on_clean:  # the public code's fault: OT of the clean batch is a constant in δ
        with torch.no_grad():
            clean = embed(net, x, feature)[0]
    for _ in range(int(steps)):
        h, logits = embed(net, (x + delta).clamp(0, 1), feature)
        j = w_f * ot_distance(clean if ot_on_clean else h, h_f, sinkhorn) - w_r * F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(j, delta)
        delta = (delta + step_size * grad.sign()).clamp(-epsilon, epsilon).detach().requires_grad_(True)
    return delta.detach()


class DLFD(UnlearningModule):
    """CE on D_r perturbed away from D_f in feature space, while the forgetting score is high."""

    @classmethod
    def validation_use(cls, method_cfg, forget_kind: str) -> str | None:
        return "monitors the forget score against validation images and restores the best-validation state"

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 1, batch_size: int = 32, seed: int = 0, forget_batch_size: int = 32,
                 w_f: float = 3.0, w_r0: float = 0.0, w_r1: float = 1.0, pgd_steps: int = 15,
                 step_size: float = 0.09, epsilon: float = 0.3, feature: str = "penultimate",
                 ot_on_clean: bool = False, fs_threshold: float = 0.15, fs_max: float = 0.09,
                 fs_units: str = "absolute", acc_threshold: float = 0.05, monitor_every: int = 10, monitor_samples: int = 300,
                 val_samples: int = 1000, sinkhorn_epsilon: float = 0.01, sinkhorn_iters: int = 50,
                 sinkhorn_tol: float = 1e-3) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if feature not in FEATURES:
            raise ConfigError(f"method.feature={feature!r}: allowed {', '.join(FEATURES)}")
        if fs_units not in FS_UNITS:
            raise ConfigError(f"method.fs_units={fs_units!r}: allowed {', '.join(FS_UNITS)}")
        limits = {"forget_batch_size": (forget_batch_size, forget_batch_size > 0, "> 0"),
                  "w_f": (w_f, w_f >= 0, ">= 0"), "pgd_steps": (pgd_steps, pgd_steps >= 0, ">= 0"),
                  "step_size": (step_size, step_size >= 0, ">= 0"), "epsilon": (epsilon, 0 <= epsilon <= 1, "in [0, 1]"),
                  "fs_threshold": (fs_threshold, fs_threshold >= 0, ">= 0"), "fs_max": (fs_max, fs_max >= 0, ">= 0"),
                  "acc_threshold": (acc_threshold, 0 <= acc_threshold <= 1, "in [0, 1]"),
                  "monitor_every": (monitor_every, monitor_every > 0, "> 0"),
                  "monitor_samples": (monitor_samples, monitor_samples >= 10, ">= 10 (the MIA's ten splits)"),
                  "val_samples": (val_samples, val_samples > 0, "> 0"),
                  "sinkhorn_epsilon": (sinkhorn_epsilon, sinkhorn_epsilon > 0, "> 0"),
                  "sinkhorn_iters": (sinkhorn_iters, sinkhorn_iters > 0, "> 0")}
        for key, (value, ok, allowed) in limits.items():
            if not ok:
                raise ConfigError(f"method.{key}={value}: must be {allowed}")
        self.forget_batch_size, self.feature, self.ot_on_clean = int(forget_batch_size), feature, bool(ot_on_clean)
        self.w_f, self.w_r0, self.w_r1 = float(w_f), float(w_r0), float(w_r1)
        self.pgd_steps, self.step_size, self.epsilon = int(pgd_steps), float(step_size), float(epsilon)
        self.fs_threshold, self.fs_max, self.acc_threshold = float(fs_threshold), float(fs_max), float(acc_threshold)
        self.fs_units = fs_units
        self.fs_scale = 1.0  # chance units: σ_n of the monitored sets (monitor_sets)
        self.perturbed_steps = 0
        self.monitor_every, self.monitor_samples, self.val_samples = int(monitor_every), int(monitor_samples), int(val_samples)
        self.sinkhorn = {"epsilon": float(sinkhorn_epsilon), "max_iter": int(sinkhorn_iters), "tol": float(sinkhorn_tol)}

    def data_plan(self) -> DataPlan:
        """Retain batches (the anchor) paired with cycled forget batches; D_val for the monitor."""
        return DataPlan((SplitSpec("retain", self.batch_size), SplitSpec("forget", self.forget_batch_size),
                         SplitSpec("val")), anchor="retain")

    def on_train_start(self) -> None:
        self.monitor_sets()
        self.history: list[dict] = []
        self.best: dict[str, Tensor] | None = None
        self.best_acc, self.selected_step = -1.0, None
        self.perturbed_steps = 0
        self.monitor()  # decides whether the first batches are perturbed

    def monitor_sets(self) -> None:
        """Seeded, fixed subsets: D_f and its MIA non-members (D_val, class-matched), retained-class D_val."""
        data = self.data
        val, forget = data.indices("val").cpu(), data.indices("forget").cpu()
        unseen, seen = val, val
        if data.forget_classes is not None:
            in_forget = torch.isin(data.labels(val), torch.tensor(data.forget_classes))
            unseen, seen = val[in_forget], val[~in_forget]

        def subset(ids: Tensor, n: int) -> Tensor:
            return ids[stratified_subset(data.labels(ids), n, self.seed)]
        self.sets = {"forget": subset(forget, self.monitor_samples), "unseen": subset(unseen, self.monitor_samples),
                     "val": subset(seen, self.val_samples)}
        n = min(len(self.sets["forget"]), len(self.sets["unseen"]))  # the MIA balances to this
        self.fs_scale = chance_level(n) if self.fs_units == "chance" else 1.0

    @property
    def fs_limits(self) -> tuple[float, float]:
        """(τ_FS, FS_max) on the score's own scale: perturb while FS ≥ τ_FS; states with FS ≤ FS_max qualify."""
        return self.fs_threshold * self.fs_scale, self.fs_max * self.fs_scale

    def choices(self) -> dict:
        """The rule's thresholds (FS on its own scale), steps perturbed, the state kept (metrics.json)."""
        threshold, fs_max = self.fs_limits
        rule = ({"acc_threshold": self.acc_threshold} if self.data.forget_classes is not None
                else {"fs_threshold": threshold, "fs_max": fs_max})
        return {**rule, "perturbed_steps": self.perturbed_steps, "selected_step": self.selected_step}

    def monitor(self) -> dict:
        """FS, forget and validation accuracy of the current weights; updates `perturbing` and the best state."""
        data, classwise = self.data, self.data.forget_classes
        probs = {k: data.predict(self.net, ids) for k, ids in self.sets.items()}  # eval mode, restored
        y = {k: data.labels(ids) for k, ids in self.sets.items()}
        mia = MF.mia_loss_acc(MF.per_sample_loss(probs["forget"], y["forget"]),
                              MF.per_sample_loss(probs["unseen"], y["unseen"]), self.seed)
        fs = 0.5 if mia is None else MF.forget_score(mia)
        acc = {k: MF.accuracy(probs[k].argmax(1), y[k]) for k in ("forget", "val")}
        if classwise is None:  # the card's stopping rule on the forgetting score
            threshold, fs_max = self.fs_limits
            self.perturbing, qualifies = fs >= threshold, fs <= fs_max
        else:  # [design] class-wise: on forget accuracy (a class-matched FS stays near 0)
            qualifies = acc["forget"] <= self.acc_threshold
            self.perturbing = not qualifies
        record = {"step": self.global_step, "forget_score": fs, "forget_acc": acc["forget"], "val_acc": acc["val"],
                  "perturbing": self.perturbing}
        self.history.append(record)
        if self.global_step > 0 and qualifies and (acc["val"] or 0.0) > self.best_acc:
            self.best_acc, self.selected_step = acc["val"] or 0.0, self.global_step
            self.best = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return record

    def retain_weight(self, t: int) -> float:
        """w_r(t) = w_r0 + (w_r1 − w_r0)·t/(T − 1) over the epoch's T batches."""
        last = max(int(self.trainer.num_training_batches) - 1, 1)
        return self.w_r0 + (self.w_r1 - self.w_r0) * min(t, last) / last

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def perturbed(self, x: Tensor, y: Tensor, xf: Tensor) -> Tensor:
        """x* = clip(x + δ) with the K-step δ, computed in eval mode; detached."""
        with eval_mode(self.net), torch.enable_grad():
            with torch.no_grad():
                h_f = embed(self.net, xf, self.feature)[0]
            delta = pgd_delta(self.net, x, y, h_f, self.w_f, self.retain_weight(self.batch_idx), self.pgd_steps,
                              self.step_size, self.epsilon, self.feature, self.ot_on_clean, self.sinkhorn)
        return (x + delta).clamp(0, 1)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        if self.perturbing:
            x = self.perturbed(x, y, batch["forget"][0])
            self.perturbed_steps += 1
        return F.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        last = batch_idx + 1 >= self.trainer.num_training_batches or 0 < self.trainer.max_steps <= self.global_step
        if last or (batch_idx + 1) % self.monitor_every == 0:
            record = self.monitor()
            self.log_dict({"train/forget_score": record["forget_score"], "train/perturbing": float(record["perturbing"])})
        if last and self.best is not None:  # before the evaluation callback's epoch-end scores
            self.net.load_state_dict(self.best)
