"""Small helpers over the composed config, shared by the runner and the output writer."""

from __future__ import annotations

import copy

from omegaconf import DictConfig


def method_node(cfg: DictConfig) -> DictConfig:
    """The method's constructor arguments: its yaml without the `search:` block (experiment=tune)."""
    if "search" not in cfg.method:
        return cfg.method
    node = copy.deepcopy(cfg.method)
    node._set_flag("struct", False)
    node.pop("search")
    return node
