"""explainprune: explainability-guided visual token pruning for multimodal LLMs."""

from explainprune.models import load
from explainprune.pruning import get_pruner, select

__version__ = "0.1.0"

__all__ = ["__version__", "get_pruner", "load", "select"]
