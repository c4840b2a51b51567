"""l1-sparse: fine-tune on the retained data with a decaying l1 penalty on all weights.

Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu, "Model Sparsity Can Simplify Machine Unlearning",
NeurIPS 2023, arXiv:2304.04934.

L = CE(x_r, y_r) + γ_e·‖θ‖₁ over every parameter, with γ_e = γ₀·(1 − e/(E − E₀)) for the
0-based epoch e < E − E₀ and 0 after (the linear schedule of the authors' `unlearn/FT.py`;
E₀ = `no_l1_epochs`, 0 by default). E₀ = E keeps γ_e = γ₀ constant in every epoch, as the authors'
code does (its `elif unlearn_epochs - no_l1_epochs == 0: current_alpha = alpha`), rather than a
schedule with no penalty epoch at all, which would be `finetune`. When γ_e = 0 the penalty is not
computed, so γ₀ = 0 is exactly `finetune`. "Prune first, then unlearn" is a separate method and not
done here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import l1_norm


class L1Sparse(UnlearningModule):
    """Finetune on D_r plus γ_e·‖θ‖₁ with a linearly decaying γ_e; D_f is never read."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory | None = None,
                 scheduler: SchedulerFactory | None = None, epochs: int = 10, batch_size: int = 256,
                 seed: int = 0, gamma0: float = 1e-4, no_l1_epochs: int = 0) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if not float(gamma0) >= 0.0:
            raise ConfigError(f"method.gamma0={gamma0}: need gamma0 >= 0")
        if not 0 <= int(no_l1_epochs) <= self.epochs:
            raise ConfigError(f"method.no_l1_epochs={no_l1_epochs}: "
                              f"allowed 0..method.epochs ({self.epochs})")
        self.gamma0, self.no_l1_epochs = float(gamma0), int(no_l1_epochs)

    def data_plan(self) -> DataPlan:
        return DataPlan((SplitSpec("retain", self.batch_size),), anchor="retain")

    def gamma_at(self, epoch: int) -> float:
        """γ_e = γ₀·(1 − e/(E − E₀)) for e < E − E₀, else 0; γ₀ in every epoch when E₀ = E (the authors')."""
        span = self.epochs - self.no_l1_epochs
        if span == 0:
            return self.gamma0
        return self.gamma0 * (1 - epoch / span) if epoch < span else 0.0

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        loss = F.cross_entropy(self.net(x), y)
        gamma = self.gamma_at(self.current_epoch)
        if gamma > 0:  # skipped at 0: the loss and every gradient stay exactly finetune's
            loss = loss + gamma * l1_norm(self.net.parameters())
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/l1_gamma", self.gamma_at(self.current_epoch))
