"""Label sources in the formats public instruction data ships in, read with ``datasets`` and pyarrow.

``ConversationSource`` reads local JSON / JSONL / parquet files or folders (or a hub id when you have
network) in one of two schemas:

  llava     {"id", "image" | "images" | "video", "conversations": [{"from": "human", "value": "<image>\\n..."},
            {"from": "gpt", "value": ...}, ...]}          (LLaVA-Instruct, LLaVA-Video-178K, Infinity-MM)
  messages  {"id", "images" | "image" | "video", "messages": [{"role": "user", "content": str | [{"type":
            "image"}, {"type": "text", "text": ...}]}, {"role": "assistant", "content": ...}, ...]}

Multi-turn conversations: with ``turns="first"`` (the default) only the first question/answer pair
becomes a sample; with ``turns="each"`` every pair becomes its own sample and the preceding turns are
DROPPED (the prompt is the question alone with all of the row's media), so a follow-up that refers to an
earlier turn ("and the other one?") is asked without its context -- which is why "first" is the default.

Media: image paths relative to ``media_root`` (default: the data file's folder), embedded image bytes
(``{"bytes": ...}`` structs, as parquet exports of ``datasets.Image`` columns hold them) or decoded PIL
images; video paths with ``max_frames`` frames sampled evenly (``sources.read_video``). ``<image>`` /
``<video>`` tags are removed from the question (the adapter places the media as the model's chat template
does); a row with more ``<image>`` tags than images is an error.

Column names are mappable (``columns={"conversations": "dialog", "image": "img"}``). Every selected row
is checked before any model work (``validate``): errors name the row id and what to fix.

Reading (``explainprune.dataset_rows``): only the columns above are read; image columns holding bytes
(parquet structs, a hub dataset's ``Image`` feature) are not read up front: a row's images are read, by
row index, when its sample is (``source[i]``). ``sample_digest`` identifies a sample (text, and its image
bytes or its files' size and time), so a rerun on a fixed dataset keeps the unchanged shards.

Sampling: ``target`` samples balanced over strata (``strata`` of "subset", "task", "duration"), seeded and
recorded in ``describe()`` so a resumed run takes the same samples (``balanced_indices``). ``target`` may
also be one count per dataset path (the paper's 7K LLaVA-Video + 6K NeXT-QA + 4K ActivityNetQA): each
path's share is then balanced over the other strata.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from explainprune.dataset_rows import (
    GroupCache,
    Lazy,
    RowTable,
    datasets_progress,
    file_stamp,
    media_digest,
    open_tables,
)
from explainprune.errors import InputError
from explainprune.images import check_image, open_image
from explainprune.matchers import auto_rule, check_rule
from explainprune.sampling import DURATION_BUCKETS, balanced_indices, duration_bucket, video_duration  # noqa: F401
from explainprune.sources import LabelSample

FORMATS = ("llava", "messages")
STRATA = ("subset", "task", "duration")
TURNS = ("first", "each")
_TAG = re.compile(r"<(image|video)>\s*\n?")
_HUMAN, _ASSISTANT = ("human", "user"), ("gpt", "assistant", "bot", "model")


@dataclass(frozen=True)
class DatasetConfig:
    """Where and how to read a conversation dataset (see the module docstring)."""

    path: str | tuple[str, ...]      # one or several files / folders / hub ids (one subset each)
    format: str = "llava"
    media_root: str | tuple[str, ...] | None = None  # one for all paths, or one per path
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    subset: str | None = None        # a hub dataset's configuration name
    turns: str = "first"
    max_frames: int = 8
    match: str = "auto"              # the answer matcher (explainprune.matchers) for this source
    target: int | tuple[int, ...] | None = None  # balanced sample of this many, or per path (None: all)
    strata: tuple[str, ...] = ("subset", "task", "duration")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown dataset format {self.format!r}; accepted: {', '.join(FORMATS)}")
        if self.turns not in TURNS:
            raise ValueError(f"unknown turns policy {self.turns!r}; accepted: {', '.join(TURNS)}")
        check_rule(self.match)
        bad = [s for s in self.strata if s not in STRATA]
        if bad:
            raise ValueError(f"unknown strata {', '.join(bad)}; accepted: {', '.join(STRATA)}")
        targets = () if self.target is None else (self.target,) if isinstance(self.target, int) else self.target
        if any(t < 1 for t in targets):
            raise ValueError(f"the sample target must be >= 1; got {self.target}")
        if len(targets) > 1 and len(targets) != len(self.paths):
            raise ValueError(f"give one sample target for all datasets or one per dataset; got {len(targets)} "
                             f"for {len(self.paths)}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be >= 1; got {self.max_frames}")
        if len(self.roots) != len(self.paths):
            raise ValueError(f"give one media root for all datasets or one per dataset; got {len(self.roots)} "
                             f"for {len(self.paths)}")

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if isinstance(self.path, str) else tuple(self.path)

    @property
    def roots(self) -> tuple[str | None, ...]:
        r = self.media_root
        if r is None or isinstance(r, str):
            return (r,) * len(self.paths)
        return tuple(r) if len(r) != 1 else (r[0],) * len(self.paths)


@dataclass(frozen=True)
class _Item:
    """One question/answer pair of one row (media still unresolved)."""

    row: int
    id: str
    question: str
    answer: str
    images: tuple[Any, ...]
    video: str | None
    subset: str
    root: str
    path: int = 0  # which of the config's paths


def parse_columns(spec: str | None) -> dict[str, str]:
    """"image=img,conversations=dialog" -> {"image": "img", "conversations": "dialog"}."""
    out: dict[str, str] = {}
    for item in filter(None, (spec or "").split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"column mapping {item!r} must be ours=theirs, e.g. image=img")
        out[key.strip()] = value.strip()
    return out


def _text(content: Any) -> tuple[str, int]:
    """(text, image count) of a messages-format content: a string or a list of typed parts."""
    if isinstance(content, str):
        return content, 0
    texts, images = [], 0
    for part in content or []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image":
            images += 1
    return "\n".join(texts), images


class ConversationSource:
    """A conversation dataset as a deterministic ``SampleSource`` (see the module docstring)."""

    def __init__(self, config: DatasetConfig, progress: bool = True):
        """Read the text of ``config``'s data (``progress``: show ``datasets``' own progress bars)."""
        self.config = config
        col = {k: config.columns.get(k, k) for k in ("id", "image", "images", "video", "conversations",
                                                      "messages", "subset", "task")}
        self.col = col
        self._strata_cache: dict[tuple[int, str], tuple[str, ...]] = {}
        self._tables: list[RowTable] = []
        self._starts: list[int] = []  # the first global row of each table
        self._digests: dict[int, str] = {}  # media digests of rows whose images were read lazily
        self._bad: dict[int, InputError] = {}  # selected samples whose image headers failed (validate, skip)
        columns, media = list(dict.fromkeys(col.values())), [col["image"], col["images"]]
        items, digests, r = [], [], 0
        cache = GroupCache()  # one parquet row group of images held at a time, over all files
        for path_k, (name, root) in enumerate(zip(config.paths, config.roots)):
            with datasets_progress(progress):
                tables, digest = open_tables(name, columns, media, config.subset, config.split, cache)
            digests.append(digest)
            base = root or (name if Path(name).is_dir() else str(Path(name).parent))
            found = len(items)
            seen: dict[str, str] = {}  # sample id -> where it was first met (ids are unique per dataset path)
            for table in tables:
                self._tables.append(table)
                self._starts.append(r)
                for local, row in enumerate(table.rows()):
                    for it in self._items(r, row, table.subset, name, base):
                        where = f"row {local + 1} of {table.subset}" if len(tables) > 1 else f"row {local + 1}"
                        if it.id in seen:
                            raise InputError(f"id {it.id!r} repeats ({seen[it.id]} and {where})", file=name,
                                             hint="ids must be unique within a dataset; fix the data, or number the "
                                             "rows instead of using their ids: --columns id=none")
                        seen[it.id] = where
                        items.append(replace(it, path=path_k))
                    r += 1
            if len(items) == found:
                rows = sum(len(t) for t in tables)
                raise ValueError(f"{name}: no question/answer pairs found in {rows} rows ({config.format} "
                                 f"format; map columns with --columns if yours are named differently)")
        self.digest = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
        self._all = items
        self.indices = self._select(items, config.target)
        self.items = [items[i] for i in self.indices]

    def _select(self, items: list[_Item], target: int | tuple[int, ...] | None) -> list[int]:
        if target is None:
            return list(range(len(items)))
        if isinstance(target, int) or len(target) == 1:
            n = target if isinstance(target, int) else target[0]
            return balanced_indices([self._stratum(it) for it in items], n, self.config.seed)
        out = []
        for path_k, n in enumerate(target):  # one share per dataset path, balanced within it
            members = [i for i, it in enumerate(items) if it.path == path_k]
            picked = balanced_indices([self._stratum(items[i]) for i in members], n, self.config.seed)
            out += [members[j] for j in picked]
        return sorted(out)

    # -- parsing -----------------------------------------------------------------------------------------
    def _items(self, r: int, row: dict[str, Any], subset: str, name: str, root: str) -> list[_Item]:
        c = self.col
        rid = str(row.get(c["id"]) if row.get(c["id"]) is not None else f"row {r}")
        if c["subset"] in row and row[c["subset"]] is not None:
            subset = str(row[c["subset"]])
        images = row.get(c["images"]) if row.get(c["images"]) is not None else row.get(c["image"])
        images = () if images is None else tuple(images) if isinstance(images, (list, tuple)) else (images,)
        for im in images:
            if not _image_like(im):
                raise ValueError(f"{name}: row {rid}: an image must be a path, embedded bytes or a "
                                 f"{{\"bytes\", \"path\"}} object; got {type(im).__name__} {im!r:.60}")
        video = row.get(c["video"])
        if video is not None and not (isinstance(video, str) and video):
            raise ValueError(f"{name}: row {rid}: video must be a path (a file or a folder of frames); got "
                             f"{type(video).__name__} {video!r:.60}")
        turns = self._turns(rid, row, name)
        tags = sum(len(re.findall(r"<image>", q)) for q, _ in turns)
        if tags > len(images):
            raise ValueError(f"{name}: row {rid}: {tags} <image> tags but {len(images)} images")
        pairs = turns[:1] if self.config.turns == "first" else turns
        return [_Item(r, rid if len(pairs) == 1 else f"{rid}#{k}", _TAG.sub("", q).strip(), a, images,
                      None if video is None else str(video), subset, root) for k, (q, a) in enumerate(pairs)]

    def _turns(self, rid: str, row: dict[str, Any], name: str) -> list[tuple[str, str]]:
        """(question, answer) pairs: each human/user turn followed by an assistant turn."""
        fmt = self.config.format
        key = self.col["conversations" if fmt == "llava" else "messages"]
        turns = row.get(key)
        if not isinstance(turns, (list, tuple)) or not turns:
            raise ValueError(f"{name}: row {rid}: no {key!r} list (format {fmt}; map the column with "
                             f"--columns {'conversations' if fmt == 'llava' else 'messages'}=NAME)")
        flat = []
        for t in turns:
            if not isinstance(t, dict):
                raise ValueError(f"{name}: row {rid}: a turn is not an object: {t!r}")
            if fmt == "llava":
                flat.append((str(t.get("from", "")).lower(), str(t.get("value", ""))))
            else:
                text, n_img = _text(t.get("content"))
                flat.append((str(t.get("role", "")).lower(), "<image>\n" * n_img + text))
        pairs = [(q, a) for (rq, q), (ra, a) in zip(flat, flat[1:]) if rq in _HUMAN and ra in _ASSISTANT]
        if not any(role in _HUMAN for role, _ in flat):
            raise ValueError(f"{name}: row {rid}: no human/user turn")
        if not pairs:
            raise ValueError(f"{name}: row {rid}: no answer follows a human/user turn")
        for q, a in pairs:
            if not _TAG.sub("", q).strip():
                raise ValueError(f"{name}: row {rid}: empty question")
            if not a.strip():
                raise ValueError(f"{name}: row {rid}: empty answer (no reference to score against; fix the "
                                 "row or remove it)")
        return pairs

    def _stratum(self, it: _Item) -> tuple[str, ...]:
        if (it.row, it.id) in self._strata_cache:
            return self._strata_cache[(it.row, it.id)]
        key = []
        for s in self.config.strata:
            if s == "subset":
                key.append(it.subset)
            elif s == "task":
                key.append("multi-choice" if auto_rule([it.answer], it.question) == "choice" else "open-ended")
            elif s == "duration":
                key.append(duration_bucket(video_duration(Path(it.root) / it.video)) if it.video else "image")
        self._strata_cache[(it.row, it.id)] = tuple(key)
        return tuple(key)

    # -- the SampleSource protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def validate(self, on_error: str = "stop") -> None:
        """Check every selected sample's media before any model work: files exist, and images given by path
        or as bytes in the annotation file are readable from their header (``images.check_image``: decodable,
        not animated, aspect ratio accepted). A bad header raises InputError naming the data file and row,
        or, with ``on_error="skip"``, is kept and raised when that sample is read (so ``label --on-error
        skip`` lists it). Images left in parquet / hub cells are checked when their sample is read."""
        for i, it in enumerate(self.items):
            for im in it.images:
                if isinstance(im, str) and not (Path(it.root) / im).is_file():
                    raise FileNotFoundError(f"{it.subset}: row {it.id}: image {Path(it.root) / im} not found "
                                            "(set --media-root to the folder the paths are relative to)")
            if it.video and not (Path(it.root) / it.video).exists():
                raise FileNotFoundError(f"{it.subset}: row {it.id}: video {Path(it.root) / it.video} not found "
                                        "(set --media-root)")
            try:
                for im in it.images:
                    if not isinstance(im, Lazy):
                        check_image(self._source(im, it), _describe(im, it))
            except InputError as err:
                err = self._located(err, it)
                if on_error != "skip":
                    raise err from None
                self._bad[i] = err

    def _located(self, err: InputError, it: _Item) -> InputError:
        """``err`` naming the data file and the sample (row id)."""
        return InputError(err.message, file=self.config.paths[it.path], sample=it.id, hint=err.hint)

    @staticmethod
    def _source(im: Any, it: _Item) -> Any:
        """What ``images.open_image`` reads for an image value: a PIL image, bytes, or a path."""
        if isinstance(im, dict):
            im = im["bytes"] if im.get("bytes") is not None else im.get("path")
        return Path(it.root) / im if isinstance(im, str) else im

    def _image(self, im: Any, it: _Item) -> Any:
        """The RGB image of a value (``images.open_image``: EXIF orientation, bit depth, animation)."""
        if not _image_like(im) or isinstance(im, Lazy):
            raise InputError(f"cannot read an image from {type(im).__name__}")
        return open_image(self._source(im, it), _describe(im, it))

    def _media(self, it: _Item) -> list[Any]:
        """The item's image values: ``Lazy`` ones read from their file now (and their digest kept)."""
        if not any(isinstance(im, Lazy) for im in it.images):
            return list(it.images)
        k = bisect.bisect_right(self._starts, it.row) - 1
        table, local = self._tables[k], it.row - self._starts[k]
        cells = {c: table.fetch(local, c) for c in dict.fromkeys(im.column for im in it.images
                                                                  if isinstance(im, Lazy))}
        values = [im.pick(cells[im.column]) if isinstance(im, Lazy) else im for im in it.images]
        self._digests[it.row] = media_digest(values, it.root)
        return values

    def __getitem__(self, i: int) -> LabelSample:
        from explainprune.sources import read_video

        it = self.items[i]
        if i in self._bad:
            raise self._bad[i]
        try:
            images = [self._image(im, it) for im in self._media(it)] or None
            video = read_video(Path(it.root) / it.video, self.config.max_frames) if it.video else None
        except InputError as err:
            raise self._located(err, it) from None
        except Exception as err:  # PIL / PyAV / pyarrow raise many types for damaged media
            raise InputError(f"cannot read its media ({type(err).__name__}: {err})",
                             file=self.config.paths[it.path], sample=it.id,
                             hint="fix or replace the file, or pass --on-error skip") from None
        rule = self.config.match if self.config.match != "auto" else auto_rule([it.answer], it.question)
        kind = "multi-choice" if rule == "choice" else "open-ended"
        return LabelSample(it.id, it.question, it.answer, images=images, video=video,
                           meta={"kind": kind, "subset": it.subset, "match": rule})

    def media_files(self, i: int) -> list[Path]:
        """The files sample ``i`` may read by path (images, video), resolved; no file is read. Embedded bytes
        are not files (the data files' digest covers them); an image left in a parquet / hub cell counts by
        its ``path`` field (a cell with bytes names a file that is usually absent: stamped "missing", the
        same on every run)."""
        it = self.items[i]
        root = Path(it.root)
        paths = [im.path if isinstance(im, Lazy) else im if isinstance(im, str) else im.get("path")
                 for im in it.images
                 if isinstance(im, (str, Lazy)) or (isinstance(im, dict) and im.get("bytes") is None)]
        return [(root / p).resolve() for p in paths if p] + ([(root / it.video).resolve()] if it.video else [])

    def sample_digest(self, i: int) -> str:
        """A digest of sample ``i`` (same digest, same sample): its id, question, answer and subset, and its
        media: embedded image bytes hashed (when the sample was read: ``source[i]``; else read now), a path
        by the file's size and modification time. A revised dataset's rerun keeps the shards it leaves
        unchanged (``labels.label``)."""
        it = self.items[i]
        media = self._digests.get(it.row)
        if media is None:
            try:
                values = self._media(it)  # reading lazy images also records their digest
                media = self._digests.get(it.row) or media_digest(values, it.root)
            except Exception as err:  # unreadable media: the digest still differs from a readable one's
                media = f"<unreadable {type(err).__name__}>"
        video = [it.video, file_stamp(Path(it.root) / it.video)] if it.video else None
        text = json.dumps([it.id, it.question, it.answer, it.subset, media, video])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        selected = hashlib.sha256(json.dumps(self.indices).encode()).hexdigest()[:16]
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}
        return {"task": "dataset", **options, "data_sha256": self.digest, "selected": selected, "pairs": len(self._all)}

    def counts(self) -> dict[str, int]:
        """Selected samples per stratum (what balanced sampling produced)."""
        out: dict[str, int] = defaultdict(int)
        for i in self.indices:
            out["/".join(self._stratum(self._all[i]))] += 1
        return dict(sorted(out.items()))


def _image_like(im: Any) -> bool:
    """Whether ``im`` can stand for an image: a path, bytes, a ``{"bytes"|"path"}`` dict, a PIL image or a
    ``Lazy`` cell."""
    from PIL import Image

    if isinstance(im, dict):
        return isinstance(im.get("bytes"), (bytes, bytearray)) or bool(isinstance(im.get("path"), str) and im["path"])
    return isinstance(im, (Lazy, Image.Image, bytes, bytearray)) or (isinstance(im, str) and bool(im))


def _describe(im: Any, it: _Item) -> str:
    """How a message names an image value: its path, or "embedded image K"."""
    if isinstance(im, dict) and im.get("bytes") is None:
        im = im.get("path")
    if isinstance(im, str):
        return str(Path(it.root) / im)
    return f"the embedded image of row {it.id}"
