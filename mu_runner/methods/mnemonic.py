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
  retain accuracy drop of more than 6 points (validation numbers in conf/method/mnemonic.yaml);
- the candidate is chosen on `val_per_class` stratified validation images per class
  (`selection: val`) or on the codes alone (`selection: codes`, data-free); a tie keeps +;
- `lambda2_grid` (not in the paper): the step λ2 that forgets a class differs from class to class
  (on digits 0.2 for class 4, where 0.3 already costs 2 retain points; 0.6 for class 5; 1.2 for
  class 8), so the grid is walked upwards: the first λ2 whose better sign brings the selection
  set's forget accuracy to `forget_tolerance` or below, then each next λ2 as long as it still
  forgets and keeps the retained classes' selection accuracy within `retain_tolerance` of that
  first step's — a stronger step at no further retain cost leaves a margin for the forget images the
  ~15 validation images a class do not show (on class 5, λ2 0.8 forgot every validation image but
  4 of 131 training images; 1.6 forgets them all at the same validation retain accuracy). When no
  step forgets, the tried step with the best score (`functional.walk_grid`); null: the fixed `lambda2`;
- class-level only: codes are per class, so sample forgetting is refused.
"""

from __future__ import annotations

import functools
import hashlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    anchor = "forget"  # no batch is trained; a `selection: val` pass reads D_val in `edit`
    forget_kinds = ("classes",)

    def __init__(self, net: nn.Module, lambda1: float = 1e-3, lambda2: float = 0.2, eps: float = 1e-6,
                 t_mix: float = 0.05, selection: str = "val", val_per_class: int = 20, batch_size: int = 256,
                 seed: int = 0, lambda2_grid: list[float] | None = None, forget_tolerance: float = 0.01,
                 retain_tolerance: float = 0.01) -> None:
        super().__init__(net, batch_size=batch_size, seed=seed)
        if not (lambda1 > 0 and lambda2 > 0):
            raise ConfigError(f"method.lambda1={lambda1}, method.lambda2={lambda2}: need both > 0")
        if lambda2_grid is not None and (len(lambda2_grid) == 0 or not all(float(v) > 0 for v in lambda2_grid)):
            raise ConfigError(f"method.lambda2_grid={list(lambda2_grid)}: need a non-empty list of values > 0 (or null)")
        if not 0 <= forget_tolerance < 1:
            raise ConfigError(f"method.forget_tolerance={forget_tolerance}: need 0 <= tolerance < 1")
        self.grid = sorted(float(v) for v in lambda2_grid) if lambda2_grid is not None else [float(lambda2)]
        if not 0 <= retain_tolerance < 1:
            raise ConfigError(f"method.retain_tolerance={retain_tolerance}: need 0 <= tolerance < 1")
        self.forget_tolerance, self.retain_tolerance = float(forget_tolerance), float(retain_tolerance)
        if not eps > 0:
            raise ConfigError(f"method.eps={eps}: need eps > 0 (eta = f_F / (f_R + eps))")
        if not 0 < t_mix < 1:
            raise ConfigError(f"method.t_mix={t_mix}: need 0 < t_mix < 1 (code replacement rate)")
        if selection not in ("val", "codes"):
            raise ConfigError(f"method.selection={selection!r}: allowed val, codes")
        if int(val_per_class) <= 0:
            raise ConfigError(f"method.val_per_class={val_per_class}: need > 0")
        self.lambda1, self.lambda2, self.eps, self.selection = float(lambda1), float(lambda2), float(eps), selection
        self.val_per_class = int(val_per_class)
        self.candidates, self.sign = [], 1  # set by `edit`
        if net is not None:  # net=None: the runner only validates the arguments
            self.register_buffer("codes", verified_codes(net, self.seed), persistent=False)
            seconds = net.artifacts.get("train_seconds")  # training the code-mixed original, once
            self.prep_seconds, self.prep_cached = (None, None) if seconds is None else (float(seconds), True)

    @classmethod
    def original_recipe(cls, method_cfg) -> OriginalRecipe:
        t_mix, seed = float(method_cfg.get("t_mix", 0.05)), int(method_cfg.get("seed", 0))
        return OriginalRecipe(key={"mnemonic_codes": {"t_mix": t_mix, "code_seed": seed}},
                              training=functools.partial(CodeMixedTraining, t_mix=t_mix, code_seed=seed))

    def edit(self) -> None:
        forget = list(self.datamodule.split.classes)
        was_training = self.net.training
        self.net.eval()  # scoring passes: BN uses and keeps its running statistics
        try:
            self.perturbed = {f"{m}.weight": mod.weight for m, mod in self.net.named_modules()
                              if isinstance(mod, (nn.Conv2d, nn.Linear))}
            f_f, f_r = code_fisher(self.net, self.codes, self.perturbed, forget)
            self.eta = {n: f_f[n] / (f_r[n] + self.eps) for n in self.perturbed}
            start = {n: p.detach().clone() for n, p in self.perturbed.items()}
            x, y = self.selection_set()
            self.base_retain = score_candidate(self.net, x, y, forget)[2]  # the unedited model's

            def try_step(lambda2: float) -> list[tuple]:
                self.alpha = {n: step_size(e, self.lambda1, lambda2) for n, e in self.eta.items()}
                pair = []
                for sign in (1, -1):
                    self.move(start, sign)
                    score, forget_acc, retain_acc = score_candidate(self.net, x, y, forget)
                    pair.append(Candidate(lambda2, sign, score, forget_acc, retain_acc,
                                          forget_acc <= self.forget_tolerance))
                return pair

            self.candidates, chosen = walk_grid(self.grid, try_step, self.base_retain, self.retain_tolerance)
            self.scores = {c.variant: c.score for c in self.candidates if c.value == chosen.value}
            self.sign, self.lambda2 = chosen.variant, chosen.value
            self.alpha = {n: step_size(e, self.lambda1, self.lambda2) for n, e in self.eta.items()}
            self.move(start, self.sign)
        finally:
            self.net.train(was_training)

    def choices(self) -> dict:
        return {"lambda2": self.lambda2, "sign": self.sign, "lambda2_tried": sorted({c.value for c in self.candidates})}

    def move(self, start: dict[str, Tensor], sign: int) -> None:
        with torch.no_grad():
            for n, p in self.perturbed.items():
                p.copy_((start[n].double() + sign * self.alpha[n] * self.eta[n]).to(p.dtype))

    def selection_set(self) -> tuple[Tensor, Tensor]:
        """Codes with their labels (data-free), or `val_per_class` seeded validation images per class."""
        if self.selection == "codes":
            return self.codes, torch.arange(len(self.codes), device=self.codes.device)
        data = self.datamodule.data
        val = data.val[torch.randperm(len(data.val), generator=torch.Generator().manual_seed(self.seed))]
        labels = data.labels.cpu()[val]
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


def step_size(eta: Tensor, lambda1: float, lambda2: float) -> float:
    """α_l = min(λ1, λ2 / max η^l): λ2 caps the largest change of a tensor."""
    top = float(eta.max())
    return lambda1 if top == 0 else min(lambda1, lambda2 / top)


def score_candidate(net: nn.Module, x: Tensor, y: Tensor, forget: list[int]) -> tuple[float, float, float]:
    """(retain accuracy + forget error, forget accuracy, retain accuracy) of `net` on the selection set."""
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        correct = net(x.float()).argmax(1) == y
    is_f = torch.isin(y, torch.tensor(forget, device=y.device))
    forget_acc = float(correct[is_f].float().mean())
    retain_acc = float(correct[~is_f].float().mean())
    return retain_acc + 1.0 - forget_acc, forget_acc, retain_acc


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
