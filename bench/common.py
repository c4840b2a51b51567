"""What `bench/cpu.py` and `bench/gpu.py` share: the plain baseline, the project's path, timing.

Baseline: the way typical unlearning code trains — a per-sample `torch.utils.data.Dataset` (one
image at a time: uint8 -> float, the same random shift / flip as ours, as torchvision transforms
on a tensor), a `DataLoader` (same batch size, shuffle, num_workers=0), float32, no compile, the
network in PyTorch's default (contiguous) memory format, and a plain loop: forward,
cross-entropy, backward, optimizer step, the recipe's scheduler once per epoch.

Ours: `mu_runner.run.fit_supervised`, the function that trains every original and reference —
Lightning Trainer from the composed `trainer` group, `SupervisedTraining`, `StageData` /
`TensorLoader` (index batches of tensors already on the device, batched augmentation), the
network as `backbone` builds it (channels-last), its divergence guard, loss curve and per-epoch
checkpoint (as `get_original` runs it).

Both get the same network (built by `mu_runner.run.new_net` from the same config, same seed), the
same optimizer and scheduler (`cfg.train`), the same images (`data.pool`) and batch size.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]

# The CIFAR-shaped synthetic set: 32x32x3, 100 classes, CIFAR's augmentation (4-px shift, flip).
CIFAR_SHAPED = ["data=synthetic", "data.source.image_size=32", "data.source.channels=3",
                "data.source.num_classes=100", "data.source.n_test=100", "data.val_fraction=0",
                "data.augment.pad=4", "data.augment.flip=true"]


def compose_cfg(overrides: list[str], root: Path | str = ROOT) -> DictConfig:
    """The real config (conf/, shipped as mu_runner.conf) with `overrides`, as the command line
    would compose it; outputs under `root`."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="mu_runner.conf", version_base="1.3"):
        return compose("config", overrides=[f"paths.root_dir={root}", f"paths.output_dir={root}/outputs/bench/run",
                                            *overrides])


# --------------------------------------------------------------------------- the baseline


class PerSampleDataset(Dataset):
    """One image at a time, as typical training code reads it (`__getitem__` + default collate)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 augment: dict | None = None) -> None:
        self.images, self.labels = images.cpu(), labels.cpu()  # typical code keeps its data on the CPU
        self.indices = indices.cpu().tolist()
        augment = augment or {}
        steps = []
        if augment.get("pad"):
            steps.append(v2.RandomCrop(self.images.shape[-1], padding=int(augment["pad"])))
        if augment.get("flip"):
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        x = self.images[j].float().div(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])


def baseline_loader(cfg: DictConfig, data, indices: torch.Tensor | None = None, seed: int = 0) -> DataLoader:
    indices = data.pool if indices is None else indices
    train = data.source.train  # the CPU tensors as loaded (StageData may have moved data.images to the GPU)
    ds = PerSampleDataset(train.images, train.labels, indices, data.augment)
    return DataLoader(ds, batch_size=int(cfg.train.batch_size), shuffle=True, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_train(cfg: DictConfig, data, net: torch.nn.Module, indices: torch.Tensor, device: torch.device,
                epochs: int, channels_last: bool = False) -> float:
    """The baseline training of `net` (float32, contiguous unless `channels_last`); returns its
    wall-clock seconds."""
    start = time.perf_counter()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=layout).train()
    loader = baseline_loader(cfg, data, indices, seed=int(cfg.seed))
    opt = instantiate(cfg.train.optimizer)(net.parameters())
    sched = instantiate(cfg.train.scheduler)(opt) if cfg.train.get("scheduler") else None
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
    sync(device)
    return time.perf_counter() - start


def ours_train(cfg: DictConfig, data, net: torch.nn.Module, indices: torch.Tensor, checkpoint: bool = True) -> float:
    """The project's training (`fit_supervised`, with the per-epoch checkpoint of an original's
    training in a temporary directory); returns its wall-clock seconds (it ends with the weights
    copied to the CPU, so a GPU training has finished)."""
    from mu_runner.run import fit_supervised

    with tempfile.TemporaryDirectory(prefix="mu_bench_") as tmp:
        path = Path(tmp, "bench.partial.ckpt") if checkpoint else None  # a fresh path: never a resume
        start = time.perf_counter()
        fit_supervised(cfg, data, indices, net, phase="bench", checkpoint=path)
        return time.perf_counter() - start


def with_epochs(cfg: DictConfig, epochs: int) -> DictConfig:
    """`cfg` with train.epochs = `epochs` (the scheduler's T_max follows by interpolation)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.train.epochs = int(epochs)
    return out


def throughput(cfg: DictConfig, data, device: torch.device, repeats: int = 3, epochs: int = 1,
               warmup_batches: int = 2, variants: dict[str, Callable] | None = None,
               pool: torch.Tensor | None = None, steady: bool = False,
               log: Callable[[str], None] = print) -> dict:
    """Images/s of baseline and ours on `pool` (default: the whole training pool), `epochs` epochs
    per training, `repeats` trainings each, interleaved (baseline, ours, baseline, ...) so that a
    drift in the machine's load hits both alike; one short untimed training of each first
    (warm-up: kernel selection, allocator, compilation). Each timed training starts from a fresh
    network (same seed) and includes its own set-up (loader, optimizer, Trainer, the end-of-epoch
    checkpoint): the cost a user pays per training. Median of repeats.

    `steady` (needs epochs >= 2): each repeat also trains 1 epoch, and the steady-state rate is
    (epochs - 1) x images / (T(epochs) - T(1)) — the per-training set-up cancels — with that set-up
    as `overhead_seconds` (what dominates short trainings on a fast GPU).
    `variants`: name -> train(cfg, data, net, indices) -> seconds; default baseline and ours.
    """
    from mu_runner.run import new_net

    variants = variants or {"baseline": lambda c, d, n, i: plain_train(c, d, n, i, device, int(c.train.epochs)),
                            "ours": lambda c, d, n, i: ours_train(c, d, n, i)}
    if steady and epochs < 2:
        raise ValueError("steady-state rates need epochs >= 2")
    pool = data.pool if pool is None else pool
    bs = int(cfg.train.batch_size)
    one_cfg, run_cfg = with_epochs(cfg, 1), with_epochs(cfg, epochs)
    for train in variants.values():  # warm-up, untimed
        train(one_cfg, data, new_net(cfg, data), pool[: warmup_batches * bs])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    one_epoch: dict[str, list[float]] = {name: [] for name in variants}
    images = epochs * len(pool)
    for r in range(repeats):
        for name, train in variants.items():
            s = train(run_cfg, data, new_net(cfg, data), pool)
            seconds[name].append(s)
            line = f"  repeat {r + 1}/{repeats} {name:>13}: {s:7.2f} s, {images / s:9.1f} images/s"
            if steady:
                one_epoch[name].append(train(one_cfg, data, new_net(cfg, data), pool))
                line += f" (1 epoch: {one_epoch[name][-1]:.2f} s)"
            log(line)
    out = {"images_per_training": images, "epochs": epochs, "batch_size": bs,
           "batches_per_epoch": math.ceil(len(pool) / bs), "repeats": repeats, "seconds": seconds,
           "images_per_s": {name: images / statistics.median(s) for name, s in seconds.items()}}
    if steady:
        per_epoch = {name: statistics.median((a - b) / (epochs - 1)
                                             for a, b in zip(seconds[name], one_epoch[name], strict=True))
                     for name in variants}
        out["one_epoch_seconds"] = one_epoch
        out["steady_images_per_s"] = {name: len(pool) / t for name, t in per_epoch.items()}
        out["overhead_seconds"] = {name: statistics.median(one_epoch[name]) - t for name, t in per_epoch.items()}
    for key, ratio_key in (("images_per_s", "ratio"), ("steady_images_per_s", "steady_ratio")):
        ips = out.get(key, {})
        if "baseline" in ips:
            out[ratio_key] = {name: v / ips["baseline"] for name, v in ips.items() if name != "baseline"}
    return out


# --------------------------------------------------------------------------- trainings of a sweep


def count_trainings(methods: list[str], ks: list[int], overrides: list[str], root: Path | str = ROOT) -> dict:
    """How many originals and references a methods x k sweep trains: every job's config composed,
    and `mu_runner.run.get_original` / `get_reference` asked for their models from a cache that
    records the entry each one names (the runner's own keys) and hands back untrained weights
    instead of training. Distinct entries are the trainings; no training runs."""
    from mu_runner import run as R
    from mu_runner.cache import Cache

    class Recording(Cache):
        def __init__(self, root_dir: Path) -> None:
            super().__init__(root_dir)
            self.entries: dict[str, set[str]] = {"original": set(), "retrain": set()}
            self.state: dict = {}

        def get_or_create(self, kind, spec, build, check=None):
            self.entries.setdefault(kind, set()).add(str(self.path(kind, spec)))
            return dict(self.state), True

    jobs = []
    with tempfile.TemporaryDirectory(prefix="mu_bench_keys_") as tmp:
        cache = Recording(Path(tmp))
        loaded: dict = {}
        for method in methods:
            for k in ks:
                cfg = compose_cfg([*overrides, f"method={method}", f"forget.k={k}"], root)
                key = repr(cfg.data)
                if key not in loaded:
                    loaded[key] = R.load_data(cfg)
                data = loaded[key]
                split = R.make_split(cfg, data)
                cache.state = R.new_net(cfg, data).state_dict()
                R.get_original(cfg, data, cache, R._target_class(cfg.method))
                if cfg.reference == "retrain":
                    R.get_reference(cfg, data, split, cache)
                jobs.append({"method": method, "k": k, "forget_classes": list(split.classes or [])})
        originals, references = len(cache.entries["original"]), len(cache.entries["retrain"])
    return {"methods": list(methods), "ks": list(ks), "overrides": list(overrides), "jobs": len(jobs),
            "originals": originals, "references": references, "unlearning_runs": len(jobs),
            "line": (f"{len(methods)} methods × {len(ks)} values of k: {originals} original"
                     f"{'s' if originals != 1 else ''}, {references} reference{'s' if references != 1 else ''}, "
                     f"{len(jobs)} unlearning runs")}
