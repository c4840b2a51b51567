"""A diverged model stops the run (docs/design.md, Failure behaviour).

`DivergenceGuard` is the first callback of every training the runner starts (original, reference,
shadows, the unlearning stage). It raises DivergedError, naming who trained, the step and the value:

- at every training step, a network output that is not finite (the forward pass of the step: it
  runs before a method's own stopping rule can read those outputs and end the stage, as
  grad_ascent's `stop_forget_acc` did on NaN logits);
- after every optimizer step, a loss or a weight (parameter or floating buffer) that is not finite;
- when the training ends, non-finite weights (a one-shot method's edit takes no step).

It runs before any other callback's hook of the same name (the runner puts it first), so no stopping
rule judges a diverged model, and no metrics.json is written for one.
"""

from __future__ import annotations

from itertools import chain

import lightning as L
import torch
from torch import nn

from mu_runner.errors import DivergedError


def diverged(module, what: str, step: int | None = None) -> DivergedError:
    """`method grad_ascent diverged at step 3: loss = nan; lower method.optimizer.lr`."""
    who = getattr(module, "who", None) or type(module).__name__
    at = f" at step {step}" if step is not None else ""
    trains = getattr(module, "optimizer_factory", None) is not None
    hint = f"; lower {getattr(module, 'lr_key', 'method.optimizer.lr')}" if trains else ""
    return DivergedError(f"{who} diverged{at}: {what}{hint}")


def first_non_finite(net: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer with a NaN or an infinity, else None (one sync)."""
    tensors = [(n, t) for n, t in chain(net.named_parameters(), net.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return None
    # Fast path, every step: one L1 norm per tensor (one fused kernel per device and dtype on a GPU, one
    # pass without a boolean copy on a CPU, about 3x faster there; docs/benchmarks.md). A NaN
    # or an infinity makes its norm non-finite; a finite norm means a finite tensor. Only a non-finite
    # norm (or a finite tensor whose norm overflows) takes the exact per-tensor check below.
    norms = torch._foreach_norm([t.detach() for _, t in tensors], 1)
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return None
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0, 0])][0]


def _value(t: torch.Tensor) -> str:
    bad = t.detach()[~torch.isfinite(t.detach())]
    return str(bad.flatten()[0].item()) if bad.numel() else "finite"


class DivergenceGuard(L.Callback):
    """Stops a training whose network output, loss or weights stop being finite (module docstring)."""

    def __init__(self) -> None:
        self._handle = None

    @staticmethod
    def _net(pl_module: L.LightningModule) -> nn.Module:
        net = getattr(pl_module, "net", None)  # not `or`: a torch.compile'd network has no truth value
        return pl_module if net is None else net

    def _remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._remove()
        if str(trainer.precision) == "16-mixed":  # fp16 autocast may overflow on purpose (the scaler skips)
            return
        step = trainer.global_step + 1

        def check(_module, _inputs, out) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            if torch.is_tensor(out) and out.is_floating_point() and not bool(torch.isfinite(out.detach()).all()):
                raise diverged(pl_module, f"network output = {_value(out)}", step)

        self._handle = self._net(pl_module).register_forward_hook(check)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remove()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            raise diverged(pl_module, f"loss = {_value(loss)}", trainer.global_step)
        bad = first_non_finite(self._net(pl_module))
        if bad is not None:
            raise diverged(pl_module, f"weights non-finite after step {trainer.global_step} ({bad})")

    def on_train_end(self, trainer, pl_module) -> None:
        self._remove()
        bad = first_non_finite(self._net(pl_module))
        if bad is not None:
            after = f"step {trainer.global_step}" if trainer.global_step else "its edit"
            raise diverged(pl_module, f"weights non-finite after {after} ({bad})")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove()
