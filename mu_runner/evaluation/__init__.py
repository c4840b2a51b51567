"""Evaluation: every model of a run scored by one `Evaluator` (metric suite, analyses, attacks).

Methods never import this package; the helpers they share with it live in `mu_runner.metrics`.
"""

from mu_runner.evaluation.evaluator import EvaluationResult, Evaluator

__all__ = ["EvaluationResult", "Evaluator"]
