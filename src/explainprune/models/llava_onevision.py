"""LLaVA-OneVision: anyres images (a base view plus unpadded high-resolution tiles with a newline token
per row) and videos (frames pooled 2x2, one newline at the end). 1-D positions, kept per token.

The token count of an image comes from the model's own ``get_image_features`` (so it always matches what
the model expects); the (view, row, column) of each token is recomputed with transformers' own anyres
helpers. Views are numbered as frames: 0 = base view, 1 = high-resolution view.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt, as_images, expand_placeholders, to_pil


def frame_pixels(frames: list[Any], processor: Any, size: int) -> Tensor:
    """Video frames resized to ``size`` x ``size``, rescaled and normalised: Tensor[1, T, C, size, size]."""
    from transformers.image_processing_utils import SizeDict

    if len(frames) == 0:
        raise ValueError("video must hold at least one frame")
    out = []
    for frame in frames:
        img = np.asarray(to_pil(frame), dtype=np.float32).transpose(2, 0, 1)
        img = processor.resize(img, size=SizeDict(height=size, width=size), resample=processor.resample)
        img = processor.rescale(img, processor.rescale_factor)
        img = processor.normalize(img, processor.image_mean, processor.image_std)
        out.append(np.asarray(img, dtype=np.float32))
    return torch.from_numpy(np.stack(out))[None]


def _grid(frame: int, rows: int, cols: int, newline: bool) -> Tensor:
    """(frame, row, col) of a rows x cols grid in row-major order, a (frame, -1, -1) newline after each row."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    g = torch.stack([torch.full_like(r, frame), r, c], -1)  # rows, cols, 3
    if newline:
        g = torch.cat([g, torch.tensor([frame, -1, -1]).expand(rows, 1, 3)], 1)
    return g.reshape(-1, 3)


class LlavaOnevision(VLM):
    """Adapter for ``llava_onevision`` checkpoints."""

    model_types = ("llava_onevision",)
    family = "llava_onevision"

    @classmethod
    def _load(cls, path, **options):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration.from_pretrained(path, **options)

    @classmethod
    def _processor_class(cls) -> type:
        from transformers import LlavaOnevisionImageProcessorPil

        return LlavaOnevisionImageProcessorPil

    def _feature_kwargs(self) -> dict[str, Any]:
        c = self.config
        return {"vision_feature_layer": c.vision_feature_layer,
                "vision_feature_select_strategy": c.vision_feature_select_strategy}

    @torch.no_grad()
    def prepare(self, images: Any = None, video: Any = None, question: str = "", fps: float | None = None) -> Prompt:
        """Build the Prompt for ``images`` (one or a list) and/or ``video`` (a list of frames);
        ``fps`` is unused (no time positions)."""
        question = self.clean_question(question)
        images = as_images(images)
        text = self._render_media(len(images), video is not None, question)
        inner, dev = self.model.model, self.device
        inputs: dict[str, Any] = {}
        feats: list[Tensor] = []
        grids: list[Tensor] = []
        if images:
            out = self.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"], inputs["image_sizes"] = out["pixel_values"], out["image_sizes"]
            inputs["batch_num_images"] = torch.tensor([len(images)])
            image_feats = inner.get_image_features(
                out["pixel_values"].to(dev), out["image_sizes"], vision_aspect_ratio=self.config.vision_aspect_ratio,
                batch_num_images=inputs["batch_num_images"], **self._feature_kwargs()).pooler_output
            image_feats = list(image_feats)
            text = expand_placeholders(text, "<image>", [len(f) for f in image_feats])
            feats += image_feats
            frame0 = 0
            for i, f in enumerate(image_feats):
                g = self._image_grid(out["image_sizes"][i], len(f), len(images) > 1, frame0)
                grids.append(g)
                frame0 = int(g[:, 0].max()) + 1
        if video is not None:
            size = self.config.vision_config.image_size
            pix = frame_pixels(list(video), self.image_processor, size)
            inputs["pixel_values_videos"] = pix
            video_feats = inner.get_video_features(pix.to(dev), **self._feature_kwargs()).pooler_output[0]
            text = expand_placeholders(text, "<video>", [len(video_feats)])
            feats.append(video_feats)
            side = math.ceil(size // self.config.vision_config.patch_size / 2)
            frame0 = int(grids[-1][:, 0].max()) + 1 if grids else 0
            g = torch.cat([_grid(frame0 + t, side, side, False) for t in range(pix.shape[1])])
            grids.append(torch.cat([g, torch.tensor([[frame0 + pix.shape[1] - 1, -1, -1]])]))

        input_ids, instruction = self._tokenize(text, question)
        mask = torch.ones_like(input_ids)
        inputs.update(input_ids=input_ids, attention_mask=mask)
        embeds = inner.get_input_embeddings()(input_ids.to(dev))
        is_visual = (input_ids == self.config.image_token_index) | (input_ids == self.config.video_token_index)
        if feats:
            embeds = embeds.masked_scatter(is_visual.to(dev)[..., None], torch.cat(feats).to(embeds.dtype))
        visual_pos = torch.nonzero(is_visual[0]).flatten()
        visual_grid = torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long)
        return Prompt(input_ids=input_ids, inputs_embeds=embeds,
                      position_ids=torch.arange(input_ids.shape[1])[None], attention_mask=mask,
                      visual_pos=visual_pos, visual_grid=visual_grid, instruction=instruction, question=question,
                      media=images + ([list(video)] if video is not None else []), model_inputs=inputs)

    def _image_grid(self, image_size: Tensor, count: int, multi: bool, frame0: int) -> Tensor:
        """Coordinates of one image's packed features (base view, then unpadded tiles with newlines)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        base = _grid(frame0, side, side, False)
        if multi or count == side * side + 1:  # one view and a newline
            return torch.cat([base, torch.tensor([[frame0, -1, -1]])])[:count]
        nh, nw = get_anyres_image_grid_shape(image_size.tolist(), self.config.image_grid_pinpoints, vc.image_size)
        h, w = unpad_image(torch.zeros(1, nh * side, nw * side), image_size).shape[1:]
        max_patches = int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(h * w / (max_patches * side**2))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
        g = torch.cat([base, _grid(frame0 + 1, h, w, True)])
        if len(g) != count:  # pragma: no cover - defensive
            raise RuntimeError(f"LLaVA-OneVision layout mismatch: {len(g)} coordinates for {count} tokens")
        return g
