"""SalUn (docs/methods.md, salun): masked-out weights and optimizer state stay put; mask and labels right."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, compose_config

from mu_runner.errors import ConfigError
from mu_runner.methods.functional import forget_gradients, threshold_ties, top_fraction_mask
from mu_runner.run import build, make_method

ADAM = ["method.optimizer._target_=torch.optim.Adam", "~method.optimizer.momentum", "method.optimizer.lr=1e-3",
        "method.optimizer.weight_decay=5e-4"]

FEW_STEPS = ["+trainer.limit_train_batches=2"]  # mask and labels are made before the first step


def fit_salun(tmp, cache, *overrides, record: bool = False):
    """A 1-epoch SalUn run on tiny digits; with `record`, the (split, y) of every training batch."""
    cfg = compose_config([*TINY, "method=salun", "method.epochs=1", "forget.k=2", "reference=none",
                          f"paths.cache_dir={cache}", *overrides], tmp)
    stage = build(cfg)
    seen = []
    if record:
        loss = stage.module.unlearning_loss
        stage.module.unlearning_loss = lambda b: (seen.extend((k, y.clone()) for k, (_, y) in b.items()), loss(b))[1]
    stage.fit()
    return stage, seen


@pytest.fixture(scope="module")
def salun(shared_cache, tmp_path_factory):
    """Default SalUn (SGD, momentum 0.9, weight decay 5e-4, sequential) forgetting 2 classes."""
    return fit_salun(tmp_path_factory.mktemp("salun"), shared_cache, record=True)


def assert_only_masked_weights_moved(stage) -> None:
    module, optimizer = stage.module, stage.trainer.optimizers[0]
    original = dict(stage.original.named_parameters())
    moved = state_inside = 0
    for n, p in module.net.named_parameters():
        m = module.mask[n]
        assert torch.equal(p[~m], original[n][~m]), n  # bit-identical despite decay and momentum
        moved += int((p[m] != original[n][m]).sum())
        for key, value in optimizer.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert (value[~m] == 0).all(), (n, key)
                state_inside += int((value[m] != 0).sum())
    assert moved > 0 and state_inside > 0  # a method that did nothing would pass the checks above


def test_salun_with_sgd_momentum_and_decay_keeps_weights_outside_the_mask(salun):
    stage, _ = salun
    group = stage.trainer.optimizers[0].param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] > 0 and stage.trainer.global_step > 5
    assert_only_masked_weights_moved(stage)


def test_salun_with_adam_in_mixed_schedule_keeps_weights_outside_the_mask(shared_cache, tmp_path):
    stage, _ = fit_salun(tmp_path, shared_cache, *ADAM, "method.schedule=mixed", "+trainer.limit_train_batches=6")
    assert isinstance(stage.trainer.optimizers[0], torch.optim.Adam) and stage.trainer.global_step > 5
    assert_only_masked_weights_moved(stage)


def test_salun_mask_is_the_top_fraction_of_positive_forget_saliency_over_all_weights(shared_cache, tmp_path):
    stage, _ = fit_salun(tmp_path, shared_cache, "method.mask_ratio=0.3", *FEW_STEPS)
    mask = stage.module.mask
    total, kept = sum(m.numel() for m in mask.values()), sum(int(m.sum()) for m in mask.values())
    grads = forget_gradients(stage.original, stage.datamodule.batches("forget"))  # θ_o, recomputed
    positive = sum(int((g.abs() > 0).sum()) for g in grads.values())
    assert kept == min(round(0.3 * total), positive) and kept > 0
    assert stage.module.choices()["mask_fraction"] == kept / total
    inside = torch.cat([grads[n].abs()[m] for n, m in mask.items()])
    outside = torch.cat([grads[n].abs()[~m] for n, m in mask.items()])
    assert inside.min() > 0 and inside.min() >= outside.max()
    fractions = [m.float().mean().item() for m in mask.values()]
    assert max(fractions) - min(fractions) > 0.5  # ranked jointly, not top-30 % of every tensor


# --------------------------------------------------------------------------- ties in the mask

TIED = {"a": torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 0.0])}


def _ids(mask: dict[str, torch.Tensor]) -> list[int]:
    return torch.cat([m.flatten() for m in mask.values()]).nonzero().flatten().tolist()


def test_top_fraction_mask_breaks_ties_by_flat_index_unless_given_a_generator():
    # 12 scores, k = 6: 3 and 2, then 4 of the five 1s (flat 1, 2, 3, 6, 7)
    assert _ids(top_fraction_mask(TIED, 0.5)) == [0, 1, 2, 3, 6, 10]  # weight_reset's rule, unchanged
    seeded = _ids(top_fraction_mask(TIED, 0.5, generator=torch.Generator().manual_seed(0)))
    assert len(seeded) == 6 and {0, 10} <= set(seeded) and len(set(seeded) & {1, 2, 3, 6, 7}) == 4


def test_seeded_tie_break_gives_the_exact_count_same_seed_same_mask_other_seed_other_mask():
    scores = {"w": torch.cat([torch.full((900,), 0.5), torch.zeros(1000), torch.linspace(1, 2, 100)])}
    masks = [top_fraction_mask(scores, 0.3, positive_only=True, generator=torch.Generator().manual_seed(s))["w"]
             for s in (0, 0, 1)]
    for m in masks:  # 600 = the 100 distinct values above the tie + 500 of the 900 tied at 0.5
        assert int(m.sum()) == 600 and m[1900:].all() and not m[900:1900].any() and int(m[:900].sum()) == 500
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert threshold_ties(scores, 0.3) == pytest.approx(900 / 2000)


def test_zeros_never_enter_and_the_mask_shrinks_to_the_positive_scores():
    scores = {"a": torch.tensor([0.0, 0.0, 0.5, 0.0]), "b": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    gen = torch.Generator().manual_seed(0)
    mask = top_fraction_mask(scores, 0.5, positive_only=True, generator=gen)  # asks 4, only 2 are positive
    assert _ids(mask) == [2, 5] and mask["b"].shape == (2, 2)
    assert threshold_ties(scores, 0.5) == pytest.approx(6 / 8)  # the 4th largest is 0, as are six of eight
    assert len(_ids(top_fraction_mask(scores, 0.5))) == 4  # without positive_only: two zeros by index


def test_without_ties_every_variant_is_the_plain_top_k():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(50, generator=gen), "b": torch.rand(7, 9, generator=gen)}
    flat = torch.cat([s.flatten() for s in scores.values()])
    top = sorted(torch.topk(flat, round(0.4 * flat.numel())).indices.tolist())
    assert _ids(top_fraction_mask(scores, 0.4)) == top
    assert _ids(top_fraction_mask(scores, 0.4, positive_only=True, generator=torch.Generator().manual_seed(9))) == top
    assert threshold_ties(scores, 0.4) == pytest.approx(1 / flat.numel())  # the threshold value itself


def test_salun_records_the_masked_fraction_and_warns_when_most_saliencies_tie(tiny, caplog):
    module = make_method(tiny("method=salun", "method.mask_ratio=0.5", "seed=4"), net=None)
    saliency = {"conv": torch.cat([torch.zeros(67), torch.linspace(0.1, 1, 33)]).view(10, 10),
                "bias": torch.zeros(0)}
    with caplog.at_level("WARNING", logger="mu_runner"):
        mask = module.saliency_mask(saliency)
    assert int(mask["conv"].sum()) == 33 and mask["conv"].flatten()[67:].all()
    assert module.choices() == {"mask_fraction": pytest.approx(0.33), "mask_ties": pytest.approx(0.67)}
    assert any("67 % of the saliencies are tied" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="mu_runner"):
        module.saliency_mask({"conv": torch.linspace(0.1, 1, 100)})  # no ties: exactly half, no warning
    assert module.choices() == {"mask_fraction": 0.5, "mask_ties": 0.01} and not caplog.records


def test_salun_trains_on_relabelled_forget_targets_outside_the_forget_classes(salun):
    stage, seen = salun
    forget_ids = stage.split.forget
    true = stage.data.labels.cpu()[forget_ids]
    plan = stage.module.data_plan()
    new = plan.spec("forget").targets()
    assert len(new) == len(forget_ids) and plan.spec("retain").targets is None
    assert (new != true).all() and not torch.isin(new, torch.tensor(stage.split.classes)).any()
    served = torch.cat([y for split, y in seen if split == "forget"]).cpu()
    assert sorted(served.tolist()) == sorted(new.tolist())  # the loader serves exactly these
    order = [split for split, _ in seen]  # sequential: a pass over D_f, then one over D_r
    assert order == sorted(order) and order[0] == "forget" and order[-1] == "retain"


def test_salun_same_seed_same_mask_and_labels(salun, shared_cache, tmp_path):
    first, _ = salun
    again, _ = fit_salun(tmp_path / "a", shared_cache, *FEW_STEPS)
    other, _ = fit_salun(tmp_path / "b", shared_cache, "method.seed=1", *FEW_STEPS)
    assert all(torch.equal(first.module.mask[n], again.module.mask[n]) for n in first.module.mask)
    assert torch.equal(first.module.forget_targets, again.module.forget_targets)
    assert not torch.equal(first.module.forget_targets, other.module.forget_targets)


def test_salun_mask_pass_leaves_the_original_weights_untouched(salun):
    stage, _ = salun
    original = dict(stage.original.named_parameters())
    assert all(torch.equal(v, original[n]) for n, v in stage.module.start.items())


@pytest.mark.parametrize("key, value", [("mask_ratio", "0"), ("mask_ratio", "1.5"), ("schedule", "paired"),
                                        ("retain_weight", "-1")])
def test_salun_rejects_impossible_hyperparameters(tiny, key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}="):
        build(tiny("method=salun", f"method.{key}={value}"))
