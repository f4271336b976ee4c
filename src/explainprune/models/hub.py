"""Where a checkpoint comes from: the shipped demo, a local directory, or a hub id in the hub cache.

A name is resolved the way ``from_pretrained`` resolves it: an existing directory is a local checkpoint;
otherwise ``org/name`` is a hub id, looked up through transformers' ``cached_file`` (the hub cache, so
``HF_HUB_OFFLINE=1`` with a populated cache works, and ``revision`` is honoured). Anything else fails at
once, before any network access, with a "did you mean ...?" hint.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

DEMO_NAME = "demo"
DEMO_PATH = Path(__file__).resolve().parent.parent / "assets" / "demo"

# huggingface_hub's rule for one part of a repo id (validate_repo_id), with the namespace required
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")


def is_hub_id(name: str) -> bool:
    """True for a well-formed ``org/name`` hub id (no ``--`` or ``..``, at most 96 characters)."""
    return (bool(_HUB_ID.fullmatch(name)) and len(name) <= 96 and "--" not in name and ".." not in name
            and not name.endswith(".git"))


def _looks_local(name: str) -> bool:
    """A name only a filesystem path can mean: ./x, ../x, /x, ~/x, a/b/c, C:\\x, x/."""
    return (name.startswith((".", "/", "~", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1
            or "\\" in name or bool(re.match(r"^[A-Za-z]:", name)))


def cached_repo_ids() -> list[str]:
    """Model ids present in the local hub cache (``models--org--name`` folders); no network."""
    from huggingface_hub import constants

    try:
        entries = os.listdir(constants.HF_HUB_CACHE)
    except OSError:
        return []
    return sorted(e[len("models--"):].replace("--", "/", 1) for e in entries if e.startswith("models--"))


def _did_you_mean(name: str) -> str:
    known = [n for n in [DEMO_NAME, *cached_repo_ids()] if n != name]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def resolve(name_or_path: str | os.PathLike) -> str | Path:
    """``"demo"`` -> the shipped model's directory; an existing directory -> its Path; a well-formed hub id
    -> the id (looked up later by transformers). Raises FileNotFoundError / InputError otherwise."""
    name = str(name_or_path)
    if name == DEMO_NAME:
        if not (DEMO_PATH / "config.json").is_file():
            raise FileNotFoundError(f"the demo model is not installed at {DEMO_PATH}")
        return DEMO_PATH
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{name} is a file; a checkpoint is a directory holding config.json")
    if isinstance(name_or_path, os.PathLike) or _looks_local(name):
        raise FileNotFoundError(f"no checkpoint directory at {name}")
    if is_hub_id(name):
        return name
    from explainprune.errors import InputError

    raise InputError(
        f"{name!r} is neither a local checkpoint directory nor a hub id of the form org/name; "
        f"{_did_you_mean(name)}(the shipped model is 'demo'; e.g. 'Qwen/Qwen2-VL-2B-Instruct' is a hub id)")


def checkpoint_file(source: str | Path, filename: str, *, revision: str | None = None,
                    required: bool = True) -> Path | None:
    """Local path of ``filename`` in ``source`` (a directory or a hub id at ``revision``), through
    transformers' ``cached_file``: the hub cache first, the hub when online. ``required=False`` gives None
    for a file the checkpoint does not have."""
    from transformers.utils import cached_file

    if isinstance(source, Path):
        found = source / filename
        if found.is_file():
            return found
        if required:
            raise FileNotFoundError(f"{source} has no {filename}")
        return None
    try:
        found = cached_file(str(source), filename, revision=revision,
                            _raise_exceptions_for_missing_entries=required,
                            _raise_exceptions_for_connection_errors=required)
    except OSError as err:
        if not required:
            return None
        from huggingface_hub import constants

        at = f" at revision {revision!r}" if revision else ""
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"no local directory {source!r}, and the hub id is not in the hub cache {constants.HF_HUB_CACHE}"
                f"{at} (HF_HUB_OFFLINE is set, so nothing is downloaded); {_did_you_mean(str(source))}"
                "download it once online, or give a local checkpoint directory") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"no local directory {source!r}, and the hub could not provide it{at}: {first} "
            f"({_did_you_mean(str(source))}hub cache: {constants.HF_HUB_CACHE}; set HF_HUB_OFFLINE=1 to use "
            "only the cache)") from err
    if found is None and required:  # cached_file returns None for a missing config.json
        raise FileNotFoundError(f"{source} has no {filename}")
    return Path(found) if found else None
