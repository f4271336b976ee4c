"""Label shard files: the parquet schema, atomic writes with page checksums, SHA-256s and read-back checks.

One shard holds samples [start, stop) of a label run (``explainprune.labels``): rows of the correctly
answered samples and, in its schema metadata, the skipped ids, counts, errors, a digest of its samples, a
stamp of their media files (``media_stamp``) and the manifest revision it came from. ``revisable`` decides
whether a rerun may keep any shards of another revision of its source; ``shard_done`` whether it may keep
one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from explainprune.errors import InputError
from explainprune.files import atomic_path, file_sha256, file_stamp, write_text_atomic  # noqa: F401

META_KEY = b"explainprune"

SCHEMA = pa.schema([
    ("id", pa.string()), ("index", pa.int64()), ("task", pa.string()), ("kind", pa.string()),
    ("question", pa.string()), ("reference", pa.string()), ("answer", pa.string()), ("correct", pa.bool_()),
    ("answer_ids", pa.list_(pa.int64())), ("num_heads", pa.int32()), ("num_visual", pa.int32()),
    ("grid_shape", pa.list_(pa.int32())), ("visual_grid", pa.list_(pa.list_(pa.int32()))),
    ("attention", pa.list_(pa.list_(pa.float32()))), ("relevance", pa.list_(pa.float32())),
    ("region", pa.list_(pa.int32())), ("model", pa.string()), ("meta", pa.string()),
    ("references", pa.list_(pa.string())),
])


def shard_path(out: str | Path, shard: int) -> Path:
    return Path(out) / "shards" / f"{shard:05d}.parquet"


def write_shard(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """Write one shard atomically (temp file in the same folder, then rename), with parquet page checksums."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [r[name] for r in rows] for name in SCHEMA.names}
    table = pa.table(columns, schema=SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True)}))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
    verified_stamp_path(path).unlink(missing_ok=True)  # the new shard's own stamp is in its metadata


def verified_stamp_path(path: Path) -> Path:
    """Beside a shard: the media stamp its samples were last verified at (``shard_done``), when that differs
    from the stamp in its metadata (media files touched or copied without a change of content)."""
    return path.with_name(path.name + ".stamp")


def shard_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(pq.read_schema(path).metadata[META_KEY])
    except (pa.ArrowException, OSError, KeyError, TypeError) as err:
        raise InputError(f"not a readable label shard ({err})", file=path,
                         hint="delete it and rerun `explainprune label` with the same arguments to redo it") from None


def shard_ok(path: Path) -> bool:
    """Whether the shard file reads back whole (footer, metadata and every page's checksum)."""
    try:
        shard_meta(path)
        pq.read_table(path, page_checksum_verification=True)
    except (InputError, pa.ArrowException, OSError):
        return False
    return True


def check_index(out: str | Path, index: Any) -> None:
    """InputError unless ``index`` (``out/index.json``) lists its shards as files inside ``out``."""
    path = Path(out) / "index.json"
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards):
        raise InputError("is not a label index (no list of shards with their files)", file=path,
                         hint="delete it and rerun `explainprune label` with the same arguments to rebuild it")
    root = Path(out).resolve()
    for k, s in enumerate(shards):
        target = (Path(out) / s["file"]).resolve()
        if Path(s["file"]).is_absolute() or not target.is_relative_to(root) or target == root:
            raise InputError(f"shard {k} points outside the label folder ({s['file']!r})", file=path,
                             hint="index.json was edited or damaged: delete it and rerun `explainprune label` with "
                             "the same arguments to rebuild it")


def verify_index(out: str | Path, index: dict[str, Any]) -> None:
    """Check every shard against the SHA-256 recorded in ``index.json``; InputError naming the first bad one
    (or a shard path that leads outside ``out``)."""
    check_index(out, index)
    for s in index["shards"]:
        path = Path(out) / s["file"]
        if not path.is_file():
            raise InputError("is missing", file=path, hint="rerun `explainprune label` with the same arguments")
        if "sha256" in s and file_sha256(path) != s["sha256"]:
            raise InputError("is damaged (its SHA-256 differs from the one in index.json)", file=path,
                             hint="rerun `explainprune label` with the same arguments to redo it")


def index_digest(index: dict[str, Any]) -> str:
    """The identity of a label set: a digest of its run record and every shard's SHA-256 (or row counts)."""
    shards = [[s["file"], s.get("sha256", s["rows"])] for s in index["shards"]]
    keep = {k: index.get(k) for k in ("source", "samples", "config", "fingerprint")}
    return hashlib.sha256(json.dumps([keep, shards], sort_keys=True).encode()).hexdigest()[:16]


def samples_digest(source: Any, start: int, stop: int) -> str | None:
    """Digest of the samples [start, stop) of ``source`` (None when the source cannot digest samples)."""
    one = getattr(source, "sample_digest", None)
    if one is None:
        return None
    return hashlib.sha256(" ".join(one(i) for i in range(start, stop)).encode()).hexdigest()[:16]


def media_stamp(source: Any, start: int, stop: int) -> str | None:
    """A cheap identity of the media files samples [start, stop) of ``source`` read: each file's path, size
    and modification time (``os.stat`` only, no file is read), hashed to 16 hex digits. None when the source
    has no ``media_files(i)`` (e.g. generated images). Embedded image bytes are not files: the source's data
    file digest covers them."""
    files = getattr(source, "media_files", None)
    if files is None:
        return None
    h = hashlib.sha256()
    for i in range(start, stop):
        h.update(b"\n")
        for p in files(i):
            h.update(f"{p}\0{file_stamp(p)}\0".encode())
    return h.hexdigest()[:16]


def shard_done(path: Path, source: Any, start: int, stop: int, revised: bool,
                index: dict[str, Any] | None, source_id: str = "") -> bool:
    """Whether an existing shard file counts as finished: it reads back whole (and matches index.json's
    SHA-256), and, when it was written from another revision of the manifest (``source_id``), skipped bad
    samples or a media file of its samples changed size or modification time since (``media_stamp``; checked
    on every resume), its samples are unchanged (``samples_digest``: for a manifest, the media bytes)."""
    if not path.is_file():
        return False
    recorded = {s["file"]: s.get("sha256") for s in (index or {}).get("shards", [])}
    sha = recorded.get(f"shards/{path.name}")
    if (sha and file_sha256(path) != sha) or not shard_ok(path):
        return False
    meta = shard_meta(path)
    if (meta.get("start"), meta.get("stop")) != (start, stop):
        return False
    other_revision = revised or ("source" in meta and meta["source"] != source_id)  # (old shards: no key)
    stamp = meta.get("media_stamp")  # (shards written before stamps: no key)
    current = media_stamp(source, start, stop) if stamp is not None else None
    verified = verified_stamp_path(path)
    media_changed = stamp is not None and current != stamp and not (
        verified.is_file() and verified.read_text() == current)
    if other_revision or media_changed or meta.get("errors"):
        same = meta.get("digest") is not None and meta.get("digest") == samples_digest(source, start, stop)
        if same and media_changed:  # same content at a new stamp: later resumes compare against this one
            write_text_atomic(verified, str(current))
        return same
    return True


def revisable(old: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``old`` is the same run on a revised copy of the same manifest (fixed lines, added lines) or
    of the same dataset files with the same options (fixed rows): then the finished shards whose samples
    are unchanged are kept."""
    same = all(old.get(k) == record.get(k) for k in ("format", "version", "config", "fingerprint", "model"))
    o, n = old.get("source", {}), record.get("source", {})
    if o.get("task") == n.get("task") == "dataset":
        data = ("data_sha256", "selected", "pairs")  # what a fixed row may change
        return same and {k: v for k, v in o.items() if k not in data} == {k: v for k, v in n.items() if k not in data}
    return same and o.get("task") == n.get("task") == "manifest" and o.get("manifest") == n.get("manifest")
