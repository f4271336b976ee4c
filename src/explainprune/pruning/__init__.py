"""Pruning methods, as siblings in one registry (``get_pruner``) sharing one ``select``."""

from explainprune.pruning import baselines  # noqa: F401  (registers vanilla, random, uniform)
from explainprune.pruning.base import Pruner, available, get_pruner, register, select

__all__ = ["Pruner", "available", "get_pruner", "register", "select"]
