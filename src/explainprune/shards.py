"""Label shard files: the parquet schema, atomic writes with page checksums, SHA-256s and read-back checks.

One shard holds samples [start, stop) of a label run (``explainprune.labels``): rows of the correctly
answered samples and, in its schema metadata, the skipped ids, counts, errors and a digest of its samples.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from explainprune.errors import InputError
from explainprune.files import atomic_path

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


def shard_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads(pq.read_schema(path).metadata[META_KEY])
    except (pa.ArrowException, OSError, KeyError, TypeError) as err:
        raise InputError(f"not a readable label shard ({err})", file=path,
                         hint="delete it and rerun `explainprune label` with the same arguments to redo it") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_ok(path: Path) -> bool:
    """Whether the shard file reads back whole (footer, metadata and every page's checksum)."""
    try:
        shard_meta(path)
        pq.read_table(path, page_checksum_verification=True)
    except (InputError, pa.ArrowException, OSError):
        return False
    return True


def verify_index(out: str | Path, index: dict[str, Any]) -> None:
    """Check every shard against the SHA-256 recorded in ``index.json``; InputError naming the first bad one."""
    for s in index["shards"]:
        path = Path(out) / s["file"]
        if not path.is_file():
            raise InputError("is missing", file=path, hint="rerun `explainprune label` with the same arguments")
        if "sha256" in s and file_sha256(path) != s["sha256"]:
            raise InputError("is damaged (its SHA-256 differs from the one in index.json)", file=path,
                             hint="rerun `explainprune label` with the same arguments to redo it")
