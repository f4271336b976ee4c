"""The Appendix-D cost model moved to ``explainprune.cost`` (below both ``pruning`` and ``evaluation``);
this module re-exports it so that ``explainprune.evaluation.flops`` imports keep working."""

from explainprune.cost import (  # noqa: F401
    PAPER_COMPRESSOR,
    FlopsAccount,
    LLMShape,
    account,
    attention_flops,
    average_retention,
    compressor_channels,
    conv_flops,
    kept_count,
    layer_flops,
    llm_flops,
    method_account,
    planned_tokens,
    selection_flops,
    vision_head_dim,
    visual_tokens_per_layer,
)
