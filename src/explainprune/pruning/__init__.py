"""Pruning methods, as siblings in one registry (``get_pruner``) sharing one ``select``."""

# importing a method's module registers it
from explainprune.pruning import (  # noqa: F401
    baselines,
    cdpruner,
    dart,
    divprune,
    downsample,
    evs,
    fastv,
    layer0,
    learned,
    oracle,
    pdrop,
    visionzip,
)
from explainprune.pruning.base import Pruner, available, get_pruner, register, select

__all__ = ["Pruner", "available", "get_pruner", "register", "select"]
