"""Forget-set selection (classes, random samples, listed ids) and the validation split.

Everything here is pure and seeded: no model, no training.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from mu_runner.data.datamodule import InMemoryData
from mu_runner.data.forget import (
    ForgetSplit,
    choose_classes,
    class_split,
    indices_split,
    random_split,
    read_indices,
)
from mu_runner.data.formats import make_synthetic
from mu_runner.errors import ConfigError

SEEDS = [0, 1, 2, 3, 7]


def _set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def _assert_partition(split: ForgetSplit, pool: torch.Tensor) -> None:
    """forget and retain are disjoint, free of duplicates, and together exactly the pool."""
    f, r = split.forget.tolist(), split.retain.tolist()
    assert len(set(f)) == len(f) and len(set(r)) == len(r)
    assert not set(f) & set(r)
    assert len(f) + len(r) == len(pool)
    assert set(f) | set(r) == _set(pool)


# --------------------------------------------------------------------------- choose_classes


@pytest.mark.parametrize("k", [1, 4, 9])
def test_choose_classes_returns_k_distinct_sorted_valid_ids(k):
    chosen = choose_classes(10, k=k, seed=3)
    assert len(chosen) == k
    assert chosen == sorted(set(chosen))
    assert all(0 <= c < 10 for c in chosen)


@pytest.mark.parametrize("seed", SEEDS)
def test_choose_classes_nested_as_k_grows_under_one_seed(seed):
    sets = [set(choose_classes(10, k=k, seed=seed)) for k in range(1, 10)]
    for smaller, larger in itertools.pairwise(sets):
        assert smaller < larger  # strict subset: exactly one class is added per step


@pytest.mark.parametrize("seed", SEEDS)
def test_choose_classes_nested_as_fraction_grows_under_one_seed(seed):
    fractions = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    sets = [set(choose_classes(10, fraction=f, seed=seed)) for f in fractions]
    for smaller, larger in itertools.pairwise(sets):
        assert smaller < larger
    # fraction f and k=round(10 f) pick the same classes (one permutation drives both)
    for f, s in zip(fractions, sets, strict=False):
        assert s == set(choose_classes(10, k=round(10 * f), seed=seed))


def test_choose_classes_same_seed_gives_same_set():
    assert choose_classes(10, k=3, seed=11) == choose_classes(10, k=3, seed=11)


def test_choose_classes_depends_on_seed():
    outcomes = {tuple(choose_classes(10, k=3, seed=s)) for s in SEEDS}
    assert len(outcomes) > 1


def test_choose_classes_fraction_of_ten_classes():
    assert len(choose_classes(10, fraction=0.3, seed=0)) == 3


def test_choose_classes_explicit_list_is_sorted_and_deduplicated():
    assert choose_classes(10, classes=[7, 2, 7, 5, 2]) == [2, 5, 7]


def test_choose_classes_explicit_list_ignores_seed():
    assert choose_classes(10, classes=[4, 1], seed=0) == choose_classes(10, classes=[4, 1], seed=9)


# --------------------------------------------------------------------------- choose_classes errors


def _config_error(fn, *args, **kwargs) -> str:
    """Call fn, require a ConfigError (which must also be a ValueError), return its message."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("k", [0, 10, 12])
def test_k_out_of_range_error_names_key_value_and_class_count(k):
    msg = _config_error(choose_classes, 10, k=k)
    assert re.search(rf"forget\.k={k}\b", msg)
    assert "10 classes" in msg


@pytest.mark.parametrize("k", [2.5, True])
def test_non_integer_k_is_rejected(k):
    assert "forget.k" in _config_error(choose_classes, 10, k=k)


def test_both_k_and_fraction_error_names_both_keys():
    msg = _config_error(choose_classes, 10, k=2, fraction=0.3)
    assert "forget.k" in msg and "forget.fraction" in msg


def test_neither_k_nor_fraction_defaults_to_one_class():
    assert choose_classes(10, seed=4) == choose_classes(10, k=1, seed=4)


@pytest.mark.parametrize("classes", [[3, 10], [-1], [0, 99]])
def test_class_ids_out_of_range_error_names_key_and_range(classes):
    msg = _config_error(choose_classes, 10, classes=classes)
    assert "forget.classes" in msg
    assert "0..9" in msg


def test_empty_class_list_is_an_error():
    assert "forget.classes" in _config_error(choose_classes, 10, classes=[])


@pytest.mark.parametrize("classes", [list(range(10)), [9, *range(10), 0]])
def test_listing_every_class_is_an_error(classes):
    msg = _config_error(choose_classes, 10, classes=classes)
    assert "forget.classes" in msg
    assert "10 classes" in msg


@pytest.mark.parametrize("fraction", [0, 0.0, 1, 1.5, -0.2])
def test_fraction_outside_open_unit_interval_error_names_fraction(fraction):
    assert "forget.fraction" in _config_error(choose_classes, 10, fraction=fraction)


def test_explicit_classes_with_fraction_is_an_error():
    msg = _config_error(choose_classes, 10, classes=[1, 2], fraction=0.2)
    assert "forget.classes" in msg


# --------------------------------------------------------------------------- class_split


def test_class_split_partitions_pool_by_label():
    labels = torch.tensor([i % 5 for i in range(60)])
    pool = torch.arange(0, 60, 2)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    split = class_split(labels, pool, [1, 3])
    _assert_partition(split, pool)
    assert all(labels[i] in (1, 3) for i in split.forget.tolist())
    assert all(labels[i] not in (1, 3) for i in split.retain.tolist())
    # labels of pool positions: even i -> i % 5 in {0, 2, 4, 1, 3} all appear, so forget is non-empty
    assert len(split.forget) == sum(int(labels[i]) in (1, 3) for i in pool.tolist())
    assert split.classes == [1, 3]


def test_class_split_never_forgets_outside_the_pool():
    labels = torch.zeros(20, dtype=torch.long)
    pool = torch.arange(5, 15)
    split = class_split(labels, pool, [0])
    assert _set(split.forget) == _set(pool)
    assert len(split.retain) == 0


# --------------------------------------------------------------------------- random_split


POOL = torch.arange(7, 7 + 3 * 120, 3)  # 120 indices that are not simply 0..n-1


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.9])
def test_random_split_size_is_rounded_fraction_of_pool(fraction):
    split = random_split(POOL, fraction=fraction, seed=4)
    assert len(split.forget) == round(fraction * len(POOL))
    _assert_partition(split, POOL)
    assert split.classes is None


def test_random_split_without_k_or_fraction_forgets_ten_percent():
    assert torch.equal(random_split(POOL, seed=2).forget, random_split(POOL, fraction=0.1, seed=2).forget)


def test_random_split_with_k_picks_k_samples():
    split = random_split(POOL, k=17, seed=1)
    assert len(split.forget) == 17
    _assert_partition(split, POOL)


@pytest.mark.parametrize("seed", [0, 5])
def test_random_split_nested_as_fraction_grows(seed):
    sets = [_set(random_split(POOL, fraction=f, seed=seed).forget) for f in (0.1, 0.2, 0.4, 0.8)]
    for smaller, larger in itertools.pairwise(sets):
        assert smaller < larger


def test_random_split_same_seed_same_set_other_seed_differs():
    a = random_split(POOL, fraction=0.2, seed=3)
    assert torch.equal(a.forget, random_split(POOL, fraction=0.2, seed=3).forget)
    assert any(not torch.equal(a.forget, random_split(POOL, fraction=0.2, seed=s).forget) for s in (4, 5, 6))


@pytest.mark.parametrize("kwargs, key", [({"k": 120}, "forget.k"), ({"k": 0}, "forget.k"),
                                         ({"fraction": 1.0}, "forget.fraction")])
def test_random_split_rejects_forgetting_nothing_or_everything(kwargs, key):
    msg = _config_error(random_split, POOL, **kwargs)
    assert key in msg and "120 samples" in msg


# --------------------------------------------------------------------------- read_indices / indices_split


def test_read_indices_one_per_line_with_comments(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# deletion requests\n12\n 3 # user 42\n\n7\n#9\n")
    assert read_indices(path, n_train=20) == [3, 7, 12]


def test_read_indices_json_list(tmp_path):
    path = tmp_path / "ids.json"
    path.write_text("  [5, 1, 0]\n")
    assert read_indices(path, n_train=6) == [0, 1, 5]


def test_read_indices_missing_file_names_forget_path(tmp_path):
    msg = _config_error(read_indices, tmp_path / "nope.txt", 10)
    assert "forget.path" in msg and "nope.txt" in msg and "not found" in msg


@pytest.mark.parametrize("text", ["1\nabc\n", "1.5\n", "[1, 2", '{"ids": [1]}'])
def test_read_indices_non_integer_text_names_forget_path(tmp_path, text):
    path = tmp_path / "ids.txt"
    path.write_text(text)
    assert "forget.path" in _config_error(read_indices, path, 10)


@pytest.mark.parametrize("text", ['["a"]', "[null]", "[1.5]"])
def test_read_indices_non_integer_json_items_name_forget_path(tmp_path, text):
    path = tmp_path / "ids.json"
    path.write_text(text)
    assert "forget.path" in _config_error(read_indices, path, 10)


@pytest.mark.parametrize("text", ["0\n10\n", "[-1]", "[3, 25]"])
def test_read_indices_out_of_range_ids_name_forget_path_and_range(tmp_path, text):
    path = tmp_path / "ids.txt"
    path.write_text(text)
    msg = _config_error(read_indices, path, 10)
    assert "forget.path" in msg and "0..9" in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[]"])
def test_read_indices_empty_list_is_an_error(tmp_path, text):
    path = tmp_path / "ids.txt"
    path.write_text(text)
    assert "forget.path" in _config_error(read_indices, path, 10)


def test_indices_split_forgets_exactly_the_listed_ids():
    pool = torch.tensor([0, 2, 3, 5, 8, 9, 11, 13])
    split = indices_split(pool, [3, 9, 13])
    assert sorted(split.forget.tolist()) == [3, 9, 13]
    _assert_partition(split, pool)
    assert split.classes is None


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_equal_for_equal_splits():
    a = ForgetSplit(torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5]), None)
    b = ForgetSplit(torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5]), None)
    assert a.fingerprint() == b.fingerprint()


def test_fingerprint_changes_when_one_forget_index_changes():
    a = ForgetSplit(torch.tensor([1, 4, 6]), torch.tensor([0, 2, 3, 5]), None)
    b = ForgetSplit(torch.tensor([1, 4, 7]), torch.tensor([0, 2, 3, 5]), None)
    assert a.fingerprint() != b.fingerprint()


def test_fingerprint_distinguishes_class_and_sample_forgetting():
    forget, retain = torch.tensor([1, 4]), torch.tensor([0, 2])
    assert ForgetSplit(forget, retain, [1]).fingerprint() != ForgetSplit(forget, retain, None).fingerprint()


# --------------------------------------------------------------------------- InMemoryData validation split


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(num_classes=4, channels=1, image_size=8, n_train=403, n_test=40, seed=2)


def test_val_and_pool_partition_the_training_set(synthetic):
    data = InMemoryData(synthetic, val_fraction=0.2, split_seed=0, augment={})
    n = len(synthetic.train)
    assert not _set(data.pool) & _set(data.val)
    assert len(data.pool) + len(data.val) == n
    assert _set(data.pool) | _set(data.val) == set(range(n))


def test_val_fraction_holds_per_class(synthetic):
    frac = 0.2
    data = InMemoryData(synthetic, val_fraction=frac, split_seed=0, augment={})
    labels = synthetic.train.labels
    for c in range(4):
        n_c = int((labels == c).sum())
        v_c = int((labels[data.val] == c).sum())
        assert abs(v_c - frac * n_c) <= 0.5 + 1e-9


def test_val_split_is_seeded(synthetic):
    a = InMemoryData(synthetic, val_fraction=0.2, split_seed=1, augment={})
    b = InMemoryData(synthetic, val_fraction=0.2, split_seed=1, augment={})
    c = InMemoryData(synthetic, val_fraction=0.2, split_seed=2, augment={})
    assert torch.equal(a.val, b.val)
    assert not torch.equal(a.val, c.val)


def test_keep_out_of_val_ids_stay_in_the_pool(synthetic):
    keep = list(range(0, 403, 4))  # a quarter of the training set, every class represented
    for seed in range(4):
        data = InMemoryData(synthetic, val_fraction=0.5, split_seed=seed, augment={},
                            keep_out_of_val=keep)
        assert not set(keep) & _set(data.val)
        assert set(keep) <= _set(data.pool)
        assert len(data.pool) + len(data.val) == len(synthetic.train)
    assert len(data.val) > 0
