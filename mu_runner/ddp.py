"""Several processes (`trainer=ddp`) for the unlearning stage; everything cached is built before.

The design (docs/design.md, Running at scale):

- Cache entries (original, reference, shadows, a method's preparation) are trained by a
  single-device Trainer (`single_device`) in the process the user started, before any process
  group exists. No rank ever waits for another while holding the cache's file lock, and a cache
  entry is the same model whatever the number of GPUs (its key does not name them).
- The unlearning stage runs on `world_size` processes. When Lightning would start the other local
  ranks itself (by running the command line again, which re-runs a whole Hydra multirun or a
  launcher's worker), rank 0 starts them instead (`local_ranks`): `python -m mu_runner.ddp` with
  the resolved configuration in the environment (`MU_RUNNER_DDP_CONFIG`) and LOCAL_RANK,
  MASTER_ADDR/PORT set, as torchrun would. They build the same stage from the cache (reads only),
  join the unlearning stage, and exit. Processes started by a cluster (SLURM's srun, torchrun)
  run the command as usual.
- Only global rank 0 evaluates, prints and writes the run directory. Batch sizes are global
  (data/loaders.py), so with `sync_batchnorm` the numbers are a single process's up to float
  reduction order.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.layer_sync import LayerSync
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from mu_runner.errors import ConfigError, MuRunnerError

log = logging.getLogger("mu_runner")

CONFIG_ENV = "MU_RUNNER_DDP_CONFIG"  # the resolved configuration, for the ranks rank 0 starts
_SINGLE = (None, "auto", "single_device")


@dataclass(frozen=True)
class Launch:
    """How the unlearning stage runs: `world_size` processes; `spawn`: this process starts the
    other local ranks (`local` processes on this node) itself."""

    world_size: int = 1
    local: int = 1
    spawn: bool = False
    cpu_sync_batchnorm: bool = False  # sync_batchnorm on CPU processes: GlobalBatchNorm (torch's is GPU-only)


def _devices(trainer_cfg: DictConfig):
    return trainer_cfg.get("devices", "auto")


def multi_process(trainer_cfg: DictConfig) -> bool:
    """Whether the Trainer settings may ask for more than one process (cheap, no Trainer built)."""
    strategy, devices = trainer_cfg.get("strategy", "auto"), _devices(trainer_cfg)
    if not isinstance(strategy, str) and strategy is not None:
        return True
    if strategy not in _SINGLE or int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        return True
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices) > 1
    if isinstance(devices, str):
        if devices == "auto":
            return str(trainer_cfg.get("accelerator", "auto")) != "cpu"
        return "," in devices.strip(",") or devices.strip() == "-1" or (devices.isdigit() and int(devices) > 1)
    return devices is not None and (int(devices) > 1 or int(devices) == -1)


def local_rank() -> int:
    """This process's rank on its node as a launcher set it (0 when nothing did)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def global_rank() -> int:
    """This process's global rank as a launcher set it (0 when nothing did)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def single_device(trainer_cfg: DictConfig) -> dict:
    """Trainer overrides for the trainings that make cache entries: one device, no process group.

    The device is this process's own (its local rank's) when several are listed or visible.
    """
    if not multi_process(trainer_cfg):
        return {}
    devices, accelerator = _devices(trainer_cfg), str(trainer_cfg.get("accelerator", "auto"))
    rank = local_rank()
    if isinstance(devices, (list, tuple, ListConfig)) and len(devices) > 0:
        pick = [int(devices[rank % len(devices)])]
    elif isinstance(devices, str) and "," in devices:
        ids = [int(d) for d in devices.split(",") if d.strip()]
        pick = [ids[rank % len(ids)]]
    elif accelerator == "cpu":
        pick = 1
    else:
        count = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
        pick = [rank % count] if count > 1 else 1
    return {"devices": pick, "strategy": "auto", "num_nodes": 1, "sync_batchnorm": False}


def plan(trainer_cfg: DictConfig) -> Launch:
    """How many processes the unlearning stage gets, and whether this process starts them.

    Lightning's own answer (a Trainer built and dropped): its strategy and cluster environment.
    Multi-process strategies other than `ddp` (popen) are refused in one line.
    """
    if not multi_process(trainer_cfg):
        return Launch()
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy
    probe = instantiate(trainer_cfg, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[])
    strategy = probe.strategy
    name = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, DDPStrategy):
        if int(getattr(probe, "world_size", 1)) > 1:
            raise ConfigError(f"trainer.strategy={name}: several processes run with strategy=ddp only")
        return Launch()
    if getattr(strategy, "_start_method", "popen") != "popen":
        raise ConfigError(f"trainer.strategy={name}: spawned or forked processes cannot share the run's state; "
                          "use trainer.strategy=ddp")
    local, nodes = int(strategy.num_processes), int(strategy.num_nodes)
    external = bool(strategy.cluster_environment.creates_processes_externally)
    cpu = strategy.root_device.type == "cpu" and bool(trainer_cfg.get("sync_batchnorm", False))
    return Launch(world_size=local * nodes, local=local, spawn=local > 1 and not external,
                  cpu_sync_batchnorm=cpu and local * nodes > 1)


class SpawnedRanks(LightningEnvironment):
    """Rank 0's cluster environment when mu_runner starts the other local ranks: Lightning must not
    run the command line again."""

    @property
    def creates_processes_externally(self) -> bool:
        return True

    def local_rank(self) -> int:
        return 0


def plugins(launch: Launch) -> dict:
    """Trainer keyword arguments for the unlearning stage's Trainer."""
    kwargs: dict = {"plugins": [SpawnedRanks()]} if launch.spawn else {}
    if launch.cpu_sync_batchnorm:  # torch's SyncBatchNorm refuses CPU modules: the same statistics by gloo
        kwargs = {"plugins": [*kwargs.get("plugins", []), GlobalBatchNormSync()], "sync_batchnorm": False}
    return kwargs


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are the global batch's, summed over the DDP processes by a
    differentiable all-reduce (any backend, CPU included): what torch's SyncBatchNorm computes on GPUs.
    The same parameters and buffers as the layer it replaces; `original` is that layer's class."""

    original: type = nn.BatchNorm2d

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        # two passes, like torch's kernels (E[x²] - E[x]² cancels badly when a channel is nearly constant);
        # the all-reduce's backward sums the gradients of every rank's loss
        total = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() / c)]))
        n = total[-1]
        mean = total[:c] / n
        var = _AllReduceSum.apply(((xf - mean.view(shape)) ** 2).sum(dims)) / n
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=f)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient is summed over them too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _swap(module: nn.Module, convert) -> nn.Module:
    out = convert(module)
    for name, child in module.named_children():
        out.add_module(name, _swap(child, convert))
    return out


def _to_global(m: nn.Module) -> nn.Module:
    if type(m) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):  # subclasses (timm's BatchNormAct) stay
        return m
    g = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    g.original = type(m)
    g.weight, g.bias = m.weight, m.bias
    g.running_mean, g.running_var, g.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
    return g


def _from_global(m: nn.Module) -> nn.Module:
    if not isinstance(m, GlobalBatchNorm):
        return m
    b = m.original(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    b.weight, b.bias = m.weight, m.bias
    b.running_mean, b.running_var, b.num_batches_tracked = m.running_mean, m.running_var, m.num_batches_tracked
    b.train(m.training)
    return b


class GlobalBatchNormSync(LayerSync):
    """Lightning's `sync_batchnorm` for CPU processes: BatchNorm layers become GlobalBatchNorm for the
    stage and are given back as they were after it (same parameter and buffer objects)."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap(model, _to_global)

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap(model, _from_global)


class DdpSteps(L.Callback):
    """What every rank must decide alike under DDP, decided once for all (the last callback):

    - a stop decided on one rank (a rule that reads its own share of a batch, a user's callback)
      stops every rank at the same step; without it the others would wait for it for ever;
    - a step the method skips (its loss None; Lightning refuses a None loss under DDP, so the rank
      returned a zero loss, `UnlearningModule.training_step`) moves no weight on any rank.
    """

    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        trainer.should_stop = bool(trainer.strategy.reduce_boolean_decision(bool(trainer.should_stop), all=False))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        skip = bool(getattr(pl_module, "ddp_skip", False))
        pl_module.ddp_skip = False
        if trainer.strategy.reduce_boolean_decision(skip, all=False):
            for p in pl_module.parameters():
                p.grad = None  # the optimizer leaves a parameter without a gradient alone

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(trainer)


def callbacks(launch: Launch) -> list:
    return [DdpSteps()] if launch.world_size > 1 else []


def is_main(trainer: L.Trainer | None = None) -> bool:
    """Global rank 0: the process that evaluates and writes the run directory."""
    rank = trainer.global_rank if trainer is not None else global_rank()
    return int(rank) == 0


# --------------------------------------------------------------------------- rank 0 starts the others


def _start(cfg: DictConfig, launch: Launch, address: str, port: int, node: int) -> list[subprocess.Popen]:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    package_root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    procs = []
    for rank in range(1, launch.local):
        env = {**os.environ, CONFIG_ENV: text, "LOCAL_RANK": str(rank), "NODE_RANK": str(node),
               "WORLD_SIZE": str(launch.world_size), "MASTER_ADDR": address, "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join(p for p in (path, package_root) if p)}  # mu_runner importable
        env.pop("RANK", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "mu_runner.ddp"], env=env, cwd=os.getcwd()))
    return procs


class _Watch(threading.Thread):
    """Rank 0's watch over the ranks it started: one that fails ends the stage (rank 0 would wait
    for it in the next collective until the process group's timeout)."""

    def __init__(self, procs: list[subprocess.Popen], grace: float = 30.0) -> None:
        super().__init__(daemon=True, name="mu_runner-ddp-watch")
        self.procs, self.grace, self.done = procs, grace, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            failed = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
            if not failed:
                continue
            rank, code = failed[0]
            print(f"mu_runner: error: DDP rank {rank} ended with exit code {code} during the unlearning stage "
                  "(its error is above); stopping the other ranks", file=sys.stderr, flush=True)
            _kill(self.procs)
            _thread.interrupt_main()  # rank 0 leaves the stage at its next Python instruction ...
            if not self.done.wait(self.grace):  # ... unless a collective holds it: then it ends here
                os._exit(1)
            return

    def stop(self) -> None:
        self.done.set()


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


@contextlib.contextmanager
def local_ranks(cfg: DictConfig, launch: Launch, trainer: L.Trainer) -> Iterator[None]:
    """Around rank 0's `trainer.fit`: start local ranks 1.. first, wait for them after, end the
    process group (the next job of a multirun makes its own), and leave the environment as found."""
    if not launch.spawn:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env = trainer.strategy.cluster_environment
    procs = _start(cfg, launch, env.main_address, env.main_port, env.node_rank())
    watch = _Watch(procs)
    watch.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        watch.stop()
        if finished:
            deadline = time.monotonic() + 120
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
        _kill(procs)  # a rank still running after rank 0 failed waits in a collective for ever
        end_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def end_process_group() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- a rank started by rank 0


def _watch_parent() -> None:
    """A rank whose rank 0 is gone (killed) ends too, instead of waiting in a collective."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="mu_runner-ddp-parent").start()


def rank_main() -> int:
    """`python -m mu_runner.ddp`: local rank > 0 of the unlearning stage, started by rank 0.

    It builds the stage from the configuration rank 0 resolved (every cache entry is there: it
    only reads) and fits it; rank 0 evaluates and writes. Its log shows warnings and errors only.
    """
    text = os.environ.pop(CONFIG_ENV, None)
    rank = local_rank()
    if text is None or rank == 0:
        print("mu_runner.ddp is started by mu_runner's rank 0 (trainer=ddp), not by hand", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr,  # rank 0 has said every warning
                        format=f"[rank {rank}][%(name)s][%(levelname)s] %(message)s")
    from mu_runner.utils.console import quiet_libraries
    from mu_runner.utils.redact import install_log_filter, redact
    warnings.filterwarnings("ignore")  # rank 0 has shown them
    quiet_libraries()
    install_log_filter()
    _watch_parent()
    from mu_runner.run import build
    try:
        stage = build(OmegaConf.create(text))
        stage.fit()
    except MuRunnerError as err:
        for line in str(err).splitlines():
            print(f"mu_runner: error: rank {rank}: {redact(line)}", file=sys.stderr)
        return 2
    finally:
        end_process_group()
    return 0


if __name__ == "__main__":
    from mu_runner.utils.fastexit import exit_now
    exit_now(rank_main())  # rank 0 waits for this process to end
