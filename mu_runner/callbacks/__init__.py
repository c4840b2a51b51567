"""The unlearning stage's callbacks, built from the `callbacks` config group.

Every node of `cfg.callbacks` with a `_target_` is instantiated, in the group's order (as
lightning-hydra-template's `instantiate_callbacks`), and handed to the unlearning Trainer; the
group's plain keys (`eval_every_n_epochs`, `forget_target`, ...) are settings the nodes interpolate.
A node marked `_partial_: true` is completed with what the runner knows at build time (`data`,
`split`, `reference`, `seed`, `min_epochs`), each passed only when its signature asks for it; a
factory that returns None adds nothing (e.g. no `forget_target`). A user adds any Lightning
callback from yaml: `'+callbacks.swa={_target_: lightning.pytorch.callbacks.StochasticWeightAveraging,
swa_lrs: 0.01}'` (docs/design.md, Callbacks).
"""

from __future__ import annotations

import functools
import inspect

import lightning as L
from omegaconf import DictConfig


def instantiate_callbacks(node: DictConfig, **context) -> list[L.Callback]:
    """The callbacks of the `callbacks` group; `context` completes `_partial_` nodes."""
    from mu_runner.errors import ConfigError
    from mu_runner.run import make

    out: list[L.Callback] = []
    for name, spec in node.items():
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            continue
        obj = make(spec, f"callbacks.{name}")
        if isinstance(obj, functools.partial):
            params = inspect.signature(obj.func).parameters
            accepts_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            obj = obj(**{k: v for k, v in context.items() if accepts_all or k in params})
        if obj is None:
            continue
        if not isinstance(obj, L.Callback):
            raise ConfigError(f"callbacks.{name}: {spec._target_} made a {type(obj).__name__}, not a Lightning Callback")
        out.append(obj)
    return out
