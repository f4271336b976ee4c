"""Tiny random-weight checkpoints of every supported family, built from config with no download.

Each builder writes a directory laid out exactly like a user's checkpoint (config, safetensors weights,
tokenizer, image-processor config, chat template), so tests and benchmarks go through `explainprune.load`
the way a user does. Used by tests/ and benchmarks/; not part of the top-level API.
"""

from __future__ import annotations

from pathlib import Path

import torch

from explainprune.models.offline import (
    BASIC_WORDS,
    LLAVA_CHAT_TEMPLATE,
    LLAVA_ONEVISION_CHAT_TEMPLATE,
    LLAVA_ONEVISION_SPECIALS,
    LLAVA_SPECIALS,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN_SPECIALS,
    save_checkpoint_dir,
    word_tokenizer,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "llava")

# Qwen/Qwen2-VL-7B-Instruct's generation_config.json (Qwen2.5-VL-7B-Instruct ships the same fields): sampling
# with top_k=1 (greedy in effect), a repetition penalty, and two EOS tokens.
QWEN_INSTRUCT_GENERATION = {"do_sample": True, "temperature": 0.01, "top_p": 0.001, "top_k": 1,
                            "repetition_penalty": 1.05, "eos_token_id": ["<|im_end|>", "<|endoftext|>"]}


def _text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-6, **extra,
    )


def tiny_qwen2_vl(
    path: str | Path, *, version: str = "qwen2_vl", hidden: int = 64, layers: int = 2, heads: int = 4,
    kv_heads: int = 2, vision_depth: int = 1, vision_width: int = 32, seed: int = 0,
    min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 64, generation: dict | None = None,
) -> Path:
    """A tiny Qwen2-VL (``version="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) checkpoint directory.

    ``generation``: generation_config fields to ship (e.g. ``QWEN_INSTRUCT_GENERATION``).
    """
    from transformers import Qwen2VLImageProcessorPil

    tok = word_tokenizer(special_tokens=QWEN_SPECIALS, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = hidden // heads
    quarter = head_dim // 4  # mrope sections sum to head_dim / 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
    text = _text_config(len(tok), hidden, layers, heads, kv_heads, rope_parameters=rope,
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                        pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(seed)
    if version == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=vision_depth, embed_dim=vision_width, hidden_size=hidden, num_heads=2,
                      mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision)
        cls = Qwen2VLForConditionalGeneration
    elif version == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=vision_depth, hidden_size=vision_width, out_hidden_size=hidden, num_heads=2,
                      intermediate_size=vision_width * 2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vision_depth - 1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen version {version!r}; accepted: 'qwen2_vl', 'qwen2_5_vl'")
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        name = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}[key]
        setattr(config, key, ids[name])
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]
    model = cls(config).eval()
    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return save_checkpoint_dir(model, tok, proc, path, generation)


def tiny_qwen3_vl(
    path: str | Path, *, moe: bool = False, hidden: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2,
    vision_depth: int = 3, vision_width: int = 32, deepstack: tuple[int, ...] = (0, 1), seed: int = 0,
    min_pixels: int = 64 * 64, max_pixels: int = 32 * 32 * 64, generation: dict | None = None,
) -> Path:
    """A tiny Qwen3-VL (or Qwen3-VL-MoE with ``moe=True``) checkpoint directory: patch 16, DeepStack
    features from vision layers ``deepstack`` added after LLM layers 0..len-1, interleaved M-RoPE."""
    from transformers import Qwen2VLImageProcessorPil

    tok = word_tokenizer(words=[*BASIC_WORDS, "seconds", "<", ">"], special_tokens=QWEN_SPECIALS,
                         chat_template=QWEN3_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = hidden // heads
    quarter = head_dim // 4  # mrope sections sum to head_dim / 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}
    text = _text_config(len(tok), hidden, layers, heads, kv_heads, rope_parameters=rope, head_dim=head_dim,
                        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                        pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=vision_width * 2, num_heads=2,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=list(deepstack))
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    if moe:
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden // 2, decoder_sparse_step=1)
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                                                                    **special)).eval()
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision,
                                                              **special)).eval()
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                    max_pixels=max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return save_checkpoint_dir(model, tok, proc, path, generation)


def tiny_llava_onevision(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                         kv_heads: int = 2, image_size: int = 56, seed: int = 0,
                         generation: dict | None = None) -> Path:
    """A tiny LLaVA-OneVision (SigLIP tower, Qwen2 LM, anyres up to 2x2 tiles) checkpoint directory."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    tok = word_tokenizer(special_tokens=LLAVA_ONEVISION_SPECIALS, chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = _text_config(len(tok), hidden, layers, heads, kv_heads, model_type="qwen2",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=image_size, patch_size=14)
    pinpoints = [[image_size * a, image_size * b] for a in (1, 2) for b in (1, 2)]
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    proc = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                           image_grid_pinpoints=pinpoints)
    return save_checkpoint_dir(model, tok, proc, path, generation)


def tiny_llava(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               image_size: int = 112, seed: int = 0, generation: dict | None = None) -> Path:
    """A tiny LLaVA-1.5 / VILA-style checkpoint (CLIP tower, Llama LM, fixed tokens per image); its tokenizer
    prepends ``<s>`` as Llama's does."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    tok = word_tokenizer(special_tokens=LLAVA_SPECIALS, chat_template=LLAVA_CHAT_TEMPLATE,
                         eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    text = _text_config(len(tok), hidden, layers, heads, kv_heads, model_type="llama",
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=14, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // 14) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})
    return save_checkpoint_dir(model, tok, proc, path, generation)


def build_tiny(family: str, path: str | Path, **options) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` (one of FAMILIES) to ``path``."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return tiny_qwen2_vl(path, version=family, **options)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        return tiny_qwen3_vl(path, moe=family == "qwen3_vl_moe", **options)
    builders = {"llava_onevision": "tiny_llava_onevision", "llava": "tiny_llava"}
    if family not in builders or builders[family] not in globals():
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")
    return globals()[builders[family]](path, **options)


def random_image(seed: int = 0, size: tuple[int, int] = (112, 140)):
    """A deterministic random RGB PIL image of ``size`` (height, width)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def write_video(path: str | Path, pixels, frames: int, fps: float, codec: str = "mpeg4",
                gop: int | None = None) -> Path:
    """A video file (PyAV) of ``frames`` frames at ``fps``; frame i is ``pixels(i)``, an H x W x 3 uint8 array
    (H, W even: yuv420p). ``gop``: the encoder's keyframe interval (default: the codec's)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.height, stream.width = pixels(0).shape[:2]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels(i), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(path)


def put_in_hub_cache(checkpoint: str | Path, repo_id: str, cache_dir: str | Path, revision: str = "main",
                     commit: str | None = None) -> Path:
    """Copy a checkpoint directory into a hub cache laid out as huggingface_hub lays it out.

    ``cache_dir/models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<file>`` (relative symlinks to the
    blobs) and ``refs/<revision>`` holding the commit hash, so ``from_pretrained(repo_id)`` finds it with
    ``HF_HUB_OFFLINE=1``. Returns the snapshot directory.
    """
    import hashlib
    import os

    checkpoint, repo = Path(checkpoint), Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(f for f in checkpoint.rglob("*") if f.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def script_module(path: str | Path, name: str):
    """A script that is not part of the package (``benchmarks/*.py``, ``recipes/*.py``) imported as module ``name``
    (registered in ``sys.modules``, so its dataclasses and pickling work), for tests of its pieces."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(path))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_manifest(folder: str | Path, n: int) -> Path:
    """A manifest of ``n`` random images (``folder/m.jsonl``, each asking row 1 column 2, answer 7)."""
    import json

    folder = Path(folder)
    rows = []
    for i in range(n):
        random_image(i).save(folder / f"{i}.png")
        rows.append({"id": f"s{i}", "question": "what digit is in row 1 column 2 ?", "answer": "7",
                     "image": f"{i}.png"})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "m.jsonl"
