"""python -m mu_runner [overrides]  |  python -m mu_runner -m method=finetune,retrain forget.k=1,2"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from mu_runner.errors import MuRunnerError

log = logging.getLogger("mu_runner")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run one experiment; returns avg_gap so that a Hydra sweeper can minimise it."""
    from mu_runner.run import run  # heavy imports after Hydra has parsed the command line

    try:
        metrics = run(cfg)
    except MuRunnerError as err:
        log.error("%s", err)
        print(f"mu_runner: error: {err}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("summary/avg_gap")


if __name__ == "__main__":
    main()
