"""Mnemonic codes: one-shot class unlearning from per-class codes the original was trained with.

Yamashita, Yamada, Shibata, "One-Shot Machine Unlearning with Mnemonic Code", ACML 2024
(PMLR 260:255-270), arXiv:2306.05670.

Training (Alg. 1): one fixed code ξ_c ~ N(0, I) per class; every epoch each sample's input is
replaced by its class's code with probability t_mix (label unchanged). Unlearning (Alg. 2,
Eqs. 5-7), one-shot, eval mode, float32: g_c = ∇θ CE(f(ξ_c), c), one backward per class;
f_F, f_R = mean of g_c² over forgotten / retained classes; η = f_F / (f_R + ε); per tensor
α_l = min(λ1, λ2 / max η^l); of θ ± α_l·η^l keep the one with the larger retain accuracy + forget error.

Deliberate choices ([design], docs/methods.md, mnemonic):
- the original is the method's own (`original_recipe`): the runner trains and caches it apart
  from the plain original; the codes and their SHA-256 are stored in that cache entry, and the
  unlearning checks the hash and that `seed` regenerates exactly those codes;
- codes live in pixel space as μ + σ·ξ (exactly N(0, I) after the model's Normalize), unclamped
  (clamping to [0, 1] would make them non-Gaussian), and skip augmentation;
- only conv and linear weights are perturbed (not BatchNorm, not biases); squares in float64;
- ε (`eps`) defaults to 1e-6, not the specification's 1e-12: with 1e-12, η explodes wherever the retain
  codes leave a weight untouched (f_R ~ 0), and on digits no λ1/λ2 forgot the class without a
  retain accuracy drop of more than 6 points (docs/tuning/mnemonic.md);
- λ1 is relative (`lambda1_relative`): λ1 / max η, the max over every perturbed weight, so λ1 is the
  largest change of any weight. The scale of η follows how well the original memorised the codes
  (max η 0.04 on one digits original, 1.3e5 on another), so an absolute λ1 that forgets on one
  original moves nothing on the next. `lambda2` (the per-tensor cap) defaults to null, none: the
  authors' configs (λ2 10 and 1e4) leave it inactive too, and on digits a cap cost retain accuracy
  at every forgetting step;
- the candidate is chosen on `val_per_class` stratified validation images per class
  (`selection: val`) or on the codes alone (`selection: codes`, data-free); a tie keeps +;
- `lambda1_grid` (not in the paper), walked upwards (`functional.walk_grid`) in factors of √2: the
  step is the first λ1 whose better sign *forgets with a margin* on the selection set: at most
  `forget_tolerance` of the forgotten classes' selection images classified as their class, and none
  of them giving its class more than `max_forget_prob` (null: 1/K, chance). A class the model still
  ranks a close second on its own images is outvoted, not forgotten, and training images that the
  ~15 validation images of a class do not show are then still recognised (digits: up to 6 % of D_f
  one √2 step before the chance margin held, 0 % at it). One stronger step is taken if it still
  forgets within `retain_tolerance` of that step's retain accuracy (`margin_steps` 1). A step whose
  selection retain accuracy is more than `retain_budget` below the unedited model's ends the walk;
  then, as when no step forgets, the tried step with the best score;
- the walk follows a curve, not a line (`path: refresh`): η is recomputed from the codes at the
  weights each grid step reached, and the next step moves by the λ1 increment along that η (λ1
  stays an upper bound on any weight's total change). Each sign walks its own curve (following
  only the sign that scored better early left class 7 seed 1 unforgotten). Along the original's η
  alone (`path: line`) the bound (forget ≤ 1 % of D_f, retain within 3 points) failed for 2 of 9
  digits originals and no λ1 on the line met it for one; the curve met it for all 9, and for 20 of
  21 other (class, seed) pairs (docs/tuning/mnemonic.md). It costs one Fisher pass per step and sign;
- class-level only: codes are per class, so sample forgetting is refused.
"""

from __future__ import annotations

import functools
import hashlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import CheckpointError, ConfigError
from mu_runner.methods.base import OneShotModule, OriginalRecipe
from mu_runner.methods.functional import Candidate, walk_grid
from mu_runner.methods.supervised import SupervisedTraining

CODE_SALT, MIX_SALT = 20_230_608, 1_000_003  # codes and mixing draws apart from the init's seed stream


def make_codes(num_classes: int, shape, mean: Tensor, std: Tensor, seed: int) -> Tensor:
    """ξ_pix = μ + σ·ξ, ξ ~ N(0, I) of the input's shape, one per class (seeded, on the CPU)."""
    xi = torch.randn(num_classes, *shape, generator=torch.Generator().manual_seed(int(seed) + CODE_SALT))
    return mean.detach().cpu().reshape(1, -1, 1, 1) + std.detach().cpu().reshape(1, -1, 1, 1) * xi


def digest(codes: Tensor) -> str:
    t = codes.detach().cpu().float().contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


class CodeMixedTraining(SupervisedTraining):
    """The original's recipe with codes mixed in (Alg. 1); the codes travel with the model."""

    def __init__(self, net: nn.Module, optimizer, scheduler=None, epochs: int = 10, batch_size: int = 128,
                 seed: int = 0, *, data, t_mix: float, code_seed: int) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        self.register_buffer("codes", make_codes(data.num_classes, data.source.shape, net.mean, net.std, code_seed))
        self.t_mix, self.mixing = float(t_mix), torch.Generator().manual_seed(int(seed) + MIX_SALT)
        self.seconds = 0.0

    def mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each sample becomes its class's code with probability t_mix; after augmentation, so codes skip it."""
        replace = (torch.rand(len(y), generator=self.mixing) < self.t_mix).to(y.device)
        return torch.where(replace.view(-1, 1, 1, 1), self.codes[y].to(x.dtype), x), replace

    def unlearning_loss(self, batch) -> Tensor:
        x, y = batch["retain"]
        return F.cross_entropy(self.net(self.mix(x, y)[0]), y)

    def on_train_start(self) -> None:
        self.seconds = time.perf_counter()

    def on_train_end(self) -> None:
        self.seconds = time.perf_counter() - self.seconds

    def artifacts(self) -> dict[str, Tensor]:
        """Stored with the weights: the codes, their SHA-256, the training time (prep_seconds)."""
        return {"codes": self.codes, "codes_sha256": torch.tensor(list(bytes.fromhex(digest(self.codes))),
                                                                  dtype=torch.uint8),
                "train_seconds": torch.tensor(self.seconds, dtype=torch.float64)}


class Mnemonic(OneShotModule):
    """θ ± α_l·η^l with η the forget/retain Fisher ratio of the class codes; no data, no step."""

    network_check = False  # its constructor needs the trained original's codes

    @classmethod
    def validation_use(cls, method_cfg, forget_kind: str) -> str | None:
        if method_cfg.get("selection", "val") == "val":
            return "selects lambda1 and its sign on validation images (or set method.selection=codes)"
        return None
    forget_kinds = ("classes",)

    def __init__(self, net: nn.Module, lambda1: float = 1.6, lambda2: float | None = None, eps: float = 1e-6,
                 t_mix: float = 0.05, selection: str = "val", val_per_class: int = 20, batch_size: int = 256,
                 seed: int = 0, lambda1_relative: bool = True, lambda1_grid: list[float] | None = None,
                 forget_tolerance: float = 0.01, max_forget_prob: float | None = None, margin_steps: int | None = 1,
                 retain_tolerance: float = 0.01, retain_budget: float | None = 0.05, path: str = "refresh") -> None:
        super().__init__(net, batch_size=batch_size, seed=seed)
        if path not in ("line", "refresh"):
            raise ConfigError(f"method.path={path!r}: allowed line, refresh")
        if not (lambda1 > 0 and (lambda2 is None or lambda2 > 0)):
            raise ConfigError(f"method.lambda1={lambda1}, method.lambda2={lambda2}: need both > 0 (lambda2 may be null)")
        if lambda1_grid is not None and (len(lambda1_grid) == 0 or not all(float(v) > 0 for v in lambda1_grid)):
            raise ConfigError(f"method.lambda1_grid={list(lambda1_grid)}: need a non-empty list of values > 0 (or null)")
        if not 0 <= forget_tolerance < 1:
            raise ConfigError(f"method.forget_tolerance={forget_tolerance}: need 0 <= tolerance < 1")
        if max_forget_prob is not None and not 0 < max_forget_prob <= 1:
            raise ConfigError(f"method.max_forget_prob={max_forget_prob}: need 0 < p <= 1 (or null: 1/K)")
        if margin_steps is not None and int(margin_steps) < 0:
            raise ConfigError(f"method.margin_steps={margin_steps}: need >= 0 (or null: no limit)")
        if not 0 <= retain_tolerance < 1:
            raise ConfigError(f"method.retain_tolerance={retain_tolerance}: need 0 <= tolerance < 1")
        if retain_budget is not None and not 0 <= retain_budget <= 1:
            raise ConfigError(f"method.retain_budget={retain_budget}: need 0 <= budget <= 1 (or null)")
        if not eps > 0:
            raise ConfigError(f"method.eps={eps}: need eps > 0 (eta = f_F / (f_R + eps))")
        if not 0 < t_mix < 1:
            raise ConfigError(f"method.t_mix={t_mix}: need 0 < t_mix < 1 (code replacement rate)")
        if selection not in ("val", "codes"):
            raise ConfigError(f"method.selection={selection!r}: allowed val, codes")
        if int(val_per_class) <= 0:
            raise ConfigError(f"method.val_per_class={val_per_class}: need > 0")
        self.grid = sorted(float(v) for v in lambda1_grid) if lambda1_grid is not None else [float(lambda1)]
        self.lambda1, self.relative = float(lambda1), bool(lambda1_relative)
        self.lambda2 = None if lambda2 is None else float(lambda2)
        self.eps, self.selection, self.val_per_class = float(eps), selection, int(val_per_class)
        self.forget_tolerance, self.retain_tolerance = float(forget_tolerance), float(retain_tolerance)
        self.max_forget_prob = None if max_forget_prob is None else float(max_forget_prob)
        self.margin_steps = None if margin_steps is None else int(margin_steps)
        self.retain_budget = 1.0 if retain_budget is None else float(retain_budget)
        self.path = path
        self.candidates, self.sign, self.forget_prob, self.eta_max = [], 1, {}, 0.0  # set by `edit`
        if net is not None:  # net=None: the runner only validates the arguments
            self.register_buffer("codes", verified_codes(net, self.seed), persistent=False)
            seconds = net.artifacts.get("train_seconds")  # training the code-mixed original, once
            self.prep_seconds, self.prep_cached = (None, None) if seconds is None else (float(seconds), True)

    def data_plan(self) -> DataPlan:
        """No batch is trained: `selection: val` reads validation images in `edit`, `codes` no split."""
        return DataPlan((SplitSpec("val"),) if self.selection == "val" else ())

    @classmethod
    def original_recipe(cls, method_cfg) -> OriginalRecipe:
        t_mix, seed = float(method_cfg.get("t_mix", 0.05)), int(method_cfg.get("seed", 0))
        return OriginalRecipe(key={"mnemonic_codes": {"t_mix": t_mix, "code_seed": seed}},
                              training=functools.partial(CodeMixedTraining, t_mix=t_mix, code_seed=seed))

    def edit(self) -> None:
        forget = list(self.data.forget_classes)
        was_training = self.net.training
        self.net.eval()  # scoring passes: BN uses and keeps its running statistics
        try:
            self.perturbed = {f"{m}.weight": mod.weight for m, mod in self.net.named_modules()
                              if isinstance(mod, (nn.Conv2d, nn.Linear))}
            f_f, f_r = code_fisher(self.net, self.codes, self.perturbed, forget)
            self.eta = {n: f_f[n] / (f_r[n] + self.eps) for n in self.perturbed}
            self.eta_max = max(float(e.max()) for e in self.eta.values())
            start = {n: p.detach().clone() for n, p in self.perturbed.items()}
            x, y = self.selection_set()
            self.base_retain = score_candidate(self.net, x, y, forget)[2]  # the unedited model's
            max_prob = self.max_forget_prob if self.max_forget_prob is not None else 1.0 / len(self.codes)
            self.forget_prob = {}

            self.ends, self.before = {}, {}  # path=refresh: per sign, the walk's last and last-but-one (λ1, weights)

            def try_step(lambda1: float) -> list[Candidate]:
                self.alpha = step_sizes(self.eta, lambda1, self.lambda2, self.relative)
                pair = []
                for sign in (1, -1):
                    if self.path == "refresh":
                        self.advance(start, sign, lambda1)
                    else:
                        self.move(start, sign)
                    score, forget_acc, retain_acc, prob = score_candidate(self.net, x, y, forget)
                    self.forget_prob[(lambda1, sign)] = prob
                    pair.append(Candidate(lambda1, sign, score, forget_acc, retain_acc,
                                          forget_acc <= self.forget_tolerance and prob <= max_prob))
                return pair

            self.candidates, chosen = walk_grid(self.grid, try_step, self.base_retain, self.retain_tolerance,
                                                self.retain_budget, self.margin_steps)
            self.scores = {c.variant: c.score for c in self.candidates if c.value == chosen.value}
            self.sign, self.lambda1 = chosen.variant, chosen.value
            if self.path == "refresh":  # the chosen point: one of the sign's last two, else replayed
                kept = [e for e in (self.ends.get(self.sign), self.before.get(self.sign)) if e and e[0] == self.lambda1]
                if kept:
                    self.restore(kept[0][1])
                else:
                    self.ends, self.before = {}, {}
                    for lambda1 in (v for v in self.grid if v <= self.lambda1):
                        self.advance(start, self.sign, lambda1)
            else:
                self.alpha = step_sizes(self.eta, self.lambda1, self.lambda2, self.relative)
                self.move(start, self.sign)
        finally:
            self.ends, self.before = {}, {}  # the curve's weight copies are not kept
            self.net.train(was_training)

    def choices(self) -> dict:
        """λ1 as chosen (relative: the largest change of any weight) and as applied (λ1 / max η), the sign."""
        absolute = self.lambda1 / self.eta_max if self.relative and self.eta_max > 0 else self.lambda1
        if self.path == "refresh" and self.relative:
            absolute = None  # each step of the curve has its own max η: no one absolute λ1
        return {"lambda1": self.lambda1, "lambda1_relative": self.relative, "lambda1_absolute": absolute,
                "lambda2": self.lambda2, "sign": self.sign, "lambda1_tried": sorted({c.value for c in self.candidates}),
                "forget_prob_max": self.forget_prob.get((self.lambda1, self.sign))}

    def move(self, start: dict[str, Tensor], sign: int) -> None:
        with torch.no_grad():
            for n, p in self.perturbed.items():
                p.copy_((start[n].double() + sign * self.alpha[n] * self.eta[n]).to(p.dtype))

    def advance(self, start: dict[str, Tensor], sign: int, lambda1: float) -> None:
        """path=refresh: from this sign's last point, recompute η there and step by the λ1 increment."""
        done, weights = self.ends.get(sign, (0.0, start))
        self.restore(weights)
        f_f, f_r = code_fisher(self.net, self.codes, self.perturbed, list(self.data.forget_classes))
        eta = {n: f_f[n] / (f_r[n] + self.eps) for n in self.perturbed}
        alpha = step_sizes(eta, lambda1 - done, self.lambda2, self.relative)
        with torch.no_grad():
            for n, p in self.perturbed.items():
                p.copy_((p.double() + sign * alpha[n] * eta[n]).to(p.dtype))
        if sign in self.ends:
            self.before[sign] = self.ends[sign]
        self.ends[sign] = (lambda1, {n: p.detach().clone() for n, p in self.perturbed.items()})

    def restore(self, weights: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.perturbed.items():
                p.copy_(weights[n])

    def selection_set(self) -> tuple[Tensor, Tensor]:
        """Codes with their labels (data-free), or `val_per_class` seeded validation images per class."""
        if self.selection == "codes":
            return self.codes, torch.arange(len(self.codes), device=self.codes.device)
        data = self.data
        val = data.indices("val")
        val = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(self.seed))]
        labels = data.labels(val)
        chosen = torch.cat([val[labels == c][: self.val_per_class] for c in labels.unique().tolist()])
        batches = list(data.loader(chosen.sort().values, self.batch_size))
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def code_fisher(net: nn.Module, codes: Tensor, params: dict[str, Tensor], forget: list[int]):
    """f_F, f_R: mean over forgotten / retained classes of g_c² (float64), one backward per class."""
    totals = [{n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()} for _ in range(2)]
    labels = torch.arange(len(codes), device=codes.device)
    for c in range(len(codes)):
        with torch.autocast(device_type=codes.device.type, enabled=False):
            loss = F.cross_entropy(net(codes[c : c + 1].float()), labels[c : c + 1])
        total = totals[0 if c in forget else 1]
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=False):
            total[n] += g.double().square()
    n_f, n_r = len(forget), len(codes) - len(forget)
    return ({n: t / n_f for n, t in totals[0].items()}, {n: t / n_r for n, t in totals[1].items()})


def step_sizes(eta: dict[str, Tensor], lambda1: float, lambda2: float | None, relative: bool) -> dict[str, float]:
    """α_l = min(λ1', λ2 / max η^l) per tensor; λ1' = λ1 / max η over every tensor when `relative`, else λ1.

    Relative, the largest change of any weight is λ1 (λ2 null: no cap) whatever the scale of η.
    """
    top = max((float(e.max()) for e in eta.values()), default=0.0)
    lam1 = (lambda1 / top if top > 0 else 0.0) if relative else lambda1
    return {n: step_size(e, lam1, lambda2) for n, e in eta.items()}


def step_size(eta: Tensor, lambda1: float, lambda2: float | None) -> float:
    """α_l = min(λ1, λ2 / max η^l): λ2 caps the largest change of a tensor (None: no cap)."""
    top = float(eta.max())
    return lambda1 if top == 0 or lambda2 is None else min(lambda1, lambda2 / top)


def score_candidate(net: nn.Module, x: Tensor, y: Tensor, forget: list[int]) -> tuple[float, float, float, float]:
    """(retain accuracy + forget error, forget accuracy, retain accuracy, the largest probability an
    image of a forgotten class gives its own class) of `net` on the selection set."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        logits = net(x.float())
    correct = logits.argmax(1) == y
    is_f = torch.isin(y, torch.tensor(forget, device=y.device))
    forget_acc = float(correct[is_f].float().mean())
    retain_acc = float(correct[~is_f].float().mean())
    own = logits.softmax(1).gather(1, y[:, None]).squeeze(1)[is_f]
    return retain_acc + 1.0 - forget_acc, forget_acc, retain_acc, float(own.max()) if len(own) else 0.0


def verified_codes(net: nn.Module, seed: int) -> Tensor:
    """The codes stored with the original, after checking they are exactly the training codes."""
    stored = getattr(net, "artifacts", {})
    if "codes" not in stored or "codes_sha256" not in stored:
        raise ConfigError("method=mnemonic: the original carries no mnemonic codes (it was not trained with "
                          "them); let the runner train it (original_checkpoint=null) or pass a checkpoint "
                          "saved with its artifact.codes")
    codes, want = stored["codes"], bytes(stored["codes_sha256"].tolist()).hex()
    if digest(codes) != want:
        raise CheckpointError(f"mnemonic codes do not match their stored SHA-256 {want[:12]}: corrupted original")
    regenerated = make_codes(codes.size(0), codes.shape[1:], net.mean, net.std, seed)
    if digest(regenerated) != want:
        raise ConfigError(f"method.seed={seed}: does not generate the codes the original was trained with "
                          f"(sha256 {want[:12]}); use the seed of the code-trained original")
    return codes.detach().clone()
