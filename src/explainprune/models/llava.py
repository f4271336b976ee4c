"""LLaVA-1.5 / VILA-style models: a fixed number of tokens per image; a video is a list of frames, each
given to the model as one image (VILA's way). 1-D positions, kept per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from explainprune.models.base import VLM, Prompt, as_images, expand_placeholders
from explainprune.models.llava_onevision import _grid


class Llava(VLM):
    """Adapter for ``llava`` checkpoints (CLIP/SigLIP tower + projector + any causal LM)."""

    model_types = ("llava",)
    family = "llava"

    @classmethod
    def _load(cls, path, **options):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(path, **options)

    @classmethod
    def _processor_class(cls) -> type:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil

    @torch.no_grad()
    def prepare(self, images: Any = None, video: Any = None, question: str = "", fps: float | None = None) -> Prompt:
        """Build the Prompt for ``images`` (one or a list) and/or ``video`` (frames, one image each);
        ``fps`` is unused (no time positions)."""
        question = self.clean_question(question)
        pictures = as_images(images) + as_images(list(video) if video is not None else None)
        text = self._render_media(len(pictures), False, question)
        inner, dev = self.model.model, self.device
        inputs: dict[str, Any] = {}
        feats = []
        if pictures:
            out = self.image_processor(images=pictures, return_tensors="pt")
            inputs["pixel_values"] = out["pixel_values"]
            c = self.config
            feats = list(inner.get_image_features(
                out["pixel_values"].to(dev), vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=c.vision_feature_select_strategy).pooler_output)
            text = expand_placeholders(text, "<image>", [len(f) for f in feats])
        input_ids, instruction = self._tokenize(text, question)
        mask = torch.ones_like(input_ids)
        inputs.update(input_ids=input_ids, attention_mask=mask)
        embeds = inner.get_input_embeddings()(input_ids.to(dev))
        is_visual = input_ids == self.config.image_token_index
        grids = []
        for i, f in enumerate(feats):
            side = math.isqrt(len(f))
            if side * side == len(f):
                grids.append(_grid(i, side, side, False))
            else:  # a tower whose token count is not a square: one row
                grids.append(_grid(i, 1, len(f), False))
        if feats:
            embeds = embeds.masked_scatter(is_visual.to(dev)[..., None], torch.cat(feats).to(embeds.dtype))
        return Prompt(input_ids=input_ids, inputs_embeds=embeds,
                      position_ids=torch.arange(input_ids.shape[1])[None], attention_mask=mask,
                      visual_pos=torch.nonzero(is_visual[0]).flatten(),
                      visual_grid=torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long),
                      instruction=instruction, question=question, media=pictures, model_inputs=inputs)
