"""Offline tokenizers and chat templates for tiny models (tests, benchmarks, the shipped demo model).

Nothing here downloads: a word-level `tokenizers` model is wrapped in `PreTrainedTokenizerFast`, with the
special tokens each model family expects and a small chat template in the family's format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Special tokens per family (the strings real checkpoints use), and the pad/eos roles among them.
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]

# Chat templates in each family's shape (written for these tiny tokenizers; real checkpoints ship their own).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BASIC_WORDS = [
    "user", "assistant", "system", "what", "digit", "is", "in", "row", "column", "frame", "the", "how",
    "many", "are", "there", "cell", "red", "green", "blue", "yes", "no", "a", "an", "of", "describe",
    "image", "video", "color", "?", ",", ".", "none", "blank",
    *[str(i) for i in range(20)],
]


def word_tokenizer(
    words: Iterable[str] = BASIC_WORDS,
    special_tokens: Iterable[str] = QWEN_SPECIALS,
    chat_template: str = QWEN_CHAT_TEMPLATE,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: specials first (ids 0..S-1), then `<unk>`, then `words` in order."""
    specials = list(dict.fromkeys(special_tokens))
    vocab: dict[str, int] = {}
    for token in [*specials, "<unk>", *words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token=eos_token, pad_token=pad_token,
        additional_special_tokens=[s for s in specials if s not in (eos_token, pad_token)],
    )
    fast.chat_template = chat_template
    return fast


def save_checkpoint_dir(model: Any, tok: Any, image_processor: Any, path: str | Path) -> Path:
    """Write a loadable checkpoint directory (weights, tokenizer, chat template, image processor)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path
