"""Pure functions shared by more than one method (relabelling, gradient passes, step selection)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.errors import ConfigError


def allowed_targets(labels: Tensor, num_classes: int, forget_classes: list[int] | None) -> Tensor:
    """Boolean (N, K): the classes each sample may be relabelled to (docs/methods.md, General rules).

    Class-wise: the retained classes (a target inside the forget set is no forgetting).
    Sample-wise: every class except the true one.
    """
    allowed = torch.ones(len(labels), num_classes, dtype=torch.bool, device=labels.device)
    if forget_classes:
        allowed[:, torch.tensor(forget_classes, device=labels.device)] = False
    allowed[torch.arange(len(labels), device=labels.device), labels] = False
    return allowed


def random_other_labels(labels: Tensor, num_classes: int, forget_classes: list[int] | None,
                        generator: torch.Generator) -> Tensor:
    """y' ~ Uniform(A(y)): never the true label, never a forgotten class (seeded, on the CPU)."""
    allowed = allowed_targets(labels.cpu(), num_classes, forget_classes)
    weights = allowed.float()
    return torch.multinomial(weights, 1, generator=generator).flatten().to(labels.device)


def nearest_wrong_labels(logits: Tensor, labels: Tensor, forget_classes: list[int] | None) -> Tensor:
    """y' = argmax over A(y) of the original model's logits (Boundary Unlearning's nearest class)."""
    allowed = allowed_targets(labels, logits.size(1), forget_classes)
    return logits.masked_fill(~allowed, float("-inf")).argmax(1)


def forget_gradients(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Σ over batches of ∇θ CE(batch), in eval mode and float32, with no optimizer step.

    (SalUn's saliency takes |∇θ(-CE)| = |∇θ CE|.) The model's mode and grads are restored.
    """
    was_training = net.training
    net.eval()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for x, y in batches:
            with torch.autocast(device_type=x.device.type, enabled=False):
                loss = F.cross_entropy(net(x.float()), y)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=False):
                if g is not None:
                    total[n] += g
    finally:
        net.train(was_training)
    return total


def negative_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """−CE: gradient ascent on the forget data (GA / NegGrad, and NegGrad+'s forget term)."""
    return -F.cross_entropy(logits, labels)


def l1_norm(params: Iterable[Tensor]) -> Tensor:
    """‖θ‖₁ over the given tensors (l1_sparse's regulariser); its gradient is sign(θ)."""
    return sum(p.abs().sum() for p in params)


def top_fraction_mask(scores: dict[str, Tensor], ratio: float, count: int | None = None, *,
                      positive_only: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Boolean masks: True on the round(ratio·N) (or `count`) largest scores of all tensors jointly.

    Ties at the threshold are broken by flat index (a stable sort) unless `generator` is given:
    then by a random permutation drawn from it (on the CPU), so that which of equal scores enter
    depends on the seed, not on where the tensors sit in the parameter order. `positive_only`:
    scores ≤ 0 never enter, so fewer than round(ratio·N) are True when fewer are positive. Without
    ties, every variant selects the same set.
    """
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = round(ratio * flat.numel()) if count is None else count
    if positive_only:
        k = min(k, int((flat > 0).sum()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if generator is None:
        order = torch.sort(flat, descending=True, stable=True).indices  # stable: ties by flat index
    else:  # shuffle, then a stable sort: equal scores come out in the shuffled order
        perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
        order = perm[torch.sort(flat[perm], descending=True, stable=True).indices]
    keep[order[:k]] = True
    sizes = [s.numel() for s in scores.values()]
    return {n: m.view_as(s) for (n, s), m in zip(scores.items(), keep.split(sizes), strict=False)}


def threshold_ties(scores: dict[str, Tensor], ratio: float) -> float:
    """Fraction of all scores equal to the round(ratio·N)-th largest (the selection threshold).

    Near 0 for continuous scores; large when many scores are equal there (e.g. exact zeros of a
    gradient saliency), which is when the tie-breaking rule of `top_fraction_mask` decides the mask.
    """
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = round(ratio * flat.numel())
    if k == 0 or flat.numel() == 0:
        return 0.0
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest
    return float((flat == threshold).sum()) / flat.numel()


@torch.no_grad()
def pin_(net: nn.Module, free: dict[str, Tensor], values: dict[str, Tensor],
         optimizer: torch.optim.Optimizer) -> None:
    """θ ← where(free, θ, values) for every parameter named in `free`, and the optimizer state there zeroed.

    After an optimizer step: weight decay and momentum move weights whose gradient is zero, so
    masked weights (SalUn: back to θ_o; weight_reset prune: back to 0) are put back, and their
    momentum / Adam moments cleared so that they cannot drift at the next step either.
    """
    for n, p in net.named_parameters():
        if n not in free:
            continue
        m = free[n]
        p.copy_(torch.where(m, p, values[n]))
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value.masked_fill_(~m, 0)


def freeze_except(net: nn.Module, trainable: tuple[str, ...]) -> None:
    """requires_grad only for parameters of `net.body` under the module-name prefixes `trainable`."""
    check_modules(net, trainable, "method.trainable")
    for name, p in net.body.named_parameters():
        p.requires_grad_(any(under(name, t) for t in trainable))


def check_modules(net: nn.Module, prefixes, key: str) -> None:
    """ConfigError unless every entry of `prefixes` names a module of `net.body` (e.g. layer4, fc)."""
    names = [n for n, _ in net.body.named_modules()]
    missing = [p for p in prefixes if not any(under(n, p) for n in names)]
    if missing:
        top = ", ".join(n for n in names if n and "." not in n)
        raise ConfigError(f"{key}={list(prefixes)}: {missing} are not modules of the backbone ({top})")


def under(name: str, prefix: str) -> bool:
    """`name` is the module `prefix` or inside it (dotted names)."""
    return name == prefix or name.startswith(prefix + ".")


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy of `net` in eval mode with no gradients: a teacher or probe that never trains.

    Methods keep it in a plain list, so it is no submodule: not in the optimizer, not in the
    checkpoint, and not switched to train mode by Lightning.
    """
    return copy.deepcopy(net).eval().requires_grad_(False)


def batchnorm_eval(net: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Put every BatchNorm of `net` in eval mode, except modules whose name `keep` accepts.

    Lightning switches the whole model to train mode at each epoch start, so methods call this
    from `on_train_batch_start`; in eval mode BatchNorm uses and keeps its running statistics.
    """
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not keep(name):
            module.eval()


def sinkhorn_plan(cost: Tensor, epsilon: float = 0.01, max_iter: int = 50, tol: float = 1e-3) -> Tensor:
    """Entropic optimal-transport plan between uniform weights on the rows and columns of `cost`.

    Log-domain Sinkhorn (Cuturi, NeurIPS 2013, arXiv:1306.0895), stable for small ε: with
    M_ij = (−C_ij + u_i + v_j)/ε, u ← u + ε(log μ − LSE_j M), v ← v + ε(log ν − LSE_i M), at most
    `max_iter` rounds, stopping once Σ|Δu| < `tol`; the plan is P = exp(M) and OT = Σ P ⊙ C.
    Differentiable: gradients flow through C and the unrolled iterations. Float32 at least (a bf16
    cost under autocast is promoted), on the cost's own device. The common code's `tol` 0.1 stops
    after a few rounds at ε = 0.01, with row sums off by about μ itself; 1e-3 keeps them within 1e-2.
    """
    c = cost if cost.dtype in (torch.float32, torch.float64) else cost.float()
    n, m = c.shape
    log_mu = torch.full((n,), 1.0 / n, dtype=c.dtype, device=c.device).log()
    log_nu = torch.full((m,), 1.0 / m, dtype=c.dtype, device=c.device).log()
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)

    def scaled(u: Tensor, v: Tensor) -> Tensor:
        return (u[:, None] + v[None, :] - c) / epsilon

    for _ in range(int(max_iter)):
        u_prev = u
        u = u + epsilon * (log_mu - torch.logsumexp(scaled(u, v), 1))
        v = v + epsilon * (log_nu - torch.logsumexp(scaled(u, v), 0))
        if float((u - u_prev).detach().abs().sum()) < tol:
            break
    return scaled(u, v).exp()


class Candidate(NamedTuple):
    """One tried setting of a one-shot edit, scored on a held-out selection set."""

    value: float  # the grid value (mnemonic's λ1, SSD's α)
    variant: int  # a second choice tried at each value (mnemonic's sign), else 0
    score: float  # retain accuracy + forget error (higher is better)
    forget_acc: float
    retain_acc: float
    forgets: bool  # the method's forgetting criterion holds


def walk_grid(grid: Iterable[float], try_value: Callable[[float], list[Candidate]], base_retain: float,
              retain_tolerance: float, retain_budget: float = 1.0,
              max_extra: int | None = None) -> tuple[list[Candidate], Candidate]:
    """Walk a grid from the gentlest edit to the strongest; returns (every candidate tried, the chosen one).

    At each value the variant with the best score is taken (a tie keeps the first). Chosen: the first
    value that forgets, if its retain accuracy is within `retain_budget` of the unedited model's
    (`base_retain`); then each next value while it still forgets and keeps the retain accuracy
    within `retain_tolerance` of that first one's (a stronger edit at no further retain cost leaves
    a margin for forget images the selection set lacks), at most `max_extra` of them (None: no limit;
    0: the first value that forgets, and nothing stronger is tried).
    The walk stops at the first value that fails. When no value forgets within the budget, the
    tried candidate with the best score.
    """
    tried: list[Candidate] = []
    chosen = first = None
    extra = 0
    for value in grid:
        if first is not None and max_extra is not None and extra >= max_extra:
            break
        variants = try_value(value)
        tried += variants
        best = max(variants, key=lambda c: c.score)
        if chosen is None:
            if best.forgets:
                if best.retain_acc < base_retain - retain_budget:
                    break  # forgetting here costs more than the budget: stronger edits would cost more
                chosen = first = best
        elif best.forgets and best.retain_acc >= first.retain_acc - retain_tolerance:
            chosen, extra = best, extra + 1
        else:
            break
    return tried, chosen if chosen is not None else max(tried, key=lambda c: c.score)
