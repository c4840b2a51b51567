"""The bench (bench/, `make bench`) compares like with like: cheap checks, no timing asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not part of the package

from bench.common import (
    CIFAR_SHAPED,
    baseline_loader,
    compose_cfg,
    count_trainings,
    ours_train,
    plain_train,
    throughput,
)
from mu_runner.run import load_data


def _counting(train, seen: list[int]):
    """`train` with every training forward pass's batch size appended to `seen`."""
    def run(cfg, data, net, indices):
        hook = net.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])) if m.training else None)
        try:
            return train(cfg, data, net, indices)
        finally:
            hook.remove()
    return run


def test_baseline_and_ours_train_on_the_same_batches(tmp_path):
    # the bench's own harness, both paths really trained: the same steps of the same batch sizes
    cfg = compose_cfg(["data=digits", "train=fast", "backbone=test_resnet", "trainer=tiny", "logger=none"], tmp_path)
    data = load_data(cfg)
    seen: dict[str, list[int]] = {"baseline": [], "ours": []}
    variants = {"baseline": _counting(lambda c, d, n, i: plain_train(c, d, n, i, torch.device("cpu"),
                                                                     int(c.train.epochs)), seen["baseline"]),
                "ours": _counting(ours_train, seen["ours"])}
    r = throughput(cfg, data, torch.device("cpu"), repeats=1, epochs=2, warmup_batches=1, variants=variants,
                   pool=data.pool[:100], log=lambda _line: None)
    # warm-up: 1 batch of 64; then 2 epochs of 100 images in batches of 64 + 36
    assert seen["baseline"] == seen["ours"] == [64, 64, 36, 64, 36]
    assert r["images_per_training"] == 200 and r["batches_per_epoch"] == 2
    assert r["ratio"]["ours"] == r["images_per_s"]["ours"] / r["images_per_s"]["baseline"]


def test_the_baseline_loader_serves_each_pool_image_once_an_epoch(tmp_path):
    for overrides in (["data=digits", "train=fast"],  # augmented: 1-px shift
                      [*CIFAR_SHAPED, "data.source.n_train=200", "train=sgd"]):  # 4-px shift and flip
        cfg = compose_cfg(overrides, tmp_path)
        data = load_data(cfg)
        loader = baseline_loader(cfg, data)
        xs, ys = zip(*loader, strict=True)
        assert len(xs) == -(-len(data.pool) // int(cfg.train.batch_size))
        assert torch.equal(torch.cat(ys).sort().values, data.labels[data.pool].sort().values)
        x = torch.cat(xs)
        assert x.dtype == torch.float32 and x.shape[1:] == data.images.shape[1:]
        assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_trainings_of_a_2x2_sweep_are_1_original_and_2_references(tmp_path):
    r = count_trainings(["finetune", "salun"], [1, 2], ["data=digits", "backbone=test_resnet"], tmp_path)
    assert (r["originals"], r["references"], r["unlearning_runs"]) == (1, 2, 4)
    assert r["line"] == "2 methods × 2 values of k: 1 original, 2 references, 4 unlearning runs"


def test_trainings_count_follows_the_runners_keys(tmp_path):
    # mnemonic trains its own original (OriginalRecipe): the runner's keys say 2 originals, not 1
    r = count_trainings(["finetune", "mnemonic"], [1], ["data=digits", "backbone=test_resnet"], tmp_path)
    assert (r["originals"], r["references"], r["unlearning_runs"]) == (2, 1, 2)
