"""`tiny(*overrides)`: the real config, composed with every tiny option, paths in tmp_path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF = str(Path(__file__).resolve().parents[1] / "conf")
METHODS = sorted(p.stem for p in Path(CONF, "method").glob("*.yaml"))

TINY = [
    "data=digits",
    "backbone=test_resnet",
    "trainer=tiny",
    "logger=none",
    "callbacks=tiny",
    "method=finetune",        # the cheapest method; tests of other methods override it
    "train.epochs=2",
    "train.batch_size=64",
    "eval.feature_samples=100",
    "eval.embedding=none",        # t-SNE costs ~1 s a run; test_run turns it on where it checks embedding.png
    "eval.embedding_samples=100",
    "save_model=false",
]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# pytest -n N (pytest-xdist): the cores shared among the N workers, so that no worker's threads wait on another's
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Parameters and buffers bit-identical."""
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@contextmanager
def optimizer_steps():
    """The optimizer type of every step taken inside the block (a global pre-hook: it also sees
    optimizers whose subclass overrides `step`)."""
    import torch.optim.optimizer as optim_module

    steps: list[type] = []
    handle = optim_module.register_optimizer_step_pre_hook(lambda opt, args, kwargs: steps.append(type(opt)))
    try:
        yield steps
    finally:
        handle.remove()


def fit_recording_loaders(overrides: list[str], tmp: Path, before_fit=None):
    """Build a tiny stage from TINY + `overrides` and fit it; returns (stage, the index set of every
    loader the unlearning built) — the original's training (a cache miss) is not recorded.
    `before_fit(stage)` runs between the two."""
    from mu_runner.data.datamodule import InMemoryData
    from mu_runner.run import build

    loaders = []
    real_loader = InMemoryData.loader

    def spy_loader(self, indices, *args, **kwargs):
        loaders.append(indices.clone())
        return real_loader(self, indices, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(InMemoryData, "loader", spy_loader)
        stage = build(compose_config([*TINY, *overrides], tmp))
        loaders.clear()
        if before_fit is not None:
            before_fit(stage)
        stage.fit()
    return stage, loaders


def compose_config(overrides: list[str], tmp: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.root_dir={tmp}", f"paths.output_dir={tmp}/run", f"paths.cache_dir={tmp}/cache",
            *overrides])
    return cfg


@pytest.fixture
def tiny(tmp_path):
    def make(*overrides: str, tmp: Path | None = None):
        return compose_config([*TINY, *overrides], tmp or tmp_path)
    return make


def across_workers(tmp_path_factory, name: str) -> Path:
    """A folder every xdist worker of this pytest run shares (the cache's file lock makes parallel
    users of one cache safe: an entry is trained once); without xdist, one in this run's temp root."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/ above the workers' popen-gwK/ folders: this run's, no other's
    path = base / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for tests that only need *some* trained original (trains it once per run)."""
    return across_workers(tmp_path_factory, "shared_cache")
