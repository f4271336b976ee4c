"""The rows of a conversation dataset's files, text read up front and image columns left in place.

A ``RowTable`` is one file (or one hub dataset): ``rows()`` yields each row as a dict of the columns a
``ConversationSource`` asks for, ``fetch(row, column)`` reads one cell later. Image columns that hold bytes
(parquet ``{"bytes", "path"}`` structs or binary, a hub dataset's ``Image`` feature) are not read by
``rows()``: each of their cells becomes ``Lazy(column, k)`` markers (one per image of the cell, ``k`` None
for a cell that is one image), read by ``fetch`` when the sample is labelled. So building a source over
an Infinity-MM-style parquet reads its text columns and the images' shape (how many per row: the
``path`` field of a struct, or the list offsets), never the bytes of rows that are not selected.

  JsonTable     JSON / JSONL through ``datasets`` (or line by line when arrow's schema fails): all in memory
  ParquetTable  pyarrow column projection; ``fetch`` reads the selected row's row group (one cached)
  HubTable      a ``datasets.Dataset`` (hub id): text columns via ``select_columns``, ``fetch`` = ``ds[row]``
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from explainprune.files import file_stamp

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Lazy:
    """An image left in its data file: element ``k`` of the row's ``column`` cell (``k`` None: the cell)."""

    column: str
    k: int | None = None
    path: str | None = None  # the cell's ``path`` field, when it has one (read without the bytes)

    def pick(self, cell: Any) -> Any:
        return cell if self.k is None else cell[self.k]


class RowTable(Protocol):
    subset: str  # the subset name its rows get (file stem, or the hub subset)

    def __len__(self) -> int: ...
    def rows(self) -> Iterator[dict[str, Any]]: ...
    def fetch(self, row: int, column: str) -> Any: ...


def data_files(path: Path) -> list[Path]:
    """The data files of ``path``: itself, or the .json / .jsonl / .parquet files under the folder, sorted."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{path} holds no .json, .jsonl or .parquet files")
    return files


def file_digest(files: list[Path], chunk: int = 1 << 24) -> str:
    """SHA-256 of each file's name and bytes, in order (read in chunks: constant memory); 16 hex digits."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:16]


class GroupCache:
    """One parquet row group's image columns, shared by every table of a source: however many files a run
    reads, one row group of images is held at a time. Thread-safe (the label loader reads ahead)."""

    def __init__(self) -> None:
        self._key: tuple[str, int] | None = None
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int], load: Any) -> Any:
        """The value for ``key``, from ``load()`` when another key is held (that one is let go first)."""
        with self._lock:
            if self._key != key:
                self._key, self._value = None, None
                self._value, self._key = load(), key
            return self._value


@contextlib.contextmanager
def datasets_progress(enabled: bool) -> Iterator[None]:
    """Within the block, ``datasets``' own progress bars ("Generating train split", downloads) are shown
    only when ``enabled``; the library's previous setting is restored on exit."""
    try:
        import datasets
    except ImportError:  # open_tables says what to install
        yield
        return
    was_disabled = datasets.are_progress_bars_disabled()
    if not enabled and not was_disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            datasets.enable_progress_bars()


def open_tables(name: str, columns: list[str], media: list[str], subset: str | None,
                split: str, cache: GroupCache | None = None) -> tuple[list[RowTable], str]:
    """(tables, data digest) of one dataset path or hub id. ``columns``: the columns rows need; ``media``:
    those of them that may hold image bytes (read lazily); ``cache``: the source's row-group cache."""
    path = Path(name)
    if not path.exists():
        if name.startswith((".", "/")) or path.suffix in DATA_SUFFIXES or name.count("/") > 1:
            raise FileNotFoundError(f"no dataset at {name}")
        try:  # local JSON / JSONL / parquet files need no `datasets` (pyarrow and json read them)
            import datasets
        except ImportError:
            raise ValueError(f"reading the hub dataset {name!r} needs the datasets library: pip install "
                             "'explainprune[data]' (local .json / .jsonl / .parquet files need no datasets)") from None
        ds = datasets.load_dataset(name, subset, split=split)  # a hub id
        return [HubTable(ds, subset or name, columns, media)], f"hub:{ds._fingerprint}"
    files = data_files(path)
    tables: list[RowTable] = []
    for f in files:
        tables.append(ParquetTable(f, columns, media, cache) if f.suffix == ".parquet" else JsonTable(f))
    return tables, file_digest(files)


class JsonTable:
    """A JSON / JSONL file, every row in memory (annotation files: text and media paths)."""

    def __init__(self, f: Path):
        self.subset = f.stem
        try:
            import datasets
        except ImportError:  # without `datasets`: the file read as JSON / JSONL (rows lack absent keys)
            self._rows = read_json(f)
            return
        try:
            self._rows = [dict(r) for r in datasets.load_dataset("json", data_files=str(f), split="train")]
        except Exception:  # mixed-type columns (str here, list there) defeat arrow's schema
            self._rows = read_json(f)

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> Iterator[dict[str, Any]]:
        return iter(self._rows)

    def fetch(self, row: int, column: str) -> Any:
        return self._rows[row].get(column)


def read_json(f: Path) -> list[dict[str, Any]]:
    """The rows of a JSON array / object or a JSONL file; a bad JSONL line is an error naming it."""
    text = f.read_text(encoding="utf-8-sig")  # a byte-order mark is skipped
    try:
        data = json.loads(text)
        return list(data) if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        out = []
        for k, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{f}:{k + 1}: not JSON ({err.msg})") from None
        return out


def _has_bytes(t: Any) -> bool:
    """Whether the arrow type ``t`` holds binary data at any depth."""
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    return any(_has_bytes(t.field(i).type) for i in range(t.num_fields))


def shapes(array: Any) -> list[Any]:
    """Per row of an arrow (chunked) array of images: None (null), the list length (a list), or "one"."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return pc.list_value_length(array).to_pylist()
    return ["one" if ok else None for ok in pc.is_valid(array).to_pylist()]


def cell_paths(array: Any) -> list[Any] | None:
    """Per row of an arrow (chunked) array of image structs (or lists of them) with a ``path`` field: the
    path (a list of paths for a list cell; None where null), taken from the field alone (the bytes are not
    copied or read). None when the structs have no ``path`` field."""
    import pyarrow as pa

    out: list[Any] = []
    for chunk in getattr(array, "chunks", [array]):
        is_list = pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)
        struct = chunk.flatten() if is_list else chunk
        if not pa.types.is_struct(struct.type) or struct.type.get_field_index("path") < 0:
            return None
        paths = struct.field("path").to_pylist()
        valid = struct.is_valid().to_pylist()
        paths = [p if ok else None for p, ok in zip(paths, valid, strict=True)]
        if is_list:
            offsets, ok = chunk.offsets.to_pylist(), chunk.is_valid().to_pylist()
            out += [paths[offsets[r]:offsets[r + 1]] if ok[r] else None for r in range(len(chunk))]
        else:
            out += paths
    return out


def markers(column: str, shape: Any, path: Any = None) -> Any:
    """The ``Lazy`` markers standing for a cell of ``shape`` (``shapes``), with its path(s) (``cell_paths``)."""
    if shape is None:
        return None
    if shape == "one":
        return Lazy(column, None, path)
    return [Lazy(column, k, path[k] if path else None) for k in range(shape)]


def _merge(texts: Iterable[dict[str, Any]], lazy: dict[str, tuple[list[Any], list[Any] | None]]
           ) -> Iterator[dict[str, Any]]:
    for r, row in enumerate(texts):
        yield {**row, **{c: markers(c, s[r], p[r] if p else None) for c, (s, p) in lazy.items()}}


class ParquetTable:
    """A parquet file: the needed text columns read whole, image columns with bytes left lazy. The file is
    open only while it is read (a folder of thousands of files stays within the open-files limit)."""

    def __init__(self, f: Path, columns: list[str], media: list[str], cache: GroupCache | None = None):
        self.subset, self.path = f.stem, f
        try:
            with self._open() as fh:
                schema, meta = fh.schema_arrow, fh.metadata
        except Exception as err:
            raise ValueError(f"{f}: cannot read ({err})") from None
        present = [c for c in columns if c in schema.names]
        self.lazy = [c for c in present if c in media and _has_bytes(schema.field(c).type)]
        self.text = [c for c in present if c not in self.lazy]
        self._groups = meta.num_row_groups
        self._starts = [0]
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._cache = cache if cache is not None else GroupCache()

    def _open(self) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path)

    def __len__(self) -> int:
        return self._starts[-1]

    def rows(self) -> Iterator[dict[str, Any]]:
        try:
            lazy = {c: self._shapes(c) for c in self.lazy}
        except Exception as err:
            raise ValueError(f"{self.path}: cannot read ({err})") from None
        return _merge(self._texts(), lazy)

    def _texts(self) -> Iterator[dict[str, Any]]:
        """The text columns, row by row (read a row group at a time)."""
        if not self.text:
            yield from ({} for _ in range(len(self)))
            return
        with self._open() as fh:
            for g in range(self._groups):
                try:
                    part = fh.read_row_group(g, columns=self.text).to_pylist()
                except Exception as err:
                    raise ValueError(f"{self.path}: cannot read ({err})") from None
                yield from part

    def _shapes(self, column: str) -> tuple[list[Any], list[Any] | None]:
        """(``shapes``, ``cell_paths``) of an image column, read from its text leaves only (a struct's
        ``path``) when it has some; else row group by row group (its bytes pass through memory one group at
        a time; no paths)."""
        with self._open() as fh:
            schema = fh.schema
            leaves = [schema.column(i) for i in range(len(schema))]
            light = [leaf.path for leaf in leaves if (leaf.path == column or leaf.path.startswith(column + "."))
                     and (leaf.physical_type != "BYTE_ARRAY" or leaf.logical_type.type == "STRING")]
            if light:
                projected = fh.read(columns=light[:1]).column(column)
                return shapes(projected), cell_paths(projected)
            out: list[Any] = []
            for g in range(self._groups):
                out += shapes(fh.read_row_group(g, columns=[column]).column(column))
            return out, None

    def fetch(self, row: int, column: str) -> Any:
        """Cell ``column`` of ``row``: its row group's image columns are read (and kept, in the source's one
        ``GroupCache``, for the next row)."""
        g = bisect.bisect_right(self._starts, row) - 1

        def load() -> Any:
            with self._open() as fh:
                return fh.read_row_group(g, columns=self.lazy)

        group = self._cache.get((str(self.path), g), load)
        return group.column(column)[row - self._starts[g]].as_py()


class HubTable:
    """A ``datasets.Dataset``: text columns iterated, image columns (bytes) shaped from arrow and fetched
    (decoded by ``datasets``, as before) one row at a time."""

    def __init__(self, ds: Any, subset: str, columns: list[str], media: list[str]):
        self.ds, self.subset = ds, subset
        present = [c for c in columns if c in ds.column_names]
        self.lazy = [c for c in present if c in media and _has_bytes(ds.data.schema.field(c).type)]
        self.text = [c for c in present if c not in self.lazy]

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self) -> Iterator[dict[str, Any]]:
        texts = [dict(r) for r in self.ds.select_columns(self.text)] if self.text else [{} for _ in range(len(self))]
        return _merge(texts, {c: (shapes(col), cell_paths(col)) for c in self.lazy
                              for col in [self.ds.data.column(c)]})

    def fetch(self, row: int, column: str) -> Any:
        return self.ds[row][column]


def media_digest(values: list[Any], root: str) -> str:
    """A digest of a row's images (16 hex digits): bytes hashed, a path (relative to ``root``) by its
    ``file_stamp``, a decoded PIL image by its pixels."""
    h = hashlib.sha256()
    for v in values:
        h.update(b"|")
        _feed(h, v, root)
    return h.hexdigest()[:16]


def _feed(h: Any, v: Any, root: str) -> None:
    if isinstance(v, dict):
        for key in sorted(v):
            h.update(f"{key}=".encode())
            _feed(h, v[key], root)
    elif isinstance(v, (bytes, bytearray)):
        h.update(hashlib.sha256(v).digest())
    elif isinstance(v, str):
        h.update(f"{v}@{file_stamp(Path(root) / v)}".encode())
    elif hasattr(v, "tobytes") and hasattr(v, "mode"):  # a PIL image (a hub dataset's decoded Image)
        h.update(f"{v.mode}{v.size}".encode() + v.tobytes())
    else:
        h.update(repr(v).encode())
