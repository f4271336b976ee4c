"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's pipeline plus DeepStack, interleaved M-RoPE and video timestamps.

What differs from ``Qwen2VL`` (whose image/video preprocessing, grids and positions this reuses):
  - DeepStack: the vision tower also returns features of a few intermediate layers; transformers adds
    level l to the LLM's hidden states at the visual positions after decoder layer l. The adapter keeps
    them per visual token in ``Prompt.visual_residuals`` ({l: Tensor[N_v, D]}), so a pruned token drops
    its DeepStack rows with it and in-LLM pruners (FastV, ...) follow the kept rows (``VisualResiduals``).
  - Videos: each temporal frame is its own ``<|vision_start|>...<|vision_end|>`` block preceded by its
    timestamp as text (``<1.5 seconds>``), exactly as ``Qwen3VLProcessor.replace_video_token`` writes it;
    times are i / fps of the sampled frames (``fps=``, a ``Video``'s fps, or a clip's ``timestamps``;
    unknown: ``DEFAULT_VIDEO_FPS`` = 2, Qwen's default sampling rate, as for Qwen2.5-VL -- the processor
    itself assumes 24 fps for frames given without metadata, so pass the real rate). Positions come from
    the model's ``get_rope_index``, which splits the video grid per frame for that reason.
  - The MoE variant differs only in the LLM's MLP (nothing here depends on it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from explainprune.models.base import Prompt, as_images, expand_placeholders
from explainprune.models.qwen2_vl import Qwen2VL, _video_fps, video_pixels


def frame_timestamps(times: list[float], temporal_patch: int) -> list[float]:
    """Seconds of each temporal token: the mean of the first and last time of its ``temporal_patch`` raw
    frames, the frame list padded with its last frame (``Qwen3VLProcessor._calculate_timestamps``)."""
    times = list(times)
    while len(times) % temporal_patch:
        times.append(times[-1])
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]


class Qwen3VL(Qwen2VL):
    """Adapter for ``qwen3_vl`` and ``qwen3_vl_moe`` checkpoints."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")
    family = "qwen3_vl"

    @classmethod
    def _load(cls, path, **options):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=options.get("revision"),
                                            trust_remote_code=options.get("trust_remote_code", False))
        if config.model_type == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeForConditionalGeneration as model_cls
        else:
            from transformers import Qwen3VLForConditionalGeneration as model_cls
        return model_cls.from_pretrained(path, config=config, **options)

    def _video_text(self, thw: Tensor, video: Any, fps: float | None) -> str:
        """The placeholder text of one video: per temporal frame ``<t seconds>`` + a vision block."""
        tp = int(self.image_processor.temporal_patch_size)
        times = getattr(video, "timestamps", None) if fps is None else None
        if times is None:
            rate = _video_fps(video, fps)
            times = [i / rate for i in range(len(video))]
        per_frame = int(thw[1] * thw[2]) // self.merge**2
        block = "<|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
        return "".join(f"<{t:.1f} seconds>" + block for t in frame_timestamps(list(times), tp)[: int(thw[0])])

    @torch.no_grad()
    def prepare(self, images: Any = None, video: Any = None, question: str = "", **kwargs: Any) -> Prompt:
        """Build the Prompt for ``images`` (one or a list) and/or ``video`` (frames; ``fps=`` or a clip with
        ``timestamps`` gives the frame times), with the DeepStack features in ``visual_residuals``."""
        question = self.clean_question(question)
        images = as_images(images)
        text = self._render_media(len(images), video is not None, question)
        inputs: dict[str, Any] = {}
        grids: list[tuple[int, Tensor]] = []
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"], inputs["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
            text = expand_placeholders(text, "<|image_pad|>",
                                       [int(g.prod()) // self.merge**2 for g in out["image_grid_thw"]])
            grids += [(1, g) for g in out["image_grid_thw"]]
        if video is not None:
            pix, thw = video_pixels(list(video), self.image_processor)
            inputs["pixel_values_videos"], inputs["video_grid_thw"] = pix, thw
            parts = text.split("<|video_pad|>")
            if len(parts) != 2:
                raise ValueError(f"the chat template produced {len(parts) - 1} <|video_pad|> placeholders for 1 video")
            text = parts[0] + self._video_text(thw[0], video, kwargs.get("fps")) + parts[1]
            grids.append((2, thw[0]))

        input_ids, instruction = self._tokenize(text, question)
        mask = torch.ones_like(input_ids)
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        mm_types = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
        inputs.update(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types)

        dev, inner = self.device, self.model.model
        embeds = inner.get_input_embeddings()(input_ids.to(dev))
        deepstack: list[list[Tensor]] = []  # per source (images, then video), per level: [n, D]
        for key, grid_key, token in (("pixel_values", "image_grid_thw", image_id),
                                     ("pixel_values_videos", "video_grid_thw", video_id)):
            if key not in inputs:
                continue
            encode = inner.get_image_features if key == "pixel_values" else inner.get_video_features
            feats = encode(inputs[key].to(dev), inputs[grid_key].to(dev))
            embeds = embeds.masked_scatter((input_ids == token).to(dev)[..., None],
                                           torch.cat(list(feats.pooler_output), 0).to(embeds.dtype))
            deepstack.append([torch.cat(list(level), 0).to(embeds.dtype) for level in feats.deepstack_features])
        # images precede the video in the sequence (the user turn puts them first): concatenating in
        # source order gives the features in visual-token order
        residuals = {l: torch.cat([src[l] for src in deepstack], 0) for l in range(len(deepstack[0]))} \
            if deepstack else {}
        position_ids, _ = inner.get_rope_index(
            input_ids, mm_token_type_ids=mm_types, attention_mask=mask,
            **{k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs})

        visual_pos = torch.nonzero(mm_types[0] > 0).flatten()
        visual_grid = self._grid(grids)
        if len(visual_grid) != len(visual_pos):  # pragma: no cover - defensive
            raise RuntimeError("visual token count does not match the grids")
        return Prompt(input_ids=input_ids, inputs_embeds=embeds, position_ids=position_ids.cpu(),
                      attention_mask=mask, visual_pos=visual_pos, visual_grid=visual_grid,
                      instruction=instruction, question=question,
                      media=images + ([list(video)] if video is not None else []), model_inputs=inputs,
                      visual_residuals=residuals)
