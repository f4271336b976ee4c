"""Where a checkpoint comes from: the shipped demo, a local directory, or a hub id in the hub cache.

A name is resolved the way ``from_pretrained`` resolves it: an existing directory is a local checkpoint;
otherwise ``org/name`` is a hub id, looked up through transformers' ``cached_file`` (the hub cache, so
``HF_HUB_OFFLINE=1`` with a populated cache works, and ``revision`` is honoured). Anything else fails at
once, before any network access, with a "did you mean ...?" hint.

When the hub cannot be reached (no network, a firewall; checked once with a short connection attempt,
``hub_reachable``) and ``HF_HUB_OFFLINE`` is not set, a cached hub id resolves to its snapshot folder in
the hub cache, so it loads in seconds instead of after minutes of transformers' retries; an uncached one
fails at once.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub endpoint (``HF_ENDPOINT``; through ``HTTPS_PROXY`` / ``ALL_PROXY`` when
    one is set: then the proxy) be opened within ``timeout`` seconds (name look-up included)?"""
    from huggingface_hub import constants

    target = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                   if os.environ.get(k)), constants.ENDPOINT)
    url = urlparse(target if "://" in target else f"http://{target}")
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(result and result[0])


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The hub-cache snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit; default main)
    holding its config.json, or None when it is not cached. No network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def _offline_source(repo_id: str, revision: str | None) -> str | Path:
    """``repo_id`` when the hub is in use (reachable, or HF_HUB_OFFLINE set: transformers reads the cache
    itself), else its cached snapshot folder; FileNotFoundError when unreachable and not cached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        return repo_id
    snapshot = cached_snapshot(repo_id, revision)
    at = f" at revision {revision!r}" if revision else ""
    if snapshot is None:
        raise FileNotFoundError(
            f"the hub ({constants.ENDPOINT}) cannot be reached and {repo_id!r}{at} is not in the hub cache "
            f"{constants.HF_HUB_CACHE}; {_did_you_mean(repo_id)}download it once online, or give a local "
            "checkpoint directory")
    logging.getLogger(__name__).warning(
        "explainprune: the hub (%s) cannot be reached: loading %s%s from the hub cache (%s)", constants.ENDPOINT,
        repo_id, at, snapshot)
    return snapshot


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> str | Path:
    """``"demo"`` -> the shipped model's directory; an existing directory -> its Path; a well-formed hub id
    -> the id (looked up later by transformers), or its cached snapshot folder at ``revision`` when the hub
    cannot be reached. Raises FileNotFoundError / InputError otherwise."""
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
        return _offline_source(name, revision)
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
