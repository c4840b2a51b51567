"""Bad Teacher: distil from a random (incompetent) teacher on D_f and the original on part of D_r.

Chundawat, Tarun, Mandal, Kankanhalli, "Can Bad Teaching Induce Forgetting? Unlearning in Deep
Networks Using an Incompetent Teacher", AAAI 2023, arXiv:2205.08096.

T_c = frozen θ_o; T_d = the same architecture re-initialised from `bad_teacher_seed`, frozen (and
kept as `incompetent` for ZRF); student S = the trained network. U = D_f (tag 1) ∪ a seeded
ρ-subset of D_r (tag 0); loss KL(q ‖ softmax(S(x)/τ)), batchmean, q = softmax(T_d(x)/τ) on D_f and
softmax(T_c(x)/τ) on D_r [design: batchmean; the authors' code takes KLDivLoss's element mean
('mean'), exactly ours / K for K classes: a constant factor, which Adam's step ignores up to its
ε]. Deviation [design]: U is served as paired batches (data plan: Schedule.PAIRED, forget the
anchor, the retain subset cycled; `forget_batch_size` + `batch_size`, one forward on their
concatenation, so BatchNorm sees mixed batches as in the paper's shuffled U) rather than one
shuffled set. The anchor is "forget": every
forget sample is seen once per epoch, which is what forgetting needs; the retain subset (itself a
random sample) cycles, and with the default 1:3 split (16:48) and ρ = 0.3 it is fully covered whenever
|D_f| ≥ ρ|D_r|/3 (class-wise k ≥ 1 on 10 classes, random ≥ 10 %). T_d uses each module's
`reset_parameters` (PyTorch's default init, not timm's); it outputs near-uniform probabilities,
as a random network does. The yaml's Adam lr 5e-4 × 3 epochs with 16:48 batches (card: lr 1e-4,
64:192) was chosen on the validation split over three seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import frozen_copy


def random_teacher(net: nn.Module, seed: int) -> nn.Module:
    """A frozen eval copy of `net` with every resettable module re-initialised from `seed`.

    Initialised on the CPU inside a forked RNG: deterministic for the seed on any device, and the
    global random state (dropout, augmentation) is left as it was.
    """
    device = next(net.parameters()).device
    bad = frozen_copy(net).cpu()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # manual_seed seeds CUDA too
        torch.manual_seed(int(seed))
        for module in bad.modules():  # conv, linear, norm layers (BN running stats reset too)
            if module is not bad and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return bad.to(device)


class BadTeacher(UnlearningModule):
    """KL to the incompetent teacher on forget batches, to the competent one on retain batches."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 epochs: int = 1, batch_size: int = 192, seed: int = 0, forget_batch_size: int = 64,
                 retain_fraction: float = 0.3, temperature: float = 1.0, bad_teacher_seed: int = 0) -> None:
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        if not 0 < float(retain_fraction) <= 1 or int(forget_batch_size) <= 0 or float(temperature) <= 0:
            raise ConfigError(f"method.retain_fraction={retain_fraction}, method.forget_batch_size="
                              f"{forget_batch_size}, method.temperature={temperature}: need 0 < retain_fraction "
                              "<= 1, forget_batch_size > 0, temperature > 0")
        self.forget_batch_size, self.retain_fraction = int(forget_batch_size), float(retain_fraction)
        self.temperature, self.bad_teacher_seed = float(temperature), int(bad_teacher_seed)

    def data_plan(self) -> DataPlan:
        """Paired batches: D_f (the anchor, whole) with the ρ-subset of D_r cycled."""
        return DataPlan((SplitSpec("forget", self.forget_batch_size),
                         SplitSpec("retain", self.batch_size, select=self.retain_subset_of)), anchor="forget")

    def retain_subset_of(self, indices: Tensor) -> Tensor:
        """The seeded ρ-subset of D_r (round(ρ·|D_r|) indices, sorted)."""
        gen = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(len(indices), generator=gen)[: round(self.retain_fraction * len(indices))]
        self.retain_subset = indices[keep].sort().values
        return self.retain_subset

    @property
    def competent(self) -> nn.Module:
        return self._teachers[0]

    @property
    def incompetent(self) -> nn.Module:
        return self._teachers[1]

    def on_train_start(self) -> None:
        self._teachers = [frozen_copy(self.net), random_teacher(self.net, self.bad_teacher_seed)]

    def teacher_log_probs(self, xf: Tensor, xr: Tensor) -> Tensor:
        """log q for the rows of cat(xf, xr): T_d on the forget rows (tag 1), T_c on the retain rows."""
        with torch.no_grad():
            bad, good = self.incompetent(xf).float(), self.competent(xr).float()
        return F.log_softmax(torch.cat([bad, good]) / self.temperature, 1)

    def unlearning_loss(self, batch: Batch) -> Tensor:
        (xf, _), (xr, _) = batch["forget"], batch["retain"]
        student = F.log_softmax(self.net(torch.cat([xf, xr])).float() / self.temperature, 1)
        return F.kl_div(student, self.teacher_log_probs(xf, xr), reduction="batchmean", log_target=True)
