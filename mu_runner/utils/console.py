"""What a run prints: each event once, through Hydra's handlers (terminal and `<job>.log`).

Lightning adds its own console handler when it is imported before logging is configured, so its
INFO lines came out twice; its start-up lines (GPU/TPU available, the litlogger tip, "fit
stopped") say nothing a user of this tool needs, and two library deprecation warnings repeat on
every run. `quiet_libraries()` routes Lightning through the root logger once and keeps its
warnings and errors only.
"""

from __future__ import annotations

import logging
import warnings

# Lightning's rank-zero INFO lines: accelerator availability, the litlogger tip, "`Trainer.fit` stopped"
QUIET = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
         "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.distributed")


def quiet_libraries() -> None:
    for name in [n for n in logging.root.manager.loggerDict if n == "lightning" or n.startswith("lightning.")]:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch's pytree (via Lightning) and timm's layer imports deprecate names they still use themselves
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
    # one-shot methods (ssd, mnemonic, weight_filter) fit with no optimizer on purpose, and a method that
    # keeps its network in eval mode (BatchNorm statistics frozen) does so on purpose: not news to the user
    warnings.filterwarnings("ignore", message=r".*configure_optimizers. returned .None.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
