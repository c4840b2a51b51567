"""SCRUB: a student moves away from a frozen teacher on D_f and stays close to it on D_r.

Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning",
NeurIPS 2023, arXiv:2302.09880. Re-implemented from the paper (the authors' repository is
licensed for non-commercial use only; nothing is copied from it).

Teacher T = frozen eval copy of θ_o; student S = the trained network (θ_o at the start);
d(x) = τ²·KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), batch mean. Epoch e (0-based) is one *max* pass over
D_f minimising −d(x_f) while e < M (`max_steps`), then one *min* pass over D_r minimising
α·d(x_r) + γ·CE(z_S(x_r), y_r) (data plan: Schedule.SEQUENTIAL, `epoch_plan` the passes of
epoch e). lr ×0.1 at `lr_decay_epochs` is the yaml's MultiStepLR.
Bugs of public code avoided (docs/methods.md): the optimizer holds the student's parameters (base
class); exactly M max passes, not M+1; `forget_batch_size` is honoured. With M = 0 the forget
split is not even declared, so M = 0, α = 0, γ = 1 is `finetune` step for step.
The yaml's digits default is the `large` preset shortened (E 3, M 2, decay at 2) with weight decay
5e-4 instead of 0.1, chosen on the validation split; both presets are spelled out in the yaml.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, Schedule, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import frozen_copy


def distill_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over the batch."""
    t = float(temperature)
    log_s, log_t = F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * t * t


class Scrub(UnlearningModule):
    """Max passes over the forget set (first `max_steps` epochs), a min pass over the retain set."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 3, batch_size: int = 128, seed: int = 0, forget_batch_size: int = 32,
                 max_steps: int = 1, temperature: float = 2.0, alpha: float = 0.5, gamma: float = 1.0) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if int(forget_batch_size) <= 0 or int(max_steps) < 0:
            raise ConfigError(f"method.forget_batch_size={forget_batch_size}, method.max_steps={max_steps}: "
                              "need forget_batch_size > 0 and max_steps >= 0")
        if float(temperature) <= 0 or float(alpha) < 0 or float(gamma) < 0:
            raise ConfigError(f"method.temperature={temperature}, method.alpha={alpha}, method.gamma={gamma}: "
                              "need temperature > 0, alpha >= 0, gamma >= 0")
        self.forget_batch_size, self.max_steps = int(forget_batch_size), int(max_steps)
        self.temperature, self.alpha, self.gamma = float(temperature), float(alpha), float(gamma)

    def data_plan(self) -> DataPlan:
        # retain first: its loader gets seed + 0, the same shuffle as finetune's
        forget = (SplitSpec("forget", self.forget_batch_size),) if self.max_steps > 0 else ()
        return DataPlan((SplitSpec("retain", self.batch_size), *forget), schedule=Schedule.SEQUENTIAL,
                        epoch_plan=self.passes)

    def passes(self, epoch: int) -> tuple[str, ...]:
        """A max pass over D_f then a min pass over D_r in the first M epochs, the min pass alone after."""
        return ("forget", "retain") if epoch < self.max_steps else ("retain",)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def on_train_start(self) -> None:
        self._teacher = [frozen_copy(self.net)]

    def divergence(self, x: Tensor, logits: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = self.teacher(x)
        return distill_kl(logits, teacher, self.temperature)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        if "forget" in batch:  # max step: the unbounded term, logged to watch it run away
            x, _ = batch["forget"]
            d = self.divergence(x, self.net(x))
            self.log("train/forget_kl", d.detach())
            return -d
        x, y = batch["retain"]
        logits = self.net(x)
        loss = self.gamma * F.cross_entropy(logits, y)
        if self.alpha > 0:  # α = 0: no teacher pass (and finetune's arithmetic, exactly)
            loss = loss + self.alpha * self.divergence(x, logits)
        return loss
