"""Forget sets: pure, seeded selection of classes or samples, validated before any training.

For one seed the choices are prefixes of one permutation, so forget sets for growing `k` (or a
growing fraction) are nested: k=1 within k=2 within ... and a sweep over k is comparable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mu_runner.errors import ConfigError


@dataclass
class ForgetSplit:
    """Positions in the training pool to forget and to retain (disjoint; their union is the pool)."""

    forget: Tensor  # int64 indices into the source's training set
    retain: Tensor
    classes: list[int] | None  # None for sample forgetting

    def fingerprint(self) -> str:
        """Content hash of the split: it keys the retrained reference in the cache."""
        payload = json.dumps({"forget": self.forget.tolist(), "classes": self.classes})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"classes": self.classes, "forget": self.forget.tolist(), "n_retain": len(self.retain)}


def _count(k: int | None, fraction: float | None, total: int, what: str, default: dict) -> int:
    """Number of items to pick from `k` or `fraction` (at most one given; else `default`)."""
    if k is not None and fraction is not None:
        raise ConfigError(f"forget.k={k} and forget.fraction={fraction}: give one of them, not both")
    if k is None and fraction is None:
        k, fraction = default.get("k"), default.get("fraction")
    if fraction is not None:
        if not 0 < float(fraction) < 1:
            raise ConfigError(f"forget.fraction={fraction}: must lie in (0, 1) ({what})")
        k = max(1, round(float(fraction) * total))
    if isinstance(k, bool) or int(k) != k or not 0 < int(k) < total:
        raise ConfigError(f"forget.k={k}: must be an integer in 1..{total - 1} ({what})")
    return int(k)


def choose_classes(num_classes: int, k=None, fraction=None, classes=None, seed: int = 0) -> list[int]:
    """The forget classes: an explicit list, or the first k of a seeded permutation of classes."""
    what = f"the data has {num_classes} classes and one must remain"
    if classes is not None:
        if fraction is not None or (k is not None and k != len(classes)):
            raise ConfigError(f"forget.classes={list(classes)} with forget.k={k}, forget.fraction={fraction}: "
                              "give the classes alone")
        bad = [c for c in classes if isinstance(c, bool) or int(c) != c or not 0 <= int(c) < num_classes]
        if bad or not classes:
            raise ConfigError(f"forget.classes={list(classes)}: ids must lie in 0..{num_classes - 1}")
        chosen = sorted({int(c) for c in classes})
        if len(chosen) >= num_classes:
            raise ConfigError(f"forget.classes={list(classes)}: {what}")
        return chosen
    n = _count(k, fraction, num_classes, what, {"k": 1})
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:n].tolist())


def class_split(labels: Tensor, pool: Tensor, classes: list[int]) -> ForgetSplit:
    """Every pool sample of a forget class goes to the forget set."""
    in_forget = torch.isin(labels[pool], torch.tensor(classes, dtype=labels.dtype))
    return ForgetSplit(pool[in_forget], pool[~in_forget], list(classes))


def random_split(pool: Tensor, k=None, fraction=None, seed: int = 0) -> ForgetSplit:
    """A seeded random subset of training samples (nested as k or the fraction grows)."""
    n = _count(k, fraction, len(pool), f"the training split has {len(pool)} samples", {"fraction": 0.1})
    if n < 2:  # one sample has no half to check on (forget_target) and no population to attack
        given = f"forget.k={k}" if k is not None else f"forget.fraction={0.1 if fraction is None else fraction}"
        raise ConfigError(f"forget=random with {given}: {n} of {len(pool)} training samples; need at least 2")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed)))
    chosen = torch.zeros(len(pool), dtype=torch.bool)
    chosen[perm[:n]] = True
    return ForgetSplit(pool[chosen], pool[~chosen], None)


def read_indices(path: str | Path, n_train: int) -> list[int]:
    """Training-sample ids from a file: a JSON list, or one integer per line (# comments)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"forget.path={str(path)!r}: file not found (one training-sample id per line)")
    text = path.read_text()
    try:
        ids = json.loads(text) if text.lstrip().startswith("[") else [
            int(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()
        ]
    except ValueError as err:
        raise ConfigError(f"forget.path={str(path)!r}: not a list of integer ids ({err})") from None
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ConfigError(f"forget.path={str(path)!r}: not a list of integer ids")
    seen: set[int] = set()
    twice = next((i for i in ids if i in seen or seen.add(i)), None)
    if twice is not None:
        raise ConfigError(f"forget.path={str(path)!r}: id {twice} is listed twice (each training sample once)")
    bad = [i for i in ids if not 0 <= i < n_train]
    if not ids or bad:
        raise ConfigError(
            f"forget.path={str(path)!r}: ids must lie in 0..{n_train - 1}"
            + (f" (got {bad[:5]})" if bad else " (the file lists none)")
        )
    return sorted({int(i) for i in ids})


def indices_split(pool: Tensor, ids: list[int]) -> ForgetSplit:
    """Listed ids are forgotten; the rest of the pool is retained."""
    chosen = torch.isin(pool, torch.tensor(ids, dtype=pool.dtype))
    return ForgetSplit(pool[chosen], pool[~chosen], None)


# --------------------------------------------------------------------------- the `forget` group's objects
# conf/forget/<kind>.yaml names one of these with `_target_`; `make_split` calls `split(data)`.
# `kind` stays a plain key of each yaml (outputs, loggers and reports read it) and must match.


@dataclass(frozen=True)
class ForgetClasses:
    """`forget=classes`: k classes, a fraction of them, or an explicit list (nested as k grows)."""

    k: int | None = None
    fraction: float | None = None
    classes: list[int] | None = None
    seed: int = 0
    kind: str = "classes"

    def __post_init__(self) -> None:
        _check_kind(self, "classes")

    def split(self, data) -> ForgetSplit:
        chosen = choose_classes(data.num_classes, self.k, self.fraction,
                                None if self.classes is None else list(self.classes), self.seed)
        return class_split(data.labels.cpu(), data.pool, chosen)


@dataclass(frozen=True)
class ForgetRandom:
    """`forget=random`: a seeded fraction (default 0.1) or k random training samples."""

    k: int | None = None
    fraction: float | None = None
    seed: int = 0
    kind: str = "random"

    def __post_init__(self) -> None:
        _check_kind(self, "random")

    def split(self, data) -> ForgetSplit:
        return random_split(data.pool, self.k, self.fraction, self.seed)


@dataclass(frozen=True)
class ForgetIndices:
    """`forget=indices`: the training-sample ids listed in a file (deletion requests)."""

    path: str
    kind: str = "indices"

    def __post_init__(self) -> None:
        _check_kind(self, "indices")

    def ids(self, n_train: int) -> list[int]:
        return read_indices(self.path, n_train)

    def split(self, data) -> ForgetSplit:
        return indices_split(data.pool, self.ids(len(data.labels)))


def _check_kind(spec, kind: str) -> None:
    if spec.kind != kind:
        raise ConfigError(f"forget.kind={spec.kind!r} does not match forget._target_={type(spec).__name__} "
                          f"(which forgets {kind}); choose the option with forget={spec.kind}")
