"""The adapter protocol every model family implements, and the Prompt it produces.

An adapter cuts the model at transformers' own seam: the vision tower's features are scattered into their
placeholder tokens (``get_image_features`` -> ``masked_scatter``), and everything after that is the
unchanged language model fed with ``inputs_embeds``. Pruning visual tokens is then just dropping rows
of ``inputs_embeds`` while keeping every remaining token's ORIGINAL position id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from explainprune.models.batching import (  # noqa: F401  (pad_left, visual_targets: also imported from here)
    VisualResiduals,
    kept_rows,
    pad_left,
    pad_left_ids,
    visual_targets,
)
from explainprune.validation import check_pixel_range, check_prompt_length


@dataclass
class Prompt:
    """One prepared input, before the language model.

    Shapes (L = sequence length, D = hidden size, N_v = visual tokens):
      input_ids      LongTensor[1, L]   token ids (visual placeholders included)
      inputs_embeds  Tensor[1, L, D]    text embeddings with the visual features scattered in
      position_ids   LongTensor[3, 1, L] (M-RoPE) or LongTensor[1, L]; the ORIGINAL positions
      attention_mask LongTensor[1, L]
      visual_pos     LongTensor[N_v]    sequence index of each visual token
      visual_grid    LongTensor[N_v, 3] (frame, row, column) of each visual token on the token grid
                                        (row/column -1 for tokens off the grid, e.g. LLaVA-OV newlines)
      instruction    (start, end)       span of the user's text after the visual block
      visual_residuals {layer l: Tensor[N_v, D]} added to decoder layer l's OUTPUT at the visual tokens
                     (Qwen3-VL's DeepStack features; empty for the other families). Pruned tokens drop
                     their rows here too (``VLM.generate`` / ``VLM.forward(prompt=...)`` apply them).
    """

    input_ids: Tensor
    inputs_embeds: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    visual_pos: Tensor
    visual_grid: Tensor
    instruction: tuple[int, int]
    question: str = ""
    media: list[Any] = field(default_factory=list, repr=False)
    model_inputs: dict[str, Any] = field(default_factory=dict, repr=False)
    visual_residuals: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_visual(self) -> int:
        return int(self.visual_pos.numel())

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """(frames, rows, columns) spanned by the on-grid visual tokens."""
        g = self.visual_grid[self.visual_grid[:, 1] >= 0]
        if g.numel() == 0:
            return (0, 0, 0)
        return (int(g[:, 0].max()) + 1, int(g[:, 1].max()) + 1, int(g[:, 2].max()) + 1)

    def kept_positions(self, keep: Tensor | None) -> Tensor:
        """Sequence indices that survive when only visual tokens ``keep`` (indices into 0..N_v-1) are kept."""
        if keep is None:
            return torch.arange(self.length)
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().cpu()  # indices may come from any device
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= self.num_visual):
            raise ValueError(
                f"keep holds indices outside 0..{self.num_visual - 1} (the prompt has {self.num_visual} "
                f"visual tokens); got min {int(keep.min())}, max {int(keep.max())}"
            )
        is_visual = torch.zeros(self.length, dtype=torch.bool)
        is_visual[self.visual_pos] = True
        kept_visual = torch.zeros(self.length, dtype=torch.bool)
        kept_visual[self.visual_pos[keep]] = True
        return torch.nonzero(~is_visual | kept_visual).flatten()


@dataclass
class GenerationResult:
    """Greedy (or sampled) output of one prompt: new tokens only, EOS included when produced."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    visual_tokens: int
    logits: Tensor | None = field(default=None, repr=False)  # [new tokens, vocab] when output_logits=True


class Video(list):
    """The frames of one video (a list, so it goes wherever a list of frames goes) and ``fps``, the rate of
    the SAMPLED frames in frames per second of the source (8 frames evenly over 60 s: 8/60); None = unknown.
    Qwen2.5-VL spaces its temporal positions by it (``sources.read_video`` returns one)."""

    def __init__(self, frames: Iterable[Any] = (), fps: float | None = None):
        super().__init__(frames)
        self.fps = None if fps is None else float(fps)



def text_attention(implementation: str | dict) -> str | dict:
    """The ``attn_implementation`` handed to ``from_pretrained``: "eager" applies to the language model only
    (the vision tower stays on sdpa, whose memory is linear in the patches: eager's [heads, S, S] maps of a
    15K-token image are ~460 GB). Relevance switches the text decoder to eager by itself; a dict passes on."""
    if implementation == "eager":
        return {"text_config": "eager", "vision_config": "sdpa"}
    return implementation

class VLM:
    """A loaded multimodal model behind the adapter protocol.

    Subclasses set ``model_types`` and implement ``prepare`` and ``_load``; everything after ``prepare``
    (pruned generation, language-model access) is shared.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    active_residuals: VisualResiduals | None = None

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, chat_template: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ValueError("the checkpoint has no chat template (chat_template.jinja or tokenizer_config.json)")

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str = "auto",
                        device: str | torch.device | None = None, device_map: str | dict | None = None,
                        attn_implementation: str = "sdpa", revision: str | None = None,
                        trust_remote_code: bool = False, **processor_options: Any) -> VLM:
        """Load ``path`` (a directory or a hub id; see ``explainprune.load``). With ``device_map`` the model
        is placed by accelerate and not moved; otherwise it goes to ``device`` (default cpu)."""
        from transformers import AutoTokenizer

        from explainprune.models.hub import checkpoint_file

        image_processor = cls._image_processor(path, revision=revision,
                                               **check_processor_options(cls._processor_class(), processor_options))
        check_pixel_range(image_processor, cls.family)  # before the weights load
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        templates = {name: checkpoint_file(path, name, revision=revision, required=False)
                     for name in ("chat_template.jinja", "chat_template.json")}
        options = {"device_map": device_map} if device_map is not None else {}
        if device_map is None and device is not None and torch.device(device).type != "cpu":
            # straight onto the device: each weight is read from the checkpoint into device memory (one
            # device, so no accelerate hooks), not a whole CPU copy first (16 GB of host memory for a 7B)
            options = {"device_map": {"": torch.device(device)}}
        model = cls._load(path, dtype=dtype, attn_implementation=text_attention(attn_implementation),
                          revision=revision, trust_remote_code=trust_remote_code, **options)
        if device_map is None:
            model = model.to(device or "cpu")  # a no-op after a device load
        return cls(model.eval(), tokenizer, image_processor, _read_chat_template(templates, tokenizer))

    @classmethod
    def _load(cls, path, **options):  # pragma: no cover - abstract
        """The model, from ``model_class.from_pretrained(path, **options)``."""
        raise NotImplementedError

    @classmethod
    def _processor_class(cls) -> type:  # pragma: no cover - abstract
        """The (PIL) image-processor class of the family."""
        raise NotImplementedError

    @classmethod
    def _image_processor(cls, path, **options):
        return cls._processor_class().from_pretrained(path, **options)

    # -- the protocol --------------------------------------------------------------------------------
    def prepare(self, images: Any = None, video: Any = None, question: str = "", fps: float | None = None) -> Prompt:
        """The Prompt for ``images`` (one image or a list), ``video`` (a list of frames or a ``Video``) and
        ``question``. ``fps``: the rate the frames were sampled at (families with time positions use it; the
        others ignore it). No other keywords: a misspelt one (``image=``) is an error, not a text-only prompt."""
        raise NotImplementedError

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> Any:
        """The decoder stack (embeddings, ``layers``, ``norm``, ``rotary_emb``) below the LM head."""
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first layer when sharded by device_map)."""
        return self.model.get_input_embeddings().weight.device

    def fingerprint(self) -> dict[str, Any]:
        """What a compressor trained for this model must match."""
        t = self.text_config
        return {"model_type": self.config.model_type, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "hidden_size": t.hidden_size}

    def clean_question(self, question: str) -> str:
        """``question`` without media placeholders typed into it (LLaVA-format data: ``"<image>\\nWhat is ..."``).

        The media go where the chat template puts them, so a placeholder in the text (``<image>``, ``<video>``,
        or this family's own, e.g. ``<|vision_start|><|image_pad|><|vision_end|>``) is removed with the
        blanks and one line break around it. A question without placeholders is returned unchanged.
        """
        tokens = {"<image>", "<video>"}
        for key in ("image_token_id", "video_token_id", "image_token_index", "video_token_index"):
            token_id = getattr(self.config, key, None)
            if isinstance(token_id, int):
                tokens.add(self.tokenizer.convert_ids_to_tokens(token_id))
        alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
        pattern = rf"[ \t]*(?:<\|vision_start\|>)?(?:{alternatives})(?:<\|vision_end\|>)?[ \t]*\n?"
        cleaned, count = re.subn(pattern, " ", question)
        return re.sub(r"[ \t]{2,}", " ", cleaned).strip() if count else question

    def _render_media(self, num_images: int, video: bool, question: str) -> str:
        """The chat-templated user turn: ``num_images`` images, then the video if any, then the question."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        if video:
            content.append({"type": "video"})
        content.append({"type": "text", "text": question})
        return self._render(content)

    def _render(self, content: list[dict[str, Any]]) -> str:
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def _tokenize(self, text: str, question: str) -> tuple[Tensor, tuple[int, int]]:
        """Token ids of ``text`` and the token span of the last occurrence of ``question`` in it.

        Special tokens are added as the family's processor adds them (``ProcessorMixin.apply_chat_template``
        tokenizes with ``add_special_tokens`` unless the rendered text already starts with BOS): LLaVA-1.5's
        Llama tokenizer prepends ``<s>``, which its chat template does not write; Qwen2's adds nothing.
        """
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special)
        ids = torch.tensor([enc["input_ids"]], dtype=torch.long)
        check_prompt_length(ids.shape[1], self.text_config)  # before the vision tower runs
        q_start = text.rfind(question) if question else -1
        if q_start < 0:
            return ids, (ids.shape[1], ids.shape[1])
        q_end = q_start + len(question)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= q_start and b <= q_end]
        if not inside:
            return ids, (ids.shape[1], ids.shape[1])
        return ids, (inside[0], inside[-1] + 1)

    # -- pruned generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: Prompt | list[Prompt], keep: Tensor | None | list[Tensor | None] = None,
                 max_new_tokens: int = 16, **generate_kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Generate from ``prompt`` keeping only visual tokens ``keep`` (None keeps all).

        A list of prompts (with a list of keeps) runs as one left-padded batch. The model's own ``generate``
        is called with ``inputs_embeds`` (used for prefill), the kept tokens' ``input_ids`` (what the logits
        processors see: the checkpoint's ``repetition_penalty`` counts the prompt's tokens as with
        ``model.generate(**processor_inputs)``), their original ``position_ids`` and the attention mask.

        Decoding is greedy by default (``do_sample=False``: evaluations are deterministic); every other
        field of the checkpoint's ``generation_config`` applies (repetition penalty, all its EOS ids). Pass
        ``do_sample=True`` to sample with the checkpoint's temperature / top_p / top_k, or any other
        ``generate`` option. With keep=None the tokens equal ``model.generate(**prompt.model_inputs,
        do_sample=False)`` (tested). In a padded batch the penalty also counts the pad id, as
        ``model.generate`` on a padded batch does.
        """
        single = isinstance(prompt, Prompt)
        prompts = [prompt] if single else list(prompt)
        if single:
            keeps = [keep]
        elif keep is None:
            keeps = [None] * len(prompts)
        else:
            keeps = list(keep)
        if len(keeps) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(keeps)} keep entries")
        rows = kept_rows(prompts, keeps)  # once: the batch, its ids, the residual rows and the counts use it
        embeds, mask, pos = pad_left(prompts, keeps, rows)
        ids = pad_left_ids(prompts, keeps, self.pad_token_id, rows)
        dev = self.device
        options = {"do_sample": False, "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_ids,
                   **generate_kwargs}
        if options.get("output_logits"):
            options["return_dict_in_generate"] = True
        with self.residuals(prompts, keeps, rows=rows):
            out = self.model.generate(input_ids=ids.to(dev), inputs_embeds=embeds.to(dev),
                                      attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                      max_new_tokens=max_new_tokens, **options)
        sequences = out.sequences if hasattr(out, "sequences") else out
        sequences = sequences[:, ids.shape[1]:]  # the prompt's ids come back first
        step_logits = getattr(out, "logits", None)
        results = []
        for b in range(len(prompts)):
            new_ids = _cut_at_eos(sequences[b].tolist(), self.eos_token_ids)
            logits = torch.stack([s[b] for s in step_logits])[: len(new_ids)].cpu() if step_logits else None
            results.append(GenerationResult(
                text=self.tokenizer.decode(new_ids, skip_special_tokens=True).strip(), token_ids=new_ids,
                prompt_tokens=int(mask[b].sum()), visual_tokens=len(rows[b])
                - (prompts[b].length - prompts[b].num_visual), logits=logits))
        return results[0] if single else results

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def pad_token_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        return int(pad)

    def forward(self, embeds: Tensor, position_ids: Tensor, attention_mask: Tensor, prompt: Prompt | None = None,
                keep: Tensor | None = None, **kwargs: Any) -> Any:
        """One language-model forward on prepared (possibly pruned) inputs; returns the model output.

        ``prompt``: the Prompt ``embeds`` starts with (its tokens, or with ``keep`` the kept ones as
        ``pad_left`` gathers them; possibly followed by more, e.g. answer tokens); its ``visual_residuals``
        are then applied at the kept visual rows (needed for Qwen3-VL; a no-op elsewhere)."""
        with self.residuals([prompt] if prompt is not None else [], [keep], length=embeds.shape[1]):
            return self.model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                              **kwargs)

    @contextmanager
    def residuals(self, prompts: list[Prompt], keeps: list[Tensor | None], length: int | None = None,
                  rows: list[Tensor] | None = None) -> Iterator[VisualResiduals | None]:
        """Inside the block, forwards of the batch ``pad_left(prompts, keeps)`` get the prompts'
        ``visual_residuals`` (Qwen3-VL DeepStack) at their kept visual rows; ``self.active_residuals`` is the
        state (None when the prompts have none). Hooks are removed on exit."""
        if not prompts or not prompts[0].visual_residuals:
            yield None
            return
        state = VisualResiduals(self.language_model.layers, prompts, visual_targets(prompts, keeps, length, rows))
        self.active_residuals = state
        try:
            yield state
        finally:
            state.remove()
            self.active_residuals = None


def to_pil(x: Any) -> Image.Image:
    """An RGB PIL image from a PIL image (16-bit and float modes scaled to 8 bits, as ``images.to_rgb``) or an
    array (HWC or CHW; uint8, or floats in [0, 1] or [0, 255])."""
    if isinstance(x, Image.Image):
        from explainprune.images import to_rgb

        return to_rgb(x)
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr.squeeze() if arr.shape[-1] == 1 else arr).convert("RGB")


def as_images(images: Any) -> list[Image.Image]:
    """None, one image, or a list/tuple of images -> a list of RGB PIL images."""
    if images is None:
        return []
    return [to_pil(im) for im in (images if isinstance(images, (list, tuple)) else [images])]


def expand_placeholders(text: str, token: str, counts: list[int]) -> str:
    """Replace the i-th ``token`` placeholder in ``text`` by ``counts[i]`` copies (as the processors do)."""
    parts = text.split(token)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"the chat template produced {len(parts) - 1} {token} placeholders for {len(counts)} inputs")
    return "".join(p + token * n for p, n in zip(parts, counts)) + parts[-1]


def _cut_at_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


# per-call settings of an image processor, not options of the loaded processor
_CALL_ONLY = frozenset({"return_tensors", "data_format", "input_data_format", "device"})


def check_processor_options(processor_class: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` unchanged when ``processor_class`` accepts them all; ValueError naming the rest otherwise."""
    accepted = sorted({k for t in getattr(processor_class, "valid_kwargs", dict).__mro__
                       for k in getattr(t, "__annotations__", {})} - _CALL_ONLY)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for load(): not a load option (dtype, device, device_map, "
            f"attn_implementation, revision, trust_remote_code) nor an option of {processor_class.__name__} "
            f"({', '.join(accepted)})")
    return options


def _read_chat_template(files: dict[str, Path | None], tokenizer: Any) -> str | None:
    """The chat template a checkpoint ships: chat_template.jinja, chat_template.json, or the tokenizer's.
    ``files`` maps those file names to their resolved local paths (None when the checkpoint lacks one)."""
    if files.get("chat_template.jinja"):
        return Path(files["chat_template.jinja"]).read_text()
    if files.get("chat_template.json"):
        return json.loads(Path(files["chat_template.json"]).read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None)
