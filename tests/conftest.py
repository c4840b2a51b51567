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
torch.set_num_threads(min(2, os.cpu_count() or 1))


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


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for tests that only need *some* trained original (trains it once per session)."""
    return tmp_path_factory.mktemp("cache")
