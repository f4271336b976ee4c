"""Sharing a trained compressor: its weights checksum, its model card, and the hub (ids in, pushes out).

A saved compressor folder holds ``config.json`` (with ``weights_sha256``, the SHA-256 of
``model.safetensors``), ``model.safetensors`` and ``README.md``, a model card whose YAML metadata names the
model it was trained for (hub id when known, and the fingerprint), the label set, the validation metrics,
the training command and the library version. ``Compressor.from_pretrained("org/name", revision=...)``
finds the files as checkpoints are found (``models.hub.checkpoint_file``: from the hub cache when
``HF_HUB_OFFLINE=1`` or the hub is unreachable); ``Compressor.push_to_hub`` uploads exactly the folder
``save_pretrained`` writes.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
CHECKSUM_KEY = "weights_sha256"


def locate(source: str | Path, revision: str | None = None) -> tuple[Path, Path, Path | None]:
    """(config.json, model.safetensors, README.md or None) of a compressor: a local folder, or a hub id
    ``org/name`` at ``revision`` (or ``org/name@revision``, for command lines), found as checkpoints are: the
    hub cache when the hub is unreachable or ``HF_HUB_OFFLINE=1``.

    ``"demo"``: the shipped demo compressor (unless a folder of that name exists).

    Raises FileNotFoundError naming the folder / id when there is no compressor there."""
    from explainprune.compressor_path import DEMO_COMPRESSOR
    from explainprune.models.hub import _looks_local, checkpoint_file, is_hub_id

    if source == "demo" and not Path(source).exists():
        source = DEMO_COMPRESSOR
    path = Path(source).expanduser()
    if not isinstance(source, Path) and "@" in str(source) and not path.exists():
        source, _, at = str(source).rpartition("@")
        if revision is not None and revision != at:
            raise ValueError(f"two revisions given: {at!r} after '@' and revision={revision!r}")
        revision, path = at, Path(source)
    if path.is_dir() or isinstance(source, Path) or not is_hub_id(str(source)) or _looks_local(str(source)):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a hub id (org/name); {source} is a local path")
        cfg, weights = path / CONFIG, path / WEIGHTS
        if not cfg.is_file() or not weights.is_file():
            raise FileNotFoundError(f"no compressor at {source} (expected {CONFIG} and {WEIGHTS}, or a hub id "
                                    "org/name)")
        card = path / CARD
        return cfg, weights, card if card.is_file() else None
    try:
        cfg = checkpoint_file(str(source), CONFIG, revision=revision)
    except FileNotFoundError as err:  # the checkpoints' message, worded for a compressor
        raise FileNotFoundError(str(err).replace("local checkpoint directory", "local compressor folder")) from None
    weights = checkpoint_file(str(source), WEIGHTS, revision=revision, required=False)
    if weights is None:
        raise FileNotFoundError(f"the hub repository {source} has {CONFIG} but no {WEIGHTS}: it is not a "
                                "compressor saved by explainprune")
    return cfg, weights, checkpoint_file(str(source), CARD, revision=revision, required=False)


# -- model card -------------------------------------------------------------------------------------------
def card_text(config: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """README.md of a compressor: YAML metadata, then a short human description. ``config`` is what
    ``config.json`` holds; ``info`` (optional) holds ``base_model``, ``labels``, ``metrics``, ``guard`` (the
    training guard's summary: kept ``epoch``, ``beats_input``, ``behind``, ``message``), ``training``."""
    import yaml

    from explainprune.versions import __version__

    info = dict(info or {})
    meta: dict[str, Any] = {"library_name": "explainprune", "tags": ["explainprune", "visual-token-pruning",
                                                                     "multimodal", "compressor"]}
    if info.get("base_model"):
        meta["base_model"] = str(info["base_model"])
    fp = config.get("fingerprint") or {}
    ep: dict[str, Any] = {"version": __version__, "format": config.get("format"), "fingerprint": fp,
                          CHECKSUM_KEY: config.get(CHECKSUM_KEY)}
    for key in ("labels", "metrics", "guard", "training"):
        if info.get(key):
            ep[key] = info[key]
    meta["explainprune"] = ep
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=False, default_flow_style=False)
    model = info.get("base_model") or (fp.get("model_type") and f"a {fp['model_type']} model") or "any model"
    lines = ["---", head.rstrip("\n"), "---", "", "# explainprune compressor f_theta", "",
             f"The learned visual-token scorer of explainprune (paper Section 3.3, Eq. 2) for {model}"
             + (f" (fingerprint {', '.join(f'{k}={v}' for k, v in fp.items())})." if fp else "."),
             "It reads the first-layer attention A_v^0 and predicts which visual tokens to keep.", "",
             "```python", "import explainprune", "", f'vlm = explainprune.load("{info.get("base_model") or "MODEL"}")',
             'pruner = explainprune.get_pruner("learned", compressor="<this hub id or folder>")',
             'result = pruner.generate(vlm, vlm.prepare(images=[image], question="..."), ratio=0.25)', "```", ""]
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["Validation metrics (held-out labels):", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    guard = (info.get("guard") or {}).get("message")
    if guard:
        lines += ["Against its own input (ranking by the head-mean A_v^0, the `layer0` pruner), on the validation "
                  "split:", "", f"> {guard}", ""]
    command = (info.get("training") or {}).get("command")
    if command:
        lines += ["Trained with:", "", "```", command, "```", ""]
    lines.append(f"Written by explainprune {__version__}.")
    return "\n".join(lines) + "\n"


def read_card(path: Path | None) -> dict[str, Any]:
    """The ``info`` a card was written from (base_model, labels, metrics, training), {} when none/unreadable."""
    if path is None:
        return {}
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.startswith("---\n"):
            return {}
        meta = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(meta, dict):
        return {}
    ep = meta.get("explainprune") if isinstance(meta.get("explainprune"), dict) else {}
    info = {k: ep[k] for k in ("labels", "metrics", "guard", "training") if k in ep}
    if meta.get("base_model"):
        info["base_model"] = meta["base_model"]
    return info


_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "val_fraction": "--val-fraction",
          "seed": "--seed", "power": "--target-power", "normalize": "--normalize", "padding": "--padding",
          "select": "--select"}


def _label_summary(index: dict[str, Any]) -> dict[str, Any]:
    counts = index.get("counts") or {}
    return {"source": index.get("source"), "samples": counts.get("samples"), "labeled": counts.get("labeled"),
            "skipped": {k: v for k, v in counts.items() if k.startswith("skipped")},
            "shards": len(index.get("shards") or []), "fingerprint": index.get("fingerprint")}


def training_info(index: dict[str, Any] | list[dict[str, Any]], labels: str | Path | list[str | Path],
                  out: str | Path, config: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """Card ``info`` for a compressor trained by ``train.train`` on the label set(s) ``labels`` (``index``: their
    index.json contents, one per set). Several sets: ``labels`` holds the totals and ``sets`` each one."""
    indexes = index if isinstance(index, list) else [index]
    paths = [str(x) for x in labels] if isinstance(labels, list) else [str(labels)]
    conf = config.to_json()
    default = type(config)().to_json()
    args = ["explainprune", "train", "--labels", *paths, "--out", str(out)]
    for key, flag in _FLAGS.items():
        if key in conf and conf[key] != default.get(key):
            args += [flag, str(conf[key])]
    if conf["average_heads"]:
        args.append("--average-heads")
    if conf.get("skip") != default.get("skip"):
        args.append("--skip" if conf.get("skip") else "--no-skip")
    first = indexes[0] if indexes else {}
    model = first.get("model")
    if isinstance(model, dict):
        model = model.get("name") or model.get("id") or model.get("name_or_path")
    summary = _label_summary(first)
    if len(indexes) > 1:
        sets = [_label_summary(ix) for ix in indexes]
        summary = {"samples": sum(x["samples"] or 0 for x in sets), "labeled": sum(x["labeled"] or 0 for x in sets),
                   "shards": sum(x["shards"] for x in sets), "fingerprint": first.get("fingerprint"),
                   "sets": [{k: v for k, v in x.items() if k != "fingerprint"} for x in sets]}
    info: dict[str, Any] = {"labels": summary,
                            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                            "training": {"command": shlex.join(args), "config": conf}}
    if isinstance(model, str) and model:
        info["base_model"] = model
    return info


# -- push -------------------------------------------------------------------------------------------------
def push_folder(folder: Path, repo_id: str, *, api: Any = None, token: str | None = None,
                private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                create_pr: bool = False) -> Any:
    """Upload the saved compressor ``folder`` (every file in it, nothing else) to the model repo ``repo_id``,
    creating it if needed; returns the hub's commit info. ``api``: an ``huggingface_hub.HfApi`` (or a
    stand-in with ``create_repo`` and ``upload_folder``)."""
    from explainprune.models.hub import is_hub_id

    if not is_hub_id(repo_id):
        raise ValueError(f"repo_id must be a hub id of the form org/name; got {repo_id!r}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload explainprune compressor",
                             create_pr=create_pr)
