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

from torch import Tensor

from explainprune.models.qwen2_vl import Qwen2VL, _video_fps


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
    model_classes = {"qwen3_vl": "Qwen3VLForConditionalGeneration",
                     "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

    def _video_text(self, text: str, thw: Tensor, video: Any, fps: float | None, inputs: dict[str, Any]) -> str:
        """The video placeholder of ``text`` as Qwen3VLProcessor writes it: per temporal frame ``<t seconds>``
        and a vision block of that frame's tokens."""
        parts = text.split("<|video_pad|>")
        if len(parts) != 2:
            raise ValueError(f"the chat template produced {len(parts) - 1} <|video_pad|> placeholders for 1 video")
        tp = int(self.image_processor.temporal_patch_size)
        times = getattr(video, "timestamps", None) if fps is None else None
        if times is None:
            rate = _video_fps(video, fps)
            times = [i / rate for i in range(len(video))]
        per_frame = int(thw[1] * thw[2]) // self.merge**2
        block = "<|vision_start|>" + "<|video_pad|>" * per_frame + "<|vision_end|>"
        frames = "".join(f"<{t:.1f} seconds>" + block for t in frame_timestamps(list(times), tp)[: int(thw[0])])
        return parts[0] + frames + parts[1]

    def _extra_features(self, encoder_output: Any) -> list[Any]:
        """DeepStack: one level per ``deepstack_visual_indexes`` entry, added after LLM layer 0, 1, ..."""
        return list(encoder_output.deepstack_features)
