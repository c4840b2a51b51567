"""TensorLoader / PairedLoader batching and the batched shift-and-flip augmentation."""

from __future__ import annotations

import pytest
import torch

from mu_runner.data.loaders import PairedLoader, TensorLoader, shift_flip

N = 50


def _data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose pixel [0, 0, 0] is the sample id (so batches can be traced back)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 2, 3, 3), dtype=torch.uint8, generator=gen)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return images, labels


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def _epoch(loader) -> list[int]:
    return [i for x, _ in loader for i in _ids(x)]


INDICES = torch.tensor([17, 3, 44, 0, 29, 8, 31, 12, 49, 5, 26, 38, 1])


# --------------------------------------------------------------------------- TensorLoader


def test_unshuffled_loader_yields_indices_once_in_order_with_scaled_images_and_labels():
    images, labels = _data()
    loader = TensorLoader(images, labels, INDICES, batch_size=4)
    xs, ys = zip(*loader, strict=False)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32
    assert torch.equal(x, images[INDICES].float() / 255)
    assert torch.equal(y, labels[INDICES])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_unshuffled_loader_repeats_the_same_order_every_epoch():
    images, labels = _data()
    loader = TensorLoader(images, labels, INDICES, batch_size=5)
    assert _epoch(loader) == _epoch(loader) == INDICES.tolist()


def test_shuffled_epoch_is_a_permutation_of_the_indices():
    images, labels = _data()
    loader = TensorLoader(images, labels, INDICES, batch_size=4, shuffle=True, seed=3)
    for _ in range(3):
        order = _epoch(loader)
        assert sorted(order) == sorted(INDICES.tolist())


def test_shuffled_batches_keep_images_and_labels_aligned():
    images, labels = _data()
    loader = TensorLoader(images, labels, INDICES, batch_size=4, shuffle=True, seed=3)
    for x, y in loader:
        assert torch.equal(y, labels[torch.tensor(_ids(x))])


def test_same_seed_gives_same_order_and_successive_epochs_differ():
    images, labels = _data()
    a = TensorLoader(images, labels, torch.arange(N), batch_size=8, shuffle=True, seed=5)
    b = TensorLoader(images, labels, torch.arange(N), batch_size=8, shuffle=True, seed=5)
    first_a, first_b = _epoch(a), _epoch(b)
    assert first_a == first_b
    assert first_a != list(range(N))  # it really shuffles
    second_a = _epoch(a)
    assert second_a != first_a
    assert second_a == _epoch(b)  # epoch 2 is reproducible as well


def test_different_seeds_give_different_orders():
    images, labels = _data()
    orders = {tuple(_epoch(TensorLoader(images, labels, torch.arange(N), 8, shuffle=True, seed=s)))
              for s in range(3)}
    assert len(orders) == 3


def test_targets_replace_labels_aligned_with_indices():
    images, labels = _data()
    targets = torch.arange(100, 100 + len(INDICES))  # target j belongs to INDICES[j]
    position = {int(i): j for j, i in enumerate(INDICES.tolist())}
    for shuffle in (False, True):
        loader = TensorLoader(images, labels, INDICES, batch_size=4, shuffle=shuffle, seed=1,
                              targets=targets)
        for x, y in loader:
            assert y.tolist() == [100 + position[i] for i in _ids(x)]


@pytest.mark.parametrize("n, bs, drop_last, expected", [
    (13, 4, False, 4), (13, 4, True, 3), (12, 4, False, 3), (12, 4, True, 3), (3, 4, True, 0),
    (3, 4, False, 1)])
def test_len_equals_number_of_batches(n, bs, drop_last, expected):
    images, labels = _data()
    loader = TensorLoader(images, labels, INDICES[:n], batch_size=bs, shuffle=True, drop_last=drop_last)
    batches = list(loader)
    assert len(loader) == len(batches) == expected
    if drop_last:
        assert all(len(y) == bs for _, y in batches)
    else:
        assert sum(len(y) for _, y in batches) == n


# --------------------------------------------------------------------------- DDP sharding


def _ranks(indices: torch.Tensor, world_size: int, batch_size: int = 4, seed: int = 9):
    images, labels = _data()
    loaders = []
    for rank in range(world_size):
        loader = TensorLoader(images, labels, indices, batch_size, shuffle=True, seed=seed)
        loader.rank, loader.world_size = rank, world_size
        loaders.append(loader)
    return loaders


def test_ddp_ranks_cover_the_epoch_exactly_once_and_are_disjoint():
    indices = torch.arange(40)
    shards = [_epoch(loader) for loader in _ranks(indices, 2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(40))
    # the union is this seed's single-process shuffled epoch, split by alternating position
    single = _epoch(TensorLoader(*_data(), indices, batch_size=4, shuffle=True, seed=9))
    assert shards[0] == single[0::2] and shards[1] == single[1::2]


def test_ddp_ranks_agree_on_the_number_of_batches():
    loaders = _ranks(torch.arange(41), 2)
    assert len(loaders[0]) == len(loaders[1])
    assert [len(list(lo)) for lo in loaders] == [len(loaders[0])] * 2


def test_ddp_uneven_split_yields_no_empty_batch():
    for loader in _ranks(torch.arange(5), 2, batch_size=2):
        assert all(len(y) > 0 for _, y in loader)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_step_is_the_single_process_batch_augmented_alike(world_size):
    """Batch sizes are global: the ranks' shares of step i, interleaved, are one process's batch i,
    with the same shifts and flips (so DDP changes no number but float summation order)."""
    images, labels = _data()
    augment = {"pad": 1, "flip": True}

    def loader(rank: int, ws: int) -> TensorLoader:
        lo = TensorLoader(images, labels, torch.arange(48), 8, shuffle=True, seed=4, augment=augment)
        lo.rank, lo.world_size = rank, ws
        lo.set_epoch(3)
        return lo

    single = list(loader(0, 1))
    shares = [list(loader(r, world_size)) for r in range(world_size)]
    assert all(len(s) == len(single) for s in shares)
    for i, (x, y) in enumerate(single):
        joined_x = torch.empty_like(x)
        joined_y = torch.empty_like(y)
        for r in range(world_size):
            joined_x[r::world_size], joined_y[r::world_size] = shares[r][i]
            assert len(shares[r][i][1]) == 8 // world_size
        assert torch.equal(joined_x, x) and torch.equal(joined_y, y)


def test_ddp_batch_size_must_split_among_the_ranks():
    loader = _ranks(torch.arange(12), 2, batch_size=5)[0]
    with pytest.raises(ValueError, match="multiple of the 2"):
        list(loader)


# --------------------------------------------------------------------------- shift_flip


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C x H x W) moved down by dy and right by dx, zero filled."""
    out = torch.zeros_like(img)
    h, w = img.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _batch(n: int = 64, c: int = 3, h: int = 9, w: int = 9) -> torch.Tensor:
    return torch.rand((n, c, h, w), generator=torch.Generator().manual_seed(1)) + 0.1  # no zeros


@pytest.mark.parametrize("pad", [1, 2, 3])
def test_shift_is_a_zero_filled_translation_by_at_most_pad(pad):
    x = _batch()
    out = shift_flip(x, pad, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for img, res in zip(x, out, strict=False):
        matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                   if torch.equal(res, _shifted(img, dy, dx))]
        assert len(matches) == 1, "output is not a single zero-filled shift within pad"
        seen.add(matches[0])
    assert len(seen) > (2 * pad + 1) ** 2 // 2  # shifts vary across the batch


def test_single_bright_pixel_moves_at_most_pad_and_stays_single():
    pad = 2
    x = torch.zeros(200, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = shift_flip(x, pad, False, torch.Generator().manual_seed(4))
    for res in out:
        bright = res[0].nonzero().tolist()
        assert len(bright) == 1
        (r, c), = bright
        assert abs(r - 4) <= pad and abs(c - 4) <= pad
        assert res.sum() == 1.0


def test_flip_only_mirrors_horizontally():
    x = _batch()
    out = shift_flip(x, 0, True, torch.Generator().manual_seed(0))
    same = [torch.equal(r, i) for i, r in zip(x, out, strict=False)]
    mirrored = [torch.equal(r, i.flip(2)) for i, r in zip(x, out, strict=False)]  # W is dim 2 of C x H x W
    assert all(s != m for s, m in zip(same, mirrored, strict=False))  # each is exactly one of the two
    assert any(same) and any(mirrored)


def test_shift_and_flip_combined_is_a_flip_of_a_shift():
    pad = 1
    x = _batch(n=32)
    out = shift_flip(x, pad, True, torch.Generator().manual_seed(2))
    for img, res in zip(x, out, strict=False):
        assert any(torch.equal(res, _shifted(img, dy, dx)) or torch.equal(res, _shifted(img, dy, dx).flip(2))
                   for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1))


def test_no_pad_no_flip_is_identity():
    x = _batch()
    assert torch.equal(shift_flip(x, 0, False, torch.Generator().manual_seed(0)), x)


def test_shift_flip_is_deterministic_under_a_seeded_generator():
    x = _batch()
    a = shift_flip(x, 2, True, torch.Generator().manual_seed(7))
    b = shift_flip(x, 2, True, torch.Generator().manual_seed(7))
    c = shift_flip(x, 2, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_loader_applies_augmentation_only_when_configured():
    images, labels = _data()
    plain = torch.cat([x for x, _ in TensorLoader(images, labels, INDICES, 4)])
    noop = torch.cat([x for x, _ in TensorLoader(images, labels, INDICES, 4,
                                                 augment={"pad": 0, "flip": False})])
    aug = torch.cat([x for x, _ in TensorLoader(images, labels, INDICES, 4, augment={"pad": 1, "flip": True})])
    assert torch.equal(noop, plain)
    assert not torch.equal(aug, plain)


# --------------------------------------------------------------------------- PairedLoader


def _paired(n_forget: int = 4, n_retain: int = 10, bs: int = 2, anchor: str = "retain"):
    images, labels = _data()
    forget = TensorLoader(images, labels, torch.arange(n_forget), bs)
    retain = TensorLoader(images, labels, torch.arange(20, 20 + n_retain), bs)
    return PairedLoader({"forget": forget, "retain": retain}, anchor=anchor)


def test_paired_length_is_the_anchors():
    assert len(_paired(anchor="retain")) == 5
    assert len(_paired(anchor="forget")) == 2
    assert len(list(_paired(anchor="retain"))) == 5


def test_paired_non_anchor_split_cycles():
    batches = list(_paired())
    assert [_ids(b["retain"][0]) for b in batches] == [[20 + 2 * i, 21 + 2 * i] for i in range(5)]
    assert [_ids(b["forget"][0]) for b in batches] == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]


def test_paired_anchor_shorter_than_other_truncates_the_other():
    batches = list(_paired(anchor="forget"))
    assert [_ids(b["retain"][0]) for b in batches] == [[20, 21], [22, 23]]
    assert all(set(b) == {"forget", "retain"} for b in batches)


def test_paired_unknown_anchor_is_a_value_error():
    with pytest.raises(ValueError, match="'val'"):
        _paired(anchor="val")


def test_paired_empty_non_anchor_split_raises_instead_of_looping():
    with pytest.raises(ValueError, match="empty"):
        list(_paired(n_forget=0))
