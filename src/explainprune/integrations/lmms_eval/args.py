"""The ``--model_args`` of ``--model explainprune``, split by name and checked before any weights load.

A key is, in this order: one of the model's own (``MODEL_KEYS``), an option of ``explainprune.load``
(``LOAD_KEYS``), of ``VLM.prepare`` (``PREPARE_KEYS``), of the checkpoint family's image processor
(``max_pixels``, ``min_pixels``, ``size``, ...: read from the checkpoint's config.json), or of the pruner
named by ``method`` (its dataclass fields: ``layer``, ``seed``, ``compressor``, ...). Any other key fails
with the accepted names of every group. Every value and output folder is checked here too, so a bad
argument fails in a second, not after the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

MODEL_KEYS = ("pretrained", "method", "ratio", "device", "batch_size", "max_batch_size", "max_new_tokens",
              "max_frames", "efficiency_out", "warmup")
LOAD_KEYS = ("dtype", "device_map", "attn_implementation", "revision", "trust_remote_code")
PREPARE_KEYS = ("fps",)
# as the CLI's --attn-implementation / --device-map accept them (cli/common.py; not imported: cli imports this)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_CALL_ONLY = frozenset({"return_tensors", "data_format", "input_data_format", "device"})


@dataclass
class ModelArgs:
    """The checked arguments: where each one goes."""

    pretrained: str
    method: str
    ratio: float
    device: str | None
    batch_size: int
    max_new_tokens: int
    max_frames: int
    efficiency_out: Path | None
    warmup: bool
    family: str = ""
    load: dict[str, Any] = field(default_factory=dict)          # explainprune.load keywords (+ processor options)
    prepare: dict[str, Any] = field(default_factory=dict)       # PrunedEngine / VLM.prepare keywords
    pruner: dict[str, Any] = field(default_factory=dict)        # explainprune.get_pruner keywords


def processor_options(processor_class: type) -> list[str]:
    """Options a family's image processor takes at load (what ``models.base.check_processor_options`` accepts)."""
    return sorted({k for t in getattr(processor_class, "valid_kwargs", dict).__mro__
                   for k in getattr(t, "__annotations__", {})} - _CALL_ONLY)


def pruner_options(method: str) -> list[str] | None:
    """The option names of the pruner registered as ``method`` (its dataclass fields; None when it is not a
    dataclass: then ``get_pruner`` judges the options)."""
    from explainprune.pruning import base

    registry = getattr(base, "_REGISTRY", {})
    cls = registry.get(method)
    if cls is None:  # an installed plug-in (entry point ``explainprune.pruners``)
        try:
            from explainprune import plugins

            cls = plugins.find(method, set(registry))
        except Exception:  # noqa: BLE001 - no plug-in support, or a failing plug-in: get_pruner says why
            cls = None
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return [f.name for f in dataclasses.fields(cls) if f.init]


def checkpoint_adapter(pretrained: str, revision: str | None = None) -> type:
    """The adapter class of ``pretrained`` from its config.json alone (no weights read)."""
    from explainprune.errors import InputError
    from explainprune.models import adapter_for
    from explainprune.models.hub import checkpoint_file, resolve

    source = resolve(pretrained, revision=revision)
    if isinstance(source, Path) and not (source / "config.json").is_file():
        raise InputError(f"no config.json in {source}",
                         hint="give a transformers checkpoint folder, a hub id or 'demo'")
    config_file = checkpoint_file(source, "config.json", revision=revision)
    try:
        model_type = json.loads(Path(config_file).read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise InputError(f"not a valid checkpoint config ({err})", file=config_file) from None
    return adapter_for(str(model_type))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false; got {value!r}")


def check_device(device: Any) -> str | None:
    """A torch device string that this torch can use (cuda only when a GPU is visible)."""
    if device is None:
        return None
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device} but this torch sees no CUDA GPU (torch {torch.__version__}, "
                             f"cuda {torch.version.cuda}): use device=cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device} but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return str(device)


def parse(pretrained: Any = "demo", method: Any = "vanilla", ratio: Any = None, device: Any = None,
          batch_size: Any = 1, max_batch_size: Any = None, max_new_tokens: Any = 16, max_frames: Any = 8,
          efficiency_out: Any = None, warmup: Any = True, output_path: str | None = None,
          **options: Any) -> ModelArgs:
    """Split and check ``--model_args`` (ValueError / FileNotFoundError with one line naming the argument).

    ``output_path``: lmms-eval's ``--output_path``, where the efficiency summary goes without
    ``efficiency_out`` (checked writable too)."""
    from explainprune.files import check_out_dir
    from explainprune.integrations.lmms_eval.engine import check_method, check_ratio
    from explainprune.models import check_dtype

    method, pretrained = str(method), str(pretrained)
    check_method_name(method)
    ratio = check_ratio(method, None if ratio is None else _ratio(ratio))
    load = {k: options.pop(k) for k in LOAD_KEYS if k in options}
    prepare = {k: options.pop(k) for k in PREPARE_KEYS if k in options}
    if "revision" in load:
        load["revision"] = str(load["revision"])
    if "dtype" in load:
        check_dtype(str(load["dtype"]))
        load["dtype"] = str(load["dtype"])
    if "attn_implementation" in load and load["attn_implementation"] not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={load['attn_implementation']!r}; "
                         f"accepted: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if "device_map" in load:
        if device is not None:
            raise ValueError("give device or device_map, not both (device_map places the model itself)")
        dm = str(load["device_map"])
        load["device_map"] = dm if dm in DEVICE_MAP_STRATEGIES else check_device(dm)
    if "trust_remote_code" in load:
        load["trust_remote_code"] = _bool("trust_remote_code", load["trust_remote_code"])
    if "fps" in prepare:
        try:
            prepare["fps"] = float(prepare["fps"])
        except (TypeError, ValueError):
            prepare["fps"] = -1.0
        if not prepare["fps"] > 0:
            raise ValueError(f"fps must be a positive number of sampled frames per second; got {options.get('fps')!r}")
    device = check_device(device)
    if not str(batch_size).startswith("auto"):
        batch_size = _positive_int("batch_size", batch_size)
    else:
        batch_size = 1
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    max_frames = _positive_int("max_frames", max_frames)
    warmup = _bool("warmup", warmup)

    adapter = checkpoint_adapter(pretrained, load.get("revision"))
    accepted_processor = processor_options(adapter._processor_class())
    load.update({k: options.pop(k) for k in list(options) if k in accepted_processor})
    accepted_pruner = pruner_options(method)
    unknown = sorted(k for k in options if k not in (accepted_pruner or []))
    if unknown and accepted_pruner is not None:
        raise ValueError(
            f"unknown model_args {', '.join(unknown)}; accepted: the model's {', '.join(MODEL_KEYS)}; "
            f"explainprune.load's {', '.join(LOAD_KEYS)}; prepare's {', '.join(PREPARE_KEYS)}; "
            f"the {adapter._processor_class().__name__} image processor's {', '.join(accepted_processor)}; "
            f"pruner {method!r}'s {', '.join(accepted_pruner) or '(none)'}")
    if "compressor" in options:
        from explainprune.compressor_path import compressor_dir

        options["compressor"] = compressor_dir(options["compressor"])
    check_method(method, ratio, **options)  # builds the pruner: loads a compressor, checks option types

    if efficiency_out is not None:
        efficiency_out = check_out_dir(efficiency_out, flag="efficiency_out")
    elif output_path is not None:
        check_out_dir(output_path, flag="--output_path")
    return ModelArgs(pretrained=pretrained, method=method, ratio=ratio, device=device, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, max_frames=max_frames, efficiency_out=efficiency_out,
                     warmup=warmup, family=adapter.family, load=load, prepare=prepare, pruner=options)


def check_method_name(method: str) -> None:
    """ValueError ("unknown pruner ... did you mean ...") for a name the registry does not hold."""
    from explainprune.pruning import available, get_pruner

    if method not in available():
        get_pruner(method)


def _ratio(value: Any) -> Any:
    """A number when ``value`` reads as one (lmms-eval passes strings it could not parse); else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
