"""SNU: selective noise unlearning — error-maximising noise per forget class, impair, then repair.

Shaheryar, Lee, Jung, ISVC 2024 (selective noise unlearning with Grad-CAM), LNCS pp. 96–107,
DOI 10.1007/978-3-031-77389-1_8 (no arXiv, no code; only the abstract is verified). Mechanism
[design proxy, docs/methods.md, snu] = UNSIR: Tarun, Chundawat, Mandal, Kankanhalli, "Fast Yet Effective
Machine Unlearning", IEEE TNNLS 2023, arXiv:2111.08947. Views: Grad-CAM (Selvaraju et al.,
ICCV 2017, arXiv:1610.02391) through the `grad-cam` package.

1. Noise (`on_train_start`, θ frozen, eval mode, fp32): for each forget class c, N_c ∈ R^{B×C×H×W}
   from randn (seeded), trainable and unclamped [design, card], minimises
   −CE(f(N_c), c) + λ·mean_b ‖N_c,b‖² for S Adam steps. All classes are optimised in one tensor with
   the per-class losses summed: Adam is element-wise and BatchNorm is in eval mode, so this equals
   one Adam per class. The pool repeats each N_c `copies` times, every row labelled with its OWN
   class c (the public notebook labels all noise 0 and keeps only 3 of the B images).
2. Impair (`impair_epochs`, train mode, Adam `optimizer`): CE on each retain-subset batch concatenated
   with its share of the shuffled noise pool, so every noise image is seen once per epoch in the
   proportion of the shuffled union [design: the step count follows the retain subset].
3. Repair (`repair_epochs`): CE on the retain subset only; the optimizer's lr becomes `repair_lr` and
   its state is cleared (a fresh Adam, as in the notebook).
The retain subset is `retain_per_class` seeded samples per class of D_r (capped by what each class
has); it holds no forget-class sample since D_r holds none. Data plan: the retain subset in batches
(`select`); D_f read in set-up only (the noise's classes, `gaussian_on_forget`, the views).

Sample forgetting (forget=random|indices, C_F = ∅) [design]: the noise is made for every class that
occurs among the forget samples, each labelled with its own class, and the retain subset is drawn
from D_r as above. `noise_mode: gaussian_on_forget` is the card's alternative guess at "selective
noise" (unverified): `copies` copies of each forget image x_f + σ·ε, clamped to [0, 1], each with a
seeded label in C_R (any class but y for sample forgetting, G6).

Grad-CAM [design]: maps for the true and the predicted class of `gradcam_samples` forget and as many
retain images (seeded, stratified), before (`on_fit_start`, untimed) and after (`write_artifacts`),
on a frozen eval copy, so the network's parameters, buffers, grads and mode are untouched; saved as
one grid `gradcam_views.png` in the run directory. The card asks for D_te^F images, but a method may
not read the test split (G2): the views are D_f and D_r training images. `gradcam_layer: auto`
takes the last stage whose map is at least 2×2 (ResNet-18's layer4 is 1×1 on 8×8 digits, where a
map has no layout; on 32-px CIFAR it is layer4, the card's choice).
The class defaults are the card's (B 256, batch 256, repair lr 0.01; impair Adam lr 0.02 goes in the
optimizer); the yaml's digits defaults (B 32, batch 64, lr 2e-3 / 1e-3) were chosen on the validation split.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mu_runner.data.plan import DataPlan, SplitSpec
from mu_runner.errors import ConfigError
from mu_runner.methods.base import Batch, OptimizerFactory, SchedulerFactory, UnlearningModule
from mu_runner.methods.functional import frozen_copy, random_other_labels
from mu_runner.metrics.scoring import scoring, stratified_subset

log = logging.getLogger("mu_runner")
NOISE_MODES = ("error_max", "gaussian_on_forget")


def error_maximising_noise(net: nn.Module, classes: list[int], batch: int, shape: tuple[int, ...],
                           steps: int, lr: float, l2: float, seed: int) -> tuple[Tensor, Tensor]:
    """(noise, labels): B rows per class c, each minimising −CE(f(N), c) + λ‖N‖²; θ is not touched.

    Eval mode and fp32; gradients are taken w.r.t. the noise only (no parameter's .grad is written).
    """
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(len(classes) * batch, *shape, generator=gen).to(device).requires_grad_(True)
    labels = torch.tensor(classes, device=device).repeat_interleave(batch)
    opt = torch.optim.Adam([noise], lr=lr)  # optimises the inputs; the network has no optimizer here
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            for _ in range(int(steps)):
                per_row = -F.cross_entropy(net(noise), labels, reduction="none") \
                    + l2 * noise.square().flatten(1).sum(1)
                (noise.grad,) = torch.autograd.grad(per_row.sum() / batch, [noise])  # Σ_c mean_b
                opt.step()
    finally:
        net.train(was_training)
    return noise.detach(), labels


def gradcam(net: nn.Module, layer: str, x: Tensor, classes: Tensor) -> Tensor:
    """(N, H, W) Grad-CAM maps in [0, 1] for `classes` at module `layer`, on a frozen eval copy."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    probe = frozen_copy(net).float()
    device = next(probe.parameters()).device
    # the copy has no trainable weight: the graph hangs on x (a copy, so the caller's tensor stays put)
    x = x.detach().to(device).float().clone().requires_grad_(True)
    prefix = getattr(probe.body, "num_prefix_tokens", 1)

    def tokens_to_map(t: Tensor) -> Tensor:  # ViT blocks: (N, T, D) -> (N, D, g, g)
        if t.dim() != 3:
            return t
        g = math.isqrt(t.size(1) - prefix)
        return t[:, prefix:].reshape(t.size(0), g, g, t.size(2)).permute(0, 3, 1, 2)

    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device_type=device.type, enabled=False), \
            GradCAM(probe, [probe.get_submodule(layer)], reshape_transform=tokens_to_map) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=targets)).clamp(0, 1)


class SNU(UnlearningModule):
    """Impair with class-labelled error-maximising noise plus a retain subset, then repair."""

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, batch_size: int = 256, seed: int = 0,
                 noise_mode: str = "error_max", noise_batch: int = 256, copies: int = 4,
                 noise_steps: int = 40, noise_lr: float = 0.1, noise_l2: float = 0.1,
                 noise_sigma: float = 0.1, impair_epochs: int = 1, repair_epochs: int = 1,
                 repair_lr: float = 0.01, retain_per_class: int = 1000, gradcam_samples: int = 16,
                 gradcam_layer: str = "auto") -> None:
        if noise_mode not in NOISE_MODES:
            raise ConfigError(f"method.noise_mode={noise_mode!r}: allowed {', '.join(NOISE_MODES)}")
        for key, value, low in (("noise_batch", noise_batch, 1), ("copies", copies, 1),
                                ("impair_epochs", impair_epochs, 1), ("retain_per_class", retain_per_class, 1),
                                ("noise_steps", noise_steps, 0), ("repair_epochs", repair_epochs, 0),
                                ("gradcam_samples", gradcam_samples, 0)):
            if int(value) != value or value < low:
                raise ConfigError(f"method.{key}={value}: need an integer >= {low}")
        for key, value in (("noise_lr", noise_lr), ("repair_lr", repair_lr), ("noise_l2", noise_l2),
                           ("noise_sigma", noise_sigma)):
            if not float(value) >= 0 or (key == "noise_lr" and not value > 0):
                raise ConfigError(f"method.{key}={value}: need a value {'> 0' if key == 'noise_lr' else '>= 0'}")
        epochs = int(impair_epochs) + int(repair_epochs)
        super().__init__(net, optimizer, scheduler, epochs, batch_size, seed)
        self.noise_mode, self.noise_batch, self.copies = noise_mode, int(noise_batch), int(copies)
        self.noise_steps, self.noise_lr, self.noise_l2 = int(noise_steps), float(noise_lr), float(noise_l2)
        self.noise_sigma, self.impair_epochs = float(noise_sigma), int(impair_epochs)
        self.repair_epochs, self.repair_lr = int(repair_epochs), float(repair_lr)
        self.retain_per_class, self.gradcam_samples = int(retain_per_class), int(gradcam_samples)
        modules = dict(net.body.named_modules()) if net is not None else {}
        if gradcam_layer != "auto" and net is not None and gradcam_layer not in modules:
            raise ConfigError(f"method.gradcam_layer={gradcam_layer!r}: allowed auto or a module of the "
                              f"backbone ({', '.join(net.stage_names)}, ...)")
        self.gradcam_layer = gradcam_layer
        self.noise: Tensor | None = None
        self.noise_labels: Tensor | None = None
        self.retain_subset: Tensor | None = None
        self.views: dict[str, tuple[Tensor, Tensor]] = {}
        self.cams: dict[str, dict[str, dict[str, Tensor]]] = {}  # when -> group -> true|pred|label

    # -- data --------------------------------------------------------------------------------------
    def data_plan(self) -> DataPlan:
        """Batches of the retain subset; D_f read in set-up only."""
        return DataPlan((SplitSpec("retain", self.batch_size, select=self.retain_subset_of), SplitSpec("forget")),
                        anchor="retain")

    def retain_subset_of(self, indices: Tensor) -> Tensor:
        """The retain subset: `retain_per_class` seeded samples of each class of D_r (sorted)."""
        indices = indices.cpu()
        labels = self.data.labels(indices)
        gen = torch.Generator().manual_seed(self.seed)
        keep = []
        for c in labels.unique().tolist():
            of_c = indices[labels == c]
            keep.append(of_c[torch.randperm(len(of_c), generator=gen)[: self.retain_per_class]])
        self.retain_subset = torch.cat(keep).sort().values
        return self.retain_subset

    def noise_classes(self) -> list[int]:
        """C_F; for sample forgetting, every class among the forget samples."""
        data = self.data
        return data.forget_classes or data.labels(data.indices("forget")).unique().tolist()

    def on_train_start(self) -> None:
        data = self.data
        if self.noise_mode == "error_max":
            noise, labels = error_maximising_noise(
                self.net, self.noise_classes(), self.noise_batch, data.image_shape,
                self.noise_steps, self.noise_lr, self.noise_l2, self.seed)
            self.noise = noise.repeat(self.copies, 1, 1, 1)  # copy j of N_c keeps N_c's label c
            self.noise_labels = labels.repeat(self.copies)
        else:
            x, y = (torch.cat(t) for t in zip(*data.batches("forget"), strict=False))
            gen = torch.Generator().manual_seed(self.seed)
            x, y = x.repeat(self.copies, 1, 1, 1), y.repeat(self.copies)
            eps = torch.randn(x.shape, generator=gen).to(x.device)
            self.noise = (x + self.noise_sigma * eps).clamp(0, 1)
            self.noise_labels = random_other_labels(y, data.num_classes, data.forget_classes, gen)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch < self.impair_epochs:  # a fresh shuffle of the noise pool per epoch
            gen = torch.Generator().manual_seed(self.seed * 1009 + self.current_epoch)
            self.noise_order = torch.randperm(len(self.noise), generator=gen).to(self.noise.device)
            self.noise_share = math.ceil(len(self.noise) / max(1, self.trainer.num_training_batches))
        elif self.current_epoch == self.impair_epochs:  # repair: a fresh Adam at repair_lr
            opt = self.optimizers().optimizer
            opt.state.clear()
            for group in opt.param_groups:
                group["lr"] = self.repair_lr

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self.batch_idx = batch_idx  # which share of the noise pool this impair step takes

    def unlearning_loss(self, batch: Batch) -> Tensor:
        x, y = batch["retain"]
        if self.current_epoch < self.impair_epochs:
            i, share = self.batch_idx, self.noise_share
            rows = self.noise_order[i * share: (i + 1) * share]
            x = torch.cat([self.noise[rows].to(x.dtype), x])
            y = torch.cat([self.noise_labels[rows], y])
        return F.cross_entropy(self.net(x), y)  # one forward: BatchNorm sees the mixed batch

    # -- Grad-CAM views ----------------------------------------------------------------------------
    def target_layer(self) -> str:
        if self.gradcam_layer != "auto":
            return f"body.{self.gradcam_layer}"
        sizes: dict[str, int] = {}  # width of each stage's map (token maps count as wide enough)

        def record(name: str):
            return lambda module, inputs, out: sizes.__setitem__(name, out.shape[-1] if out.dim() == 4 else 2)

        stages = self.net.stage_names
        hooks = [self.net.get_submodule(f"body.{s}").register_forward_hook(record(s)) for s in stages]
        try:
            with scoring(self.net):
                self.net(self.views["forget"][0][:1].to(self.device))
        finally:
            for h in hooks:
                h.remove()
        return "body." + [s for s in stages if sizes[s] >= 2][-1]

    def on_fit_start(self) -> None:
        if self.gradcam_samples == 0:
            return
        data = self.data
        for group in ("forget", "retain"):
            idx = data.indices(group).cpu()
            idx = idx[stratified_subset(data.labels(idx), self.gradcam_samples, self.seed)]
            self.views[group] = (data.images(idx).cpu(), data.labels(idx))
        try:
            self._layer = self.target_layer()
            self.cams["before"] = self.gradcam_views(self.net)
        except Exception as err:  # noqa: BLE001 -- a view must never cost a run
            log.warning("snu: Grad-CAM views skipped: %s", err)
            self.views = {}

    def gradcam_views(self, net: nn.Module) -> dict[str, dict[str, Tensor]]:
        out = {}
        for group, (x, y) in self.views.items():
            with scoring(net):
                pred = net(x.to(next(net.parameters()).device)).argmax(1).cpu()
            out[group] = {"true": gradcam(net, self._layer, x, y),
                          "pred": gradcam(net, self._layer, x, pred), "label": pred}
        return out

    def write_artifacts(self, out_dir: Path) -> None:
        """One PNG grid of the views, before and after unlearning."""
        if not self.views:
            return
        self.cams["after"] = self.gradcam_views(self.net)
        save_grid(self.views, self.cams, self._layer, Path(out_dir) / "gradcam_views.png")


def save_grid(views: dict, cams: dict, layer: str, path: Path) -> None:
    """Per group: an image row, then CAM rows (true / predicted class, before / after); a column per sample."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam_rows = [(w, k) for w in ("before", "after") for k in ("true", "pred")]
    rows = [r for g in views for r in [(g, None, None), *[(g, w, k) for w, k in cam_rows]]]
    cols = max(len(v[1]) for v in views.values())
    size = (0.9 * cols + 1.2, 0.95 * len(rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=size, squeeze=False)
    for r, (group, when, kind) in enumerate(rows):
        x, y = views[group]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if c >= len(y):
                ax.axis("off")
                continue
            img = x[c].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            if when is None:
                ax.set_title(f"y={int(y[c])}", fontsize=7)
                continue
            ax.imshow(cams[when][group][kind][c].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"p={int(cams[when][group]['label'][c])}", fontsize=7)
        axes[r][0].set_ylabel(group if when is None else f"{when}\n{kind}", fontsize=7)
    where = layer.removeprefix("body.")
    fig.suptitle(f"snu: Grad-CAM at {where} (forget and retain samples)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
