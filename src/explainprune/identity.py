"""The identity of a model as loaded, so that a resumed run never mixes two models' outputs.

``model_identity(name_or_path, **load options)`` reads only small files (config, tokenizer and processor
configs, safetensors headers and a few bytes of every tensor), so it runs BEFORE the model loads;
``vlm_identity(vlm)`` gives the same dict for a loaded ``VLM``. The dict:

  weights              digest of the weight files: for safetensors the header (names, shapes, dtypes,
                       offsets) and the first and last 64 bytes of every tensor; other files their size and
                       64 sampled blocks. No path and no modification time: a moved or copied checkpoint
                       keeps its identity; another training of the same shape does not (every trained
                       tensor changes).
  config, tokenizer    digests of config.json (less its bookkeeping keys) and of the tokenizer / chat
                       template files
  dtype                the weights dtype the model runs in ("auto" resolved through config.json)
  attn_implementation  the attention kernel asked for
  processor            the image processor's size settings (Qwen's min/max pixels are
                       size.shortest_edge / size.longest_edge) and a digest of all its settings

``differences(old, new)`` names what differs between two such records ("model.dtype (float32 recorded,
now bfloat16)"). ``config_fingerprint`` is ``VLM.fingerprint()`` read from config.json alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version", "_commit_hash", "architectures")
EDGE = 64  # bytes read at the start and the end of every tensor
BLOCKS = 64  # blocks sampled from a weight file that is not safetensors


def _digest(data: Any) -> str:
    if not isinstance(data, bytes):
        data = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _safetensors(path: Path, h: Any) -> bool:
    """Feed the header and the edges of every tensor of a safetensors file to ``h``; False if unreadable."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n < 2**28:
                return False
            header = fh.read(n)
            meta = json.loads(header)
            h.update(header)
            spans = sorted(tuple(v["data_offsets"]) for k, v in meta.items() if k != "__metadata__")
            for a, b in spans:
                fh.seek(8 + n + a)
                h.update(fh.read(min(EDGE, b - a)))
                if b - a > EDGE:
                    fh.seek(8 + n + max(a + EDGE, b - EDGE))
                    h.update(fh.read(EDGE))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return True


def _sampled(path: Path, h: Any) -> None:
    """Feed the size and ``BLOCKS`` evenly spaced 4 KiB blocks of a file to ``h``."""
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        for k in range(BLOCKS + 1):
            fh.seek(max(0, min(size - 4096, size * k // BLOCKS)))
            h.update(fh.read(4096))


def weights_digest(folder: Path) -> str | None:
    """Digest of the weight files in ``folder`` (see the module docstring); None when it holds none."""
    files = sorted({p for g in WEIGHT_GLOBS for p in folder.glob(g) if p.is_file()})
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(f"\0{p.name}\0".encode())
        if p.name.endswith(".index.json"):
            h.update(p.read_bytes())
        elif not (p.suffix == ".safetensors" and _safetensors(p, h)):
            _sampled(p, h)
    return h.hexdigest()[:16]


def _config_digest(config: dict[str, Any]) -> str:
    return _digest({k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING})


def _files_digest(folder: Path, names: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in names:
        p = folder / name
        if p.is_file():
            h.update(f"\0{name}\0".encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _processor(image_processor: Any) -> dict[str, Any]:
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else {}
    size = settings.get("size")
    size = {k: v for k, v in dict(size).items() if v is not None} if isinstance(size, dict) else size
    return {"size": size, "settings": _digest(settings)}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _folder(name_or_path: Any, revision: str | None = None) -> Path:
    """The local folder holding the checkpoint's files (the snapshot folder for a hub id in the cache)."""
    from explainprune.models.hub import checkpoint_file, resolve

    source = resolve(name_or_path)
    return Path(checkpoint_file(source, "config.json", revision=revision)).parent


def _read_config(folder: Path) -> dict[str, Any]:
    from explainprune.errors import InputError

    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=path) from None
    if not isinstance(config, dict):
        raise InputError("is not a JSON object", file=path)
    return config


def _auto_dtype(folder: Path, revision: str | None = None) -> str:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(folder, revision=revision), "dtype", None)
    return _dtype_name(dtype) if dtype is not None else "float32"


def model_identity(name_or_path: Any, *, dtype: Any = "auto", attn_implementation: str = "sdpa",
                   revision: str | None = None, device: Any = None, device_map: Any = None,
                   trust_remote_code: bool = False, **processor_options: Any) -> dict[str, Any]:
    """The identity of ``explainprune.load(name_or_path, **options)``, from the checkpoint's small files
    (nothing is loaded; ``device`` / ``device_map`` do not change it)."""
    from explainprune.models import adapter_for
    from explainprune.models.base import check_processor_options

    folder = _folder(name_or_path, revision)
    config = _read_config(folder)
    adapter = adapter_for(str(config.get("model_type")))
    processor = adapter._image_processor(folder, revision=revision,
                                         **check_processor_options(adapter._processor_class(), processor_options))
    return {"weights": weights_digest(folder), "config": _config_digest(config),
            "tokenizer": _files_digest(folder, TOKENIZER_FILES),
            "dtype": _auto_dtype(folder, revision) if dtype in (None, "auto") else _dtype_name(dtype),
            "attn_implementation": attn_implementation, "processor": _processor(processor)}


def vlm_identity(vlm: Any) -> dict[str, Any]:
    """The identity of a loaded VLM (the same dict ``model_identity`` gives for how it was loaded); {} for an
    object without a transformers model (test doubles). A model built in memory is digested from its
    parameters instead of files."""
    import torch

    model = getattr(vlm, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        return {}
    config = model.config
    folder, files, name = None, None, str(getattr(config, "_name_or_path", "") or "")
    if name:
        try:
            folder = _folder(name, getattr(config, "_commit_hash", None))
            files = _read_config(folder)
        except (OSError, ValueError):
            folder, files = None, None
    if folder is not None and files is not None:
        weights, cfg = weights_digest(folder), _config_digest(files)
        tokenizer = _files_digest(folder, TOKENIZER_FILES)
    else:
        h = hashlib.sha256()
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes())
        weights, cfg = "memory:" + h.hexdigest()[:16], _config_digest(config.to_dict())
        tokenizer = _digest(str(getattr(vlm, "chat_template", "")))
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return {"weights": weights, "config": cfg, "tokenizer": tokenizer, "dtype": _dtype_name(model.dtype),
            "attn_implementation": attn, "processor": _processor(getattr(vlm, "image_processor", None))}


def config_fingerprint(name_or_path: Any, revision: str | None = None) -> dict[str, Any]:
    """``VLM.fingerprint()`` of the checkpoint, from its config.json alone (before loading)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_folder(name_or_path, revision), revision=revision)
    t = config.get_text_config()
    return {"model_type": config.model_type, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "hidden_size": t.hidden_size}


_MISSING = object()


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """What differs between two run records, nested keys joined by dots:
    ``["model.dtype (float32 recorded, now bfloat16)", ...]``."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        else:
            was = "not recorded" if a is _MISSING else f"{_show(a)} recorded"
            out.append(f"{prefix}{key} ({was}, now {'absent' if b is _MISSING else _show(b)})")
    return out
