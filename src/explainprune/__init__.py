"""explainprune: explainability-guided visual token pruning for multimodal LLMs."""

__version__ = "0.1.0"
