"""The cost model: FLOPs of the visual-token part of the LLM (paper Appendix D, Eq. 4-6), the kept counts,
the visual tokens of each layer and the average retention over layers (Figure 3).

It sits below both ``pruning`` and ``evaluation`` (it imports neither): pruners use its counts, and
``method_account`` asks a pruner for its own per-layer tokens and selection cost, so ``explainprune flops``,
the evaluation runner and the lmms-eval efficiency file count every method the same way.

Eq. 4 is printed as ``4nd^2 + 2n^2d + lnm``; the paper's own figures (11.69 T for n=1568, d=3584,
m=18944, l=3, 28 layers, and every FLOPs entry of Tables 7-8) need the FFN term ``l * n * d * m`` (l matrices
of size d x m), so that is what ``layer_flops`` computes. All counts are exact Python integers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PAPER_COMPRESSOR = dict(in_channels=1, channels=(32, 64, 128, 256, 512), kernel_size=3)


@dataclass(frozen=True)
class LLMShape:
    """The dimensions Eq. 4 needs: hidden size d, FFN intermediate size m, layers N_L, FFN matrices l."""

    hidden: int
    intermediate: int
    layers: int
    ffn_matrices: int = 3
    vision_head_dim: int | None = None  # the vision encoder's head dim, when known (VisionZip's key similarity)

    @classmethod
    def from_config(cls, text_config: Any, vision_config: Any = None, ffn_matrices: int = 3) -> LLMShape:
        """From a transformers text config (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``), an
        object or a dict (a config.json's ``text_config``); with ``vision_config`` also its head dim.

        A sparse-MoE LLM (Qwen3-VL-MoE: ``num_experts_per_tok`` experts of ``moe_intermediate_size`` per
        token) counts the FFN each token actually runs: m = experts per token x expert size (the router's
        d x experts product is left out, as Eq. 4 leaves out norms)."""
        m = int(_field(text_config, "intermediate_size"))
        experts = _field(text_config, "num_experts_per_tok", None)
        if experts and _field(text_config, "moe_intermediate_size", None):
            m = int(experts) * int(_field(text_config, "moe_intermediate_size"))
        return cls(int(_field(text_config, "hidden_size")), m, int(_field(text_config, "num_hidden_layers")),
                   int(ffn_matrices), vision_head_dim(vision_config))


def _field(config: Any, name: str, *default: Any) -> Any:
    """``config.name`` or ``config[name]`` (a dict); KeyError naming the field when absent and no default."""
    if isinstance(config, dict):
        if name in config or not default:
            return config[name]
        return default[0]
    if hasattr(config, name) or not default:
        try:
            return getattr(config, name)
        except AttributeError:
            raise KeyError(name) from None
    return default[0]


def vision_head_dim(vision_config: Any) -> int | None:
    """Head dim of a vision encoder config (width / heads: ``embed_dim`` or ``hidden_size`` over ``num_heads``
    or ``num_attention_heads``, as Qwen2-VL, Qwen2.5/3-VL, CLIP and SigLIP name them); None when unknown."""
    if vision_config is None:
        return None
    width = _field(vision_config, "embed_dim", None) or _field(vision_config, "hidden_size", None)
    heads = _field(vision_config, "num_heads", None) or _field(vision_config, "num_attention_heads", None)
    return int(width) // int(heads) if width and heads else None


def layer_flops(n: int, d: int, m: int, l: int = 3) -> int:
    """Eq. 4, one Transformer layer on n visual tokens: 4nd^2 + 2n^2d + l*n*d*m (see module note)."""
    return 4 * n * d * d + 2 * n * n * d + l * n * d * m


def llm_flops(tokens_per_layer: Sequence[int], shape: LLMShape) -> int:
    """FLOPs_LLM: Eq. 4 summed over layers, each with the visual tokens it keeps (N_L * Eq. 4 if constant)."""
    if len(tokens_per_layer) != shape.layers:
        raise ValueError(f"need one token count per layer ({shape.layers}); got {len(tokens_per_layer)}")
    return sum(layer_flops(n, shape.hidden, shape.intermediate, shape.ffn_matrices) for n in tokens_per_layer)


def attention_flops(n: int, d: int) -> int:
    """Eq. 5, the first-layer attention A_v^0 the compressor reads: n*d^2 (visual keys) + n*d (text->visual)."""
    return n * d * d + n * d


def conv_flops(n: int, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256, 512),
               kernel_size: int = 3) -> int:
    """Eq. 6, f_θ on n tokens: sum over depthwise-separable layers of n (C_in k + C_in C_out), plus the final
    pointwise layer to one channel (n * C_last)."""
    widths = [int(in_channels), *(int(c) for c in channels)]
    total = sum(n * (c_in * kernel_size + c_in * c_out) for c_in, c_out in zip(widths[:-1], widths[1:]))
    return total + n * widths[-1]


def kept_count(n: int, ratio: float) -> int:
    """Visual tokens ``select`` keeps at ``ratio``: ceil(ratio * n), at least 1."""
    return max(1, math.ceil(float(ratio) * n - 1e-9))


def visual_tokens_per_layer(n_visual: int, n_kept: int, layer: int, num_layers: int) -> list[int]:
    """Visual tokens each LLM layer sees when pruning happens at ``layer`` (0 = before the LLM)."""
    if not 0 <= layer <= num_layers:
        raise ValueError(f"pruning layer must be in 0..{num_layers}; got {layer}")
    return [n_visual] * layer + [n_kept] * (num_layers - layer)


def average_retention(tokens_per_layer: Sequence[int], n_visual: int) -> float:
    """Figure 3's average retention ratio: mean over LLM layers of kept / N_v (FastV: (K + (L-K) r) / L)."""
    return sum(tokens_per_layer) / (len(tokens_per_layer) * n_visual)


@dataclass
class FlopsAccount:
    """Appendix-D accounting for one input (FLOPs as exact integers; ``*_share`` in % of ``vanilla``, the
    unpruned FLOPs_LLM, as the paper's 0.17% / 0.0026%)."""

    n_visual: int
    ratio: float
    layer: int
    kept: int
    shape: LLMShape
    vanilla: int
    llm: int
    attention: int = 0
    conv: int = 0
    tokens_per_layer: list[int] = field(default_factory=list)
    selection: int = 0  # a baseline's own selection cost (``Pruner.overhead_flops``): similarity, stages, ...

    @property
    def total(self) -> int:
        return self.llm + self.attention + self.conv + self.selection

    @property
    def average_retention(self) -> float:
        return average_retention(self.tokens_per_layer, self.n_visual)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["shape"]["vision_head_dim"] is None:
            del d["shape"]["vision_head_dim"]
        d.update(total=self.total, average_retention=self.average_retention,
                 attention_share=100 * self.attention / self.vanilla, conv_share=100 * self.conv / self.vanilla,
                 reduction=100 * (1 - self.total / self.vanilla))
        return d

    def to_markdown(self) -> str:
        s = self.shape
        rows = [
            ("visual tokens n", f"{self.n_visual} (kept {self.kept}, ratio {self.ratio:g}, from layer {self.layer})"),
            ("LLM", f"d={s.hidden}, m={s.intermediate}, N_L={s.layers}, l={s.ffn_matrices}"),
            ("visual tokens per layer", _runs(self.tokens_per_layer)),
            ("average retention over layers", f"{100 * self.average_retention:.1f}%"),
            ("FLOPs_LLM vanilla (Eq. 4)", _fmt(self.vanilla)),
            ("FLOPs_LLM pruned (Eq. 4 per layer)", _fmt(self.llm)),
            ("FLOPs_attn (Eq. 5)", f"{_fmt(self.attention)} ({100 * self.attention / self.vanilla:.4f}% of vanilla)"),
            ("FLOPs_conv (Eq. 6)", f"{_fmt(self.conv)} ({100 * self.conv / self.vanilla:.5f}% of vanilla)"),
            ("the method's own selection", f"{_fmt(self.selection)} ({100 * self.selection / self.vanilla:.4f}% of "
             "vanilla)"),
            ("total", f"{_fmt(self.total)} ({100 * (1 - self.total / self.vanilla):.1f}% fewer than vanilla)"),
        ]
        return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def _runs(tokens: Sequence[int]) -> str:
    """[64, 64, 16, 16, 16] -> "64 x 2, 16 x 3" (layers in order)."""
    runs: list[list[int]] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return ", ".join(f"{t} x {k}" for t, k in runs)


def _fmt(x: int) -> str:
    return f"{x / 1e12:.4f} T ({x:,})"


def account(shape: LLMShape, n_visual: int, ratio: float = 1.0, layer: int = 0, *,
            kept: int | None = None, compressor: dict[str, Any] | None = None,
            tokens_per_layer: Sequence[int] | None = None) -> FlopsAccount:
    """Eq. 4 for a method keeping ``ratio`` (or ``kept``) of ``n_visual`` tokens from ``layer`` on (or, for a
    multi-stage method, the visual tokens of each layer ``tokens_per_layer``); with ``compressor``
    (``in_channels``, ``channels``, ``kernel_size``) also its Eq. 5 + Eq. 6 overhead."""
    kept = kept_count(n_visual, ratio) if kept is None else int(kept)
    per_layer = (list(tokens_per_layer) if tokens_per_layer
                 else visual_tokens_per_layer(n_visual, kept, layer, shape.layers))
    attn = conv = 0
    if compressor is not None:
        attn = attention_flops(n_visual, shape.hidden)
        conv = conv_flops(n_visual, **compressor)
    return FlopsAccount(n_visual=n_visual, ratio=float(ratio), layer=layer, kept=kept, shape=shape,
                        vanilla=llm_flops([n_visual] * shape.layers, shape), llm=llm_flops(per_layer, shape),
                        attention=attn, conv=conv, tokens_per_layer=per_layer)


def compressor_channels(compressor: Any) -> dict[str, Any] | None:
    """Eq. 6 channel config of a Compressor (or anything with a ``config`` holding its fields), else None."""
    cfg = getattr(compressor, "config", None)
    if cfg is None or not hasattr(cfg, "channels"):
        return None
    in_ch = getattr(cfg, "input_channels", getattr(cfg, "in_channels", 1))
    return dict(in_channels=int(in_ch), channels=tuple(cfg.channels), kernel_size=int(cfg.kernel_size))


def method_account(pruner: Any, shape: LLMShape, n_visual: int, ratio: float, *,
                   measured: Sequence[int] | None = None, kept: int | None = None) -> FlopsAccount:
    """One method's account on an input of ``n_visual`` tokens at ``ratio``, from the pruner itself: the
    visual tokens of each layer (``pruner.tokens_per_layer``), its compressor's Eq. 5-6 overhead (a pruner
    with a ``compressor``) and its own selection cost (``pruner.selection_flops``, else ``overhead_flops``).

    ``measured`` / ``kept``: what an actual run kept (the runner's: the visual tokens of each layer, or only
    the final count); they are counted instead of the declared ones where they differ (a custom pruner may
    keep another count than it declares; the registered ones keep what they declare, as tests check).
    A pruner without these methods counts as pruning ``kept_count`` tokens from its ``layer`` (0) on.
    """
    per_layer = list(measured) if measured else planned_tokens(pruner, n_visual, ratio, shape.layers)
    if len(per_layer) != shape.layers:
        raise ValueError(f"need one token count per layer ({shape.layers}); got {len(per_layer)}")
    layer = next((i for i, t in enumerate(per_layer) if t < n_visual), int(getattr(pruner, "layer", 0) or 0))
    if kept is not None and not measured and per_layer[-1] != kept:
        per_layer = visual_tokens_per_layer(n_visual, int(kept), layer, shape.layers)
    acc = account(shape, n_visual, ratio, layer, kept=per_layer[-1], tokens_per_layer=per_layer,
                  compressor=compressor_channels(getattr(pruner, "compressor", None)))
    acc.selection = selection_flops(pruner, shape, n_visual, per_layer)
    return acc


def planned_tokens(pruner: Any, n_visual: int, ratio: float, num_layers: int) -> list[int]:
    """``pruner.tokens_per_layer(n_visual, ratio, num_layers)``, or for a pruner without it ``kept_count``
    from its ``layer`` on."""
    own = getattr(pruner, "tokens_per_layer", None)
    if own is not None:
        return [int(t) for t in own(n_visual, ratio, num_layers)]
    layer = int(getattr(pruner, "layer", 0) or 0)
    return visual_tokens_per_layer(n_visual, kept_count(n_visual, ratio), layer, num_layers)


def selection_flops(pruner: Any, shape: LLMShape, n_visual: int, tokens_per_layer: Sequence[int]) -> int:
    """The method's own selection cost: ``pruner.selection_flops(shape, ...)``, else
    ``pruner.overhead_flops(d, ...)``, else 0."""
    own = getattr(pruner, "selection_flops", None)
    if own is not None:
        return int(own(shape, n_visual, list(tokens_per_layer)))
    own = getattr(pruner, "overhead_flops", None)
    return int(own(shape.hidden, n_visual, list(tokens_per_layer))) if own is not None else 0
