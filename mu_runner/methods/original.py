"""The original model, unchanged: a reference point for every table (no optimizer step)."""

from __future__ import annotations

from mu_runner.methods.base import OneShotModule


class Original(OneShotModule):
    """Returns the original weights bit-identical."""

    def edit(self) -> None:
        pass
