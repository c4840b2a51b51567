"""Pure functions shared by more than one method (relabelling, gradient passes)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def allowed_targets(labels: Tensor, num_classes: int, forget_classes: list[int] | None) -> Tensor:
    """Boolean (N, K): the classes each sample may be relabelled to (METHODS.md G6).

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
            for (n, _), g in zip(params.items(), grads):
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
