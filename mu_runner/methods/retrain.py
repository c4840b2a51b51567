"""Retrain: exact unlearning, the gold standard every method is compared with.

A fresh network from the original's initialisation seed (never the original weights), trained
with the original's recipe unchanged, epochs included, on the retain set only. Unlike the cached
reference it is timed like any method; on CPU with deterministic algorithms the two are
bit-identical.
"""

from __future__ import annotations

from mu_runner.methods.supervised import SupervisedTraining


class Retrain(SupervisedTraining):
    """`method=retrain`: the gold standard, timed like any method (from a fresh network)."""

    from_scratch = True
