"""WF-Net: per-class weight filters trained once; forgetting classes is a switch of rows.

Poppi, Sarto, Cornia, Baraldi, Cucchiara, "Multi-Class Unlearning for Image Classification via
Weight Filtering", IEEE Intelligent Systems 2024, arXiv:2304.02049 (no public code).

θ_o is frozen (BN in eval mode). Each conv/linear layer l except the classifier head gets a memory
matrix α_l ∈ [0,1]^{K×C_out}; with row r active it computes with w_l ⊙ α_l[r]. All K rows are
trained ONCE on D_tr (`prepare`, before the unlearning timer; cached under the original's spec and
these hyper-parameters, never the forget set): a sample with label y is forwarded with row y
(unlearn term 1/max(CE, 1e-3)) and with T random rows ≠ y (retain term CE);
L = λ0·CE_retain + λ1·mean 1/CE_unlearn + λ2·mean_l mean(1 − α_l), Adam on α only.
Unlearning C_F activates the row product Π_{c∈C_F} α[c]: no optimizer step, no data.

[design] deviations: one α per output channel (per weight would store K model copies), applied as
a scale of the layer's output (exactly w ⊙ α for bias-free layers; the bias is left unscaled);
head excluded by default (scaling its row c is a trivial shortcut); label expansion forwards every
sample 1 + T times in one batch; α is projected onto [0, 1] after each step instead of α =
clamp(β), whose gradient dies for good past a bound; several classes multiply their rows (not in
the paper); the network the evaluation sees (`net`) gets the filtered weights w ⊙ α written in
(layer_change, save_model), while `filter` keeps θ_o and every row unchanged.
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OneShotModule, UnlearningModule
from mu_runner.methods.functional import frozen_copy


class FilterNet(nn.Module):
    """θ_o (frozen copy) with per-class channel scales α_l; `rows` selects them.

    rows = None: θ_o exactly | a LongTensor (B,): one row per sample | a list of classes: product.
    """

    def __init__(self, net: nn.Module, num_classes: int, include_head: bool = False) -> None:
        super().__init__()
        self.net = frozen_copy(net)
        head = f"body.{net.head_name}"
        self.layers = [n for n, m in self.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                       and (include_head or not (n == head or n.startswith(head + ".")))]
        self.alpha = nn.ParameterList()
        for i, name in enumerate(self.layers):
            module = self.net.get_submodule(name)
            self.alpha.append(nn.Parameter(torch.ones(num_classes, module.weight.shape[0])))
            module.register_forward_hook(partial(self._filter, i))
        self.rows: Tensor | list[int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def scales(self, i: int) -> Tensor:
        """(B, C_out) per-sample rows, or (1, C_out) the product of the active class rows."""
        a = self.alpha[i]
        return a[self.rows] if torch.is_tensor(self.rows) else a[list(self.rows)].prod(0, keepdim=True)

    def _filter(self, i: int, module: nn.Module, inputs, out: Tensor) -> Tensor | None:
        if self.rows is None:
            return None  # the original layer, untouched
        s = self.scales(i).to(out.dtype)
        shape = (len(s), -1, 1, 1) if isinstance(module, nn.Conv2d) else (len(s), *[1] * (out.dim() - 2), -1)
        s = s.view(shape)
        if module.bias is None:
            return out * s
        b = module.bias.view(shape[1:])
        return (out - b) * s + b  # = layer(x; w ⊙ α, b): the bias is not filtered

    @torch.no_grad()
    def filtered_weights(self, classes: list[int]) -> dict[str, Tensor]:
        """Parameter name → w_l ⊙ Π_{c∈classes} α_l[c], for every wrapped layer."""
        out = {}
        for i, name in enumerate(self.layers):
            w = self.net.get_submodule(name).weight
            s = self.alpha[i][list(classes)].prod(0).to(w.dtype)
            out[f"{name}.weight"] = w * s.view(-1, *[1] * (w.dim() - 1))
        return out


class FilterTraining(UnlearningModule):
    """Trains all K rows of a FilterNet at once on the training pool (served as split `retain`)."""

    def __init__(self, filt: FilterNet, lr: float, betas: tuple[float, float], epochs: int, batch_size: int,
                 seed: int, rows_per_sample: int, weights: tuple[float, float, float]) -> None:
        cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)  # per epoch
        super().__init__(filt, partial(torch.optim.Adam, lr=lr, betas=betas), cosine, epochs, batch_size, seed)
        self.rows_per_sample, self.weights = rows_per_sample, weights
        self.gen = torch.Generator().manual_seed(seed)

    def data_plan(self) -> DataPlan:
        return DataPlan((SplitSpec("retain", self.batch_size),), anchor="retain")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.net.net.eval()  # θ_o frozen: BN uses (and keeps) its running statistics

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        k, t = self.net.alpha[0].shape[0], self.rows_per_sample
        shift = torch.randint(1, k, (t * len(y),), generator=self.gen).to(y.device)
        self.net.rows = torch.cat([y, (y.repeat(t) + shift) % k])  # row y, then T rows ≠ y
        try:
            ce = F.cross_entropy(self.net(x.repeat(1 + t, 1, 1, 1)), y.repeat(1 + t), reduction="none")
        finally:
            self.net.rows = None
        ce_unlearn, ce_retain = ce[: len(y)], ce[len(y):]
        sparsity = torch.stack([(1 - a).mean() for a in self.net.alpha]).mean()
        w0, w1, w2 = self.weights
        return w0 * ce_retain.mean() + w1 * ce_unlearn.clamp_min(1e-3).reciprocal().mean() + w2 * sparsity

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            for a in self.net.alpha:
                a.clamp_(0, 1)


class WeightFilter(OneShotModule):
    """Forget the classes of the split by activating their (product of) filter rows."""

    forget_kinds = ("classes",)

    def __init__(self, net: nn.Module, epochs: int = 5, batch_size: int = 128, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), rows_per_sample: int = 4, retain_weight: float = 1.0, forget_weight: float = 1.0,
                 alpha_weight: float = 0.05, include_head: bool = False, seed: int = 0) -> None:
        super().__init__(net, batch_size=batch_size, seed=seed)
        for key, value, low in (("epochs", epochs, 1), ("rows_per_sample", rows_per_sample, 1), ("lr", lr, 1e-12),
                                ("retain_weight", retain_weight, 0), ("forget_weight", forget_weight, 0),
                                ("alpha_weight", alpha_weight, 0)):
            if not float(value) >= low:
                raise ConfigError(f"method.{key}={value}: need {key} {'> 0' if low else '>= 0'}")
        if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
            raise ConfigError(f"method.betas={list(betas)}: need two Adam betas in [0, 1)")
        self.filter_spec = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": float(lr),
                            "betas": [float(b) for b in betas], "schedule": "cosine",
                               "rows_per_sample": int(rows_per_sample), "include_head": bool(include_head),
                               "weights": [float(retain_weight), float(forget_weight), float(alpha_weight)]}
        self.filter: FilterNet | None = None

    def prepare(self, cache, spec: dict, original: nn.Module, data, fit) -> None:
        """Train (or load) the filter rows for all classes: once per original and hyper-parameters."""
        h = self.filter_spec

        def train() -> dict[str, Tensor]:
            start = time.perf_counter()
            filt = FilterNet(original, data.num_classes, h["include_head"])
            training = FilterTraining(filt, h["lr"], tuple(h["betas"]), h["epochs"], h["batch_size"], self.seed,
                                      h["rows_per_sample"], tuple(h["weights"]))
            fit(training, h["epochs"])
            alpha = {f"alpha.{n}": a.detach().cpu() for n, a in zip(filt.layers, filt.alpha, strict=False)}
            return {**alpha, "prep_seconds": torch.tensor(time.perf_counter() - start, dtype=torch.float64)}

        key = {"kind": "weight_filter", "original": spec, "filter": {**h, "seed": self.seed}}
        tensors, hit = cache.get_or_create("weight_filter", key, train)
        self.filter = FilterNet(original, data.num_classes, h["include_head"])
        with torch.no_grad():
            for name, a in zip(self.filter.layers, self.filter.alpha, strict=False):
                a.copy_(tensors[f"alpha.{name}"])
        self.filter.requires_grad_(False)
        self.prep_seconds, self.prep_cached = float(tensors["prep_seconds"]), hit

    def edit(self) -> None:
        if self.filter is None:
            raise RuntimeError("WeightFilter: call prepare() before fitting (mu_runner.run.build does)")
        self.switch(self.data.forget_classes)

    @torch.no_grad()
    def switch(self, classes: list[int] | None) -> None:
        """Activate the rows of `classes` (None: θ_o) and write the filtered weights into `net`."""
        self.filter.rows = list(classes) if classes else None
        filtered = self.filter.filtered_weights(classes) if classes else {}
        source = dict(self.filter.net.named_parameters())
        for n, p in self.net.named_parameters():
            p.copy_(filtered.get(n, source[n]))
