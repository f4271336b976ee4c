"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution images and videos with 3-D M-RoPE positions.

Images go through the PIL image processor; video frames are resized and normalised by the same processor
and patchified here with ``temporal_patch_size`` (this reproduces the video processor's tensors, which
need torchvision). Positions come from the model's own ``get_rope_index`` and are kept per token.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt, Video, as_images, expand_placeholders, to_pil

# Qwen's default video sampling rate (qwen-vl-utils' FPS): a list of frames of unknown rate is taken as
# sampled at 2 frames per second, i.e. one temporal patch of 2 frames per second.
DEFAULT_VIDEO_FPS = 2.0


def video_pixels(frames: list[Any], processor: Any) -> tuple[Tensor, Tensor]:
    """Qwen video pixel values [T/tp * gh * gw, C * tp * p * p] and grid [1, 3] from a list of frames.

    Every frame is resized to the first frame's smart-resized size (a video has one size; frames of other
    sizes are brought to it), rescaled and normalised as the image processor does; the frame count is padded
    to a multiple of ``temporal_patch_size`` by repeating the last frame, as Qwen's video processor does.
    """
    from transformers.image_processing_backends import PilBackend
    from transformers.image_processing_utils import SizeDict
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if len(frames) == 0:
        raise ValueError("video must hold at least one frame")
    ps, ms, tp = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    size = SizeDict(**processor.size) if isinstance(processor.size, dict) else processor.size
    arrays, target = [], None
    for frame in frames:
        img = np.asarray(to_pil(frame), dtype=np.float32).transpose(2, 0, 1)
        if target is None:
            h, w = smart_resize(*img.shape[1:], factor=ps * ms, min_pixels=size.shortest_edge,
                                max_pixels=size.longest_edge)
            target = SizeDict(height=h, width=w)
        img = PilBackend.resize(processor, img, size=target, resample=processor.resample)
        img = processor.rescale(img, processor.rescale_factor)
        img = processor.normalize(img, processor.image_mean, processor.image_std)
        arrays.append(np.asarray(img, dtype=np.float32))
    while len(arrays) % tp:
        arrays.append(arrays[-1])
    video = np.stack(arrays)  # T, C, H, W
    t, c, h, w = video.shape
    gt, gh, gw = t // tp, h // ps, w // ps
    patches = video.reshape(gt, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, c * tp * ps * ps)
    return torch.from_numpy(np.ascontiguousarray(flat)), torch.tensor([[gt, gh, gw]])


def _video_fps(video: Any, fps: float | None) -> float:
    """The sampled fps of ``video``: ``fps`` if given, else ``video.fps`` (a ``Video``), else the default."""
    rate = fps if fps is not None else getattr(video, "fps", None)
    rate = DEFAULT_VIDEO_FPS if rate is None else float(rate)
    if not rate > 0:
        raise ValueError(f"fps must be a positive number of sampled frames per second; got {rate}")
    return rate


def _kept_video(video: Any, fps: float | None) -> Video:
    """The video as ``Prompt.media`` keeps it: its frames, the rate they were sampled at (``fps``, else the
    ``Video``'s) and, with no ``fps`` given, a clip's ``timestamps``: enough to prepare it again (downsample)."""
    kept = Video(video, fps=fps if fps is not None else getattr(video, "fps", None))
    if fps is None and getattr(video, "timestamps", None) is not None:
        kept.timestamps = list(video.timestamps)
    return kept


class Qwen2VL(VLM):
    """Adapter for ``qwen2_vl`` and ``qwen2_5_vl`` checkpoints."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    family = "qwen2_vl"
    model_classes: ClassVar[dict[str, str]] = {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

    @classmethod
    def _load(cls, path, **options):
        """The transformers class named in ``model_classes`` for the checkpoint's model_type."""
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=options.get("revision"),
                                            trust_remote_code=options.get("trust_remote_code", False))
        model_cls = getattr(transformers, cls.model_classes[config.model_type])
        return model_cls.from_pretrained(path, config=config, **options)

    @classmethod
    def _processor_class(cls) -> type:
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil

    @property
    def merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @torch.no_grad()
    def prepare(self, images: Any = None, video: Any = None, question: str = "", fps: float | None = None) -> Prompt:
        """Build the Prompt for ``images`` (one or a list) and/or ``video`` (a list of frames).

        ``fps``: the rate the video's frames were sampled at (frames per second of the source); default the
        ``fps`` of a ``Video``, else ``DEFAULT_VIDEO_FPS``. Qwen2.5-VL spaces temporal positions by
        ``temporal_patch_size / fps`` seconds per grid step (``second_per_grid_ts``, as its processor does).
        """
        question = self.clean_question(question)
        images = as_images(images)
        text = self._render_media(len(images), video is not None, question)

        inputs: dict[str, Any] = {}
        grids: list[tuple[int, Tensor]] = []  # (modality, thw) in sequence order
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"], inputs["image_grid_thw"] = out["pixel_values"], out["image_grid_thw"]
            text = expand_placeholders(text, "<|image_pad|>",
                                       [int(g.prod()) // self.merge**2 for g in out["image_grid_thw"]])
            grids += [(1, g) for g in out["image_grid_thw"]]
        if video is not None:
            pix, thw = video_pixels(list(video), self.image_processor)
            inputs["pixel_values_videos"], inputs["video_grid_thw"] = pix, thw
            text = self._video_text(text, thw[0], video, fps, inputs)
            grids.append((2, thw[0]))

        input_ids, instruction = self._tokenize(text, question)
        mask = torch.ones_like(input_ids)
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        mm_types = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
        inputs.update(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types)

        dev, inner = self.device, self.model.model
        embeds = inner.get_input_embeddings()(input_ids.to(dev))
        extras: list[list[Tensor]] = []  # per source (images, then the video): per level [n, D]
        for key, grid_key, token in (("pixel_values", "image_grid_thw", image_id),
                                     ("pixel_values_videos", "video_grid_thw", video_id)):
            if key in inputs:
                encode = inner.get_image_features if key == "pixel_values" else inner.get_video_features
                out = encode(inputs[key].to(dev), inputs[grid_key].to(dev))
                feats = torch.cat(list(out.pooler_output), 0).to(embeds.dtype)
                embeds = embeds.masked_scatter((input_ids == token).to(dev)[..., None], feats)
                extras.append([torch.cat(list(level), 0).to(embeds.dtype) for level in self._extra_features(out)])
        rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                       if k in inputs}
        position_ids, _ = inner.get_rope_index(input_ids, mm_token_type_ids=mm_types, attention_mask=mask,
                                               **rope_kwargs)

        visual_pos = torch.nonzero(mm_types[0] > 0).flatten()
        visual_grid = self._grid(grids)
        if len(visual_grid) != len(visual_pos):  # pragma: no cover - defensive
            raise RuntimeError("visual token count does not match the grids")
        # the user turn puts images before the video: sources concatenated in order = visual-token order
        residuals = {lvl: torch.cat([src[lvl] for src in extras], 0) for lvl in range(len(extras[0]))} \
            if extras and extras[0] else {}
        return Prompt(input_ids=input_ids, inputs_embeds=embeds, position_ids=position_ids.cpu(),
                      attention_mask=mask, visual_pos=visual_pos, visual_grid=visual_grid,
                      instruction=instruction, question=question,
                      media=images + ([_kept_video(video, fps)] if video is not None else []), model_inputs=inputs,
                      visual_residuals=residuals)

    def _video_text(self, text: str, thw: Tensor, video: Any, fps: float | None, inputs: dict[str, Any]) -> str:
        """``text`` with the video placeholder expanded (Qwen2.5-VL: ``second_per_grid_ts`` into ``inputs``)."""
        rate = _video_fps(video, fps)
        if self.config.model_type == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([self.image_processor.temporal_patch_size / rate])
        return expand_placeholders(text, "<|video_pad|>", [int(thw.prod()) // self.merge**2])

    def _extra_features(self, encoder_output: Any) -> list[Any]:
        """Per level, the vision features the LLM adds after its first layers (none for Qwen2-VL / 2.5-VL;
        Qwen3-VL's DeepStack): become ``Prompt.visual_residuals``."""
        return []

    def _grid(self, grids: list[tuple[int, Tensor]]) -> Tensor:
        """(frame, row, col) per merged token, in the merger's order (t, then row, then column)."""
        out, frame0 = [], 0
        for _, thw in grids:
            t, h, w = int(thw[0]), int(thw[1]) // self.merge, int(thw[2]) // self.merge
            f, r, c = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            out.append(torch.stack([f.flatten() + frame0, r.flatten(), c.flatten()], 1))
            frame0 += t
        return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long)

