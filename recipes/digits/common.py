"""Shared pieces of the digits demo-model recipe: the configuration, the tiny Qwen2-VL, the vision-tower
helpers, the learning-rate schedule and pickle-free checkpoints (safetensors + JSON metadata)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from explainprune.models.offline import DEMO_CHAT_TEMPLATE, QWEN_SPECIALS, word_tokenizer
from explainprune.tasks.digits import WORDS


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the recipe (``python -m recipes.digits.train --help`` lists them)."""

    out: str = "runs/digits/out"
    work: str = "runs/digits"
    init: str = ""  # checkpoint directory to start from (empty: fresh random weights)
    seed: int = 0
    grids: tuple[int, ...] = (3, 4, 5, 6, 7, 8)  # board sizes of still images (rowcol, colour, count)
    cell: int = 56
    video_grid: int = 4
    frames: tuple[int, ...] = tuple(range(2, 17))  # video lengths (content frames)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_width: int = 64
    s1_steps: int = 1500
    s1_tokens: int = 2048  # merged visual tokens per stage-1 step (batch = tokens // tokens per board)
    s1_lr: float = 2e-3
    bank_images: int = 800  # stage-2 boards per grid size
    bank_frames: int = 300  # stage-2 video frames per frame index >= 1
    s2_steps: int = 1000
    s2_tokens: int = 1536  # visual tokens per kind per stage-2 step (batch = tokens // tokens per question)
    s2_max_batch: int = 16
    s2_lr: float = 1e-3
    s2_qk_lr: float = 0.0  # layer-0 q/k projections' peak lr (0: s2_lr)
    s2_warmup: int = 200
    s2_attn: float = 0.5
    s2_ground: float = 0.0  # weight of the layer-0 grounding loss (ground.ground_loss)
    kinds: tuple[str, ...] = ("rowcol", "colour", "count", "video")
    threads: int = 1
    log_every: int = 25
    ckpt_every: int = 100

    @property
    def max_index(self) -> int:
        """Classes of the stage-1 row / column / frame heads."""
        return max(max(self.grids), self.video_grid, max(self.frames))


def build_model(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """A tiny Qwen2-VL (fresh, or ``cfg.init``'s weights), its word tokenizer and image processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = word_tokenizer(WORDS, special_tokens=QWEN_SPECIALS, chat_template=DEMO_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = cfg.hidden // cfg.heads
    third = head_dim // 2 // 3
    rope = {"rope_type": "default", "rope_theta": 1000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third]}
    text = dict(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.hidden * 3,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters=rope,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_width, hidden_size=cfg.hidden, num_heads=4,
                  mlp_ratio=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.eos_token_id, config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    torch.manual_seed(cfg.seed)
    model = Qwen2VLForConditionalGeneration(config)
    if cfg.init:
        model.load_state_dict(_hf_state(Path(cfg.init)), strict=True)
    model.model.visual.config._attn_implementation = "eager"  # per-image loop; faster than sdpa on CPU
    model.model.language_model.config._attn_implementation = "eager"  # attention weights for supervision
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 1024)
    return model, tok, proc


def _hf_state(directory: Path) -> dict[str, torch.Tensor]:
    """A saved checkpoint's weights under the in-memory module names (tied / renamed keys resolved)."""
    from transformers import Qwen2VLForConditionalGeneration

    loaded = Qwen2VLForConditionalGeneration.from_pretrained(directory)
    return loaded.state_dict()


class MatmulPatchEmbed:
    """Context manager: run the vision Conv3d patch embedding as an equal matmul (faster backward on CPU)."""

    def __init__(self, visual: nn.Module):
        self.pe = visual.patch_embed

    def __enter__(self) -> MatmulPatchEmbed:
        pe = self.pe
        self.prev = pe.__dict__.get("forward")

        def forward(x: torch.Tensor) -> torch.Tensor:
            w = pe.proj.weight
            return x.reshape(-1, w[0].numel()).to(w.dtype) @ w.reshape(w.shape[0], -1).T

        pe.forward = forward
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.prev is None:
            self.pe.__dict__.pop("forward", None)
        else:
            self.pe.forward = self.prev


def vision_tokens(visual: nn.Module, pixels: torch.Tensor, n_images: int, side: int) -> torch.Tensor:
    """Merged visual tokens [n_images, tokens, hidden] of a batch of same-size patchified images."""
    thw = torch.tensor([[1, side // 14, side // 14]] * n_images)
    out = visual(pixels, grid_thw=thw).pooler_output
    return out.reshape(n_images, -1, out.shape[-1])


def llm_param_groups(model: Any, lr: float, qk_lr: float | None) -> tuple[list[Any], list[dict[str, Any]]]:
    """The language model's parameters (the vision tower left out; clipped together) and their AdamW groups:
    the rest (peak ``lr``) and layer 0's q/k projections (peak ``qk_lr``: the grounding terms act on them)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    qk = [p for n, p in model.named_parameters()
          if ".layers.0.self_attn." in n and (".q_proj" in n or ".k_proj" in n)]
    rest = [p for p in params if all(p is not x for x in qk)]
    return params, [{"params": rest, "peak": lr}, {"params": qk, "peak": qk_lr or lr}]


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warmup then cosine decay to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ----------------------------------------------------------------------------- pickle-free checkpoints
def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move the tensors of a nested dict/list into ``tensors`` (keyed by path); returns the JSON rest."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(meta, dict) and "__tensor__" in meta:
        return tensors[meta["__tensor__"]]
    if isinstance(meta, dict) and "__dict__" in meta:
        return {k: _unflatten(v, tensors) for k, v in meta["__dict__"]}
    if isinstance(meta, list):
        return [_unflatten(v, tensors) for v in meta]
    return meta


def save_state(path: Path, step: int, objs: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """``objs`` (modules, optimizers: anything with ``state_dict``) as one safetensors file; the
    non-tensor structure (optimizer param groups, int keys) goes to its JSON metadata. Atomic replace."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {k: _flatten(k, o.state_dict(), tensors) for k, o in objs.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "structure": json.dumps(meta),
                                           "extra": json.dumps(extra or {})})
    tmp.replace(path)


def load_state(path: Path, objs: dict[str, Any]) -> int:
    """Restore ``objs`` from ``save_state``'s file; returns its step (0 when the file is absent)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    structure = json.loads(meta["structure"])
    for k, o in objs.items():
        state = _unflatten(structure[k], tensors)
        if isinstance(o, torch.optim.Optimizer):
            state["state"] = {int(i): v for i, v in state["state"].items()}
        o.load_state_dict(state)
    log(f"resumed {path.name} at step {meta['step']}")
    return int(meta["step"])
