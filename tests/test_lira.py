"""The per-example attack (eval.umia=lira) against known answers: a planted set a model memorised
scores near 1, a model that never saw it near 0.5; the shadow design and the score itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mu_runner.cache import Cache
from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import ForgetSplit
from mu_runner.data.sources import ImageSet, Source
from mu_runner.evaluation.lira import LiRA, lira_scores, logit_confidence, membership, summarise

K = 4


def test_membership_puts_every_example_in_exactly_half_the_shadows():
    m = membership(8, 500, seed=3)
    assert m.shape == (8, 500) and (m.sum(0) == 4).all()
    assert torch.equal(m, membership(8, 500, seed=3)) and not torch.equal(m, membership(8, 500, seed=4))


@pytest.mark.parametrize("fraction, ins", [(0.75, 12), (0.99, 15), (0.01, 1)])
def test_membership_follows_the_pool_share_and_keeps_in_and_out_shadows(fraction, ins):
    assert (membership(16, 300, seed=0, fraction=fraction).sum(0) == ins).all()


def test_the_universe_is_the_pool_then_the_test_images():
    data = InMemoryData(_noise_source(), val_fraction=0.25, split_seed=0, augment={})
    u = LiRA.universe(data)
    n = len(data.pool)
    assert torch.equal(u.images[:n], data.images[data.pool]) and torch.equal(u.images[n:], data.test_images)
    assert torch.equal(u.labels[n:], data.test_labels) and len(u.labels) == n + len(data.test_labels)


def test_logit_confidence_is_the_true_class_logit_against_the_others():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([[2.0, 0.0, 0.0]]).expand(len(x), 3) + self.w

    phi = logit_confidence(Fixed(), torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))
    others = torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert phi.tolist() == pytest.approx([2.0 - float(others), 0.0 - float(torch.log(torch.exp(torch.tensor(2.0)) + 1))])


def test_lira_scores_separate_in_from_out_and_a_never_seen_model_is_at_chance():
    gen = torch.Generator().manual_seed(0)
    S, m = 16, 400
    inside = membership(S, m, seed=0)
    shadow_phi = torch.where(inside, 3.0, -1.0) + torch.randn(S, m, generator=gen)
    members = 3.0 + torch.randn(m // 2, generator=gen)  # a target that trained on the first half
    never = -1.0 + torch.randn(m // 2, generator=gen)
    scores = lira_scores(torch.cat([members, never]), shadow_phi, inside)
    assert summarise(scores[: m // 2], scores[m // 2:])["auc"] > 0.95
    unseen = -1.0 + torch.randn(m, generator=gen)  # a target that saw neither half
    s = summarise(*lira_scores(unseen, shadow_phi, inside).split(m // 2))
    assert abs(s["auc"] - 0.5) < 3 * s["auc_se"]


# --------------------------------------------------------------------------- a planted set, end to end


def _noise_source(n_train: int = 120, n_test: int = 60) -> Source:
    """Pure noise with random labels: a model can only memorise, so membership is all it shows."""
    gen = torch.Generator().manual_seed(0)

    def images(n: int) -> ImageSet:
        return ImageSet(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=gen),
                        torch.randint(0, K, (n,), generator=gen))
    return Source(images(n_train), images(n_test), [str(i) for i in range(K)])


class MLP(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, K))

    def forward(self, x):
        return self.body((x - 0.5) * 4)


def memorise(images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, seed: int) -> MLP:
    net = MLP(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = images[ids].float() / 255, labels[ids]
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = InMemoryData(_noise_source(), val_fraction=0.0, split_seed=0, augment={})
    forget, retain = data.pool[:40], data.pool[40:]
    split = ForgetSplit(forget, retain, None)
    cache = Cache(tmp_path_factory.mktemp("cache"))
    calls = []

    def fit(s, ids, universe):
        calls.append(s)
        return memorise(universe.images, universe.labels, ids, seed=100 + s)

    lira, hits = LiRA.build(data, split, 16, 0, cache, {"recipe": "mlp"}, fit)
    original = memorise(data.images, data.labels, data.pool, seed=1)  # memorised the planted set
    retrained = memorise(data.images, data.labels, retain, seed=2)  # never saw it
    summary, per_example = lira.attack({"original": original, "retrain": retrained})
    return data, split, cache, fit, calls, hits, summary, per_example


def test_planted_set_a_model_memorised_scores_near_one(planted):
    *_, summary, _ = planted
    assert summary["original"]["auc"] > 0.9
    assert summary["original"]["tpr_at_5pct_fpr"] > 0.3


def test_planted_set_a_model_that_never_saw_it_is_at_chance(planted):
    *_, summary, _ = planted
    s = summary["retrain"]
    assert abs(s["auc"] - 0.5) <= 3 * s["auc_se"]  # chance, within the sampling error reported
    assert s["n_forget"] == 40 and s["n_unseen"] == 60


def test_shadows_are_cached_and_a_second_build_trains_none(planted):
    data, split, cache, fit, calls, hits, _, _ = planted
    assert calls == list(range(16)) and hits == [False] * 16
    _, again = LiRA.build(data, split, 16, 0, cache, {"recipe": "mlp"}, fit)
    assert again == [True] * 16 and calls == list(range(16))
    assert len(list(cache.root.glob("shadow/*.safetensors"))) == 16


def test_per_example_scores_name_the_examples(planted):
    data, split, *_, per_example = planted
    assert per_example["forget_ids"] == split.forget.tolist()
    assert per_example["unseen_test_ids"] == list(range(len(data.test_labels)))
    assert len(per_example["original"]["forget"]) == 40 and len(per_example["original"]["unseen"]) == 60
