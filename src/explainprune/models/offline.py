"""Offline tokenizers and chat templates for tiny models (tests, benchmarks, the shipped demo model).

Nothing here downloads: a word-level `tokenizers` model is wrapped in `PreTrainedTokenizerFast`, with the
special tokens each model family expects. The tiny test checkpoints carry the chat templates the real hub
checkpoints ship (copied below, sources named), and LLaVA-1.5's tokenizer adds ``<s>`` as the Llama
tokenizer does, so a prompt is built exactly as for a real checkpoint. The demo model keeps its own
small template (``DEMO_CHAT_TEMPLATE``), which it was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

# Special tokens per family (the strings real checkpoints use), and the pad/eos roles among them.
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]  # Llama / Vicuna (LLaVA-1.5)
LLAVA_ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]  # Qwen2

# The demo model's template (it was trained with it; kept so the shipped model answers as it always did).
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct chat_template.json (the same template).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The shape of Qwen/Qwen3-VL-*-Instruct's chat template for single-turn user messages of images, videos and
# text: ChatML with no default system prompt (the real template also renders tools and reasoning, unused here).
# Written from the published template's output, not copied from the file (not downloadable here).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-1.5-7b-hf chat_template.json ("USER: <image>\n... ASSISTANT:"; the tokenizer adds <s>).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-onevision-qwen2-7b-ov-hf chat_template.json (written by transformers'
# convert_llava_onevision_weights_to_hf.py).
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

BASIC_WORDS = [
    "user", "assistant", "system", "what", "digit", "is", "in", "row", "column", "frame", "the", "how",
    "many", "are", "there", "cell", "red", "green", "blue", "yes", "no", "a", "an", "of", "describe",
    "image", "video", "color", "?", ",", ".", "none", "blank",
    *[str(i) for i in range(20)],
    "You", "helpful", "USER", "ASSISTANT", ":",  # the real templates' words (system prompt, LLaVA-1.5 roles)
]


def word_tokenizer(
    words: Iterable[str] = BASIC_WORDS,
    special_tokens: Iterable[str] = QWEN_SPECIALS,
    chat_template: str = DEMO_CHAT_TEMPLATE,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    bos_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: specials first (ids 0..S-1), then `<unk>`, then `words` in order.

    With ``bos_token`` the tokenizer prepends it when ``add_special_tokens=True`` (a post-processor, as
    Llama's tokenizer does); without, it adds nothing (as Qwen2's tokenizer).
    """
    specials = list(dict.fromkeys([*special_tokens, *([bos_token] if bos_token else [])]))
    vocab: dict[str, int] = {}
    for token in [*specials, "<unk>", *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if bos_token:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, vocab[bos_token])])
    roles = {"eos_token": eos_token, "pad_token": pad_token, **({"bos_token": bos_token} if bos_token else {})}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", **roles,
        additional_special_tokens=[s for s in specials if s not in roles.values()],
    )
    fast.chat_template = chat_template
    return fast


def save_checkpoint_dir(model: Any, tok: Any, image_processor: Any, path: str | Path,
                        generation: dict[str, Any] | None = None) -> Path:
    """Write a loadable checkpoint directory (weights, tokenizer, chat template, image processor).

    ``generation``: fields set on the saved ``generation_config.json`` (e.g. ``repetition_penalty``, sampling
    fields, a list of ``eos_token_id``s; token strings stand for their ids), as real checkpoints ship them.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    def token_id(v: Any) -> Any:
        return tok.convert_tokens_to_ids(v) if isinstance(v, str) else v

    for key, value in (generation or {}).items():
        if key.endswith("token_id"):  # token strings stand for their ids
            value = [token_id(v) for v in value] if isinstance(value, (list, tuple)) else token_id(value)
        setattr(model.generation_config, key, value)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path
