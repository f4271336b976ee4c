"""explainprune: explainability-guided visual token pruning for multimodal LLMs."""

from explainprune.attention import first_layer_attention
from explainprune.compressor import Compressor
from explainprune.models import load
from explainprune.pruning import get_pruner, select
from explainprune.relevance import relevance
from explainprune.versions import __version__

__all__ = ["Compressor", "__version__", "first_layer_attention", "get_pruner", "load", "relevance", "select"]
