"""mu_runner: machine-unlearning experiments for image classifiers, with honest metrics."""

__version__ = "0.1.0"
