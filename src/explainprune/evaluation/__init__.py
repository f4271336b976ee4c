"""Evaluation: FLOPs accounting (Appendix D), the runner behind ``explainprune eval``, reports and plots.

Import the submodules (``evaluation.runner``, ``evaluation.flops``, ...); this package stays light.
"""

DEFAULT_METHODS = ("vanilla", "random", "uniform", "layer0", "fastv", "pdrop", "dart", "divprune")
"""The training-free methods that run on every supported family with no extra input (``learned`` needs a
compressor, ``oracle`` an expensive backward, ``visionzip`` is not available for LLaVA-OneVision)."""
DEFAULT_RATIOS = (0.5, 0.25, 0.1)
METHODS = ("vanilla", "random", "uniform", "layer0", "learned", "oracle", "fastv", "pdrop", "dart", "divprune",
           "visionzip", "cdpruner", "evs", "downsample")
"""Every registered pruner (a test keeps this equal to ``pruning.available()``), for ``eval --help``."""
