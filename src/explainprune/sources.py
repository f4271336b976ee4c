"""Label sample sources: what ``explainprune label`` (``explainprune.labels.label``) and evaluation read.

A source is a deterministic, indexable set of ``LabelSample``s (same index, same sample) that can
``describe()`` itself (the description goes into a label run's ``run.json``):
  DigitsSource    the built-in digits task (``explainprune.tasks.digits``), with ground-truth regions
  ManifestSource  a JSONL manifest of questions, answers and image / video paths (``read_video`` for files)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from explainprune.answers import normalize_answers
from explainprune.errors import InputError
from explainprune.images import check_image, open_image
from explainprune.models.base import Video


@dataclass
class LabelSample:
    """One input to label. ``answer``: the reference, or a tuple of acceptable ones (any counts);
    ``region``: ground-truth (frame, row, col) cells on the visual-token grid."""

    id: str
    question: str
    answer: str | tuple[str, ...]
    images: Any = None
    video: Any = None
    region: list[tuple[int, int, int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answers(self) -> tuple[str, ...]:
        """Every acceptable answer (one for a plain string)."""
        return normalize_answers(self.answer, f"sample {self.id}: answer")


class SampleSource(Protocol):
    """A deterministic, indexable sample set (same index, same sample)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> LabelSample: ...
    def describe(self) -> dict[str, Any]: ...


class DigitsSource:
    """The built-in digits task (``explainprune.tasks.digits``) as a label source."""

    def __init__(self, split: str = "train", seed: int = 0, n: int = 2000, **options: Any):
        from explainprune.tasks.digits import DigitsTask

        check_limit(n, "--limit")
        self.options = {"split": split, "seed": seed, "n": n, **options}
        self.task = DigitsTask(split=split, seed=seed, n=n, **options)

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int) -> LabelSample:
        s = self.task.sample(i)
        return LabelSample(s.id, s.question, s.answer, images=s.image, video=s.video,
                           region=[tuple(c) for c in s.region], meta={"kind": s.kind})

    def describe(self) -> dict[str, Any]:
        return {"task": "digits", **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}


MEDIA_FIELDS = ("image", "images", "video")


def _check_record(rec: Any) -> list[str]:
    """The paths a manifest record refers to, after checking its fields (InputError without location)."""
    if not isinstance(rec, dict):
        raise InputError(f"a line must be a JSON object; got {type(rec).__name__}")
    question = rec.get("question")
    if "question" not in rec or "answer" not in rec:
        missing = [f for f in ("question", "answer") if f not in rec]
        raise InputError(f"missing {', '.join(missing)}", hint="each line needs question, answer and "
                         "image/images/video")
    if not isinstance(question, str):
        raise InputError(f"question must be a string; got {type(question).__name__}")
    if not question.strip():
        raise InputError("question is empty")
    normalize_answers(rec["answer"])
    if "id" in rec and (isinstance(rec["id"], bool) or not isinstance(rec["id"], (str, int))):
        raise InputError(f"id must be a string or an integer; got {rec['id']!r}")
    media = [f for f in MEDIA_FIELDS if f in rec]
    if len(media) != 1:
        raise InputError("needs exactly one of image, images, video" + (f" (has {', '.join(media)})" if media
                                                                       else " (missing media)"))
    value = rec[media[0]]
    if media[0] == "image" and isinstance(value, list):
        raise InputError(f"image must be one path; got a list of {len(value)}",
                         hint='for several images of one sample write "images": [...]')
    paths = [value] if isinstance(value, str) and media[0] != "images" else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        kind = "a path" if media[0] == "image" else "a non-empty list of paths" + (
            " or one video file" if media[0] == "video" else "")
        raise InputError(f"{media[0]} must be {kind}; got {value!r}")
    region = rec.get("region")
    if region is not None and not (isinstance(region, list) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in c)
            for c in region)):
        raise InputError(f"region must be a list of [frame, row, col] integer cells; got {region!r}")
    if "kind" in rec and not isinstance(rec["kind"], str):
        raise InputError(f"kind must be a string; got {rec['kind']!r}")
    if "match" in rec:
        from explainprune.matchers import check_rule

        try:
            check_rule(str(rec["match"]))
        except ValueError as err:
            raise InputError(str(err)) from None
    fps = rec.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise InputError(f"fps must be a positive number; got {fps!r}")
    return paths


def check_limit(limit: int | None, flag: str = "--limit") -> int | None:
    """``limit`` unchanged when it is None or a positive integer; InputError otherwise."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"{flag} must be a positive number of samples; got {limit!r}")
    return limit


class ManifestSource:
    """A JSONL manifest, one sample a line: ``question``, ``answer`` and ``image`` (path), ``images`` (paths)
    or ``video`` (frame paths, or one video file, ``max_frames`` frames sampled evenly); optional ``id``,
    ``region`` ([[frame, row, col], ...] token cells), ``kind``, ``match`` (the answer matcher for this line,
    ``explainprune.matchers``) and ``fps`` (the rate the listed frames were sampled at; Qwen2.5-VL's
    temporal positions use it). Paths are relative to the manifest.
    ``answer`` is a string, a number or a list of acceptable answers. (``DigitsTask.export`` writes this
    format.) Every line is checked when the source is built (fields, types, media files exist), so a bad
    line fails before any model work, with its line number and sample id; the first ``limit`` lines are used.
    """

    def __init__(self, path: str | Path, limit: int | None = None, max_frames: int = 8, on_error: str = "stop"):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "manifest.jsonl"
        if not self.path.is_file():
            raise FileNotFoundError(f"no manifest at {path}")
        check_limit(limit)
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise InputError(f"max_frames must be a positive integer; got {max_frames!r}")
        try:
            text = self.path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is skipped
        except UnicodeDecodeError as err:
            raise InputError(f"not a UTF-8 text file ({err})", file=self.path) from None
        numbered = [(k + 1, ln) for k, ln in enumerate(text.splitlines()) if ln.strip()]
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []
        self.bad: dict[int, InputError] = {}  # with on_error="skip": samples whose image headers are bad
        errors: list[InputError] = []
        seen: dict[str, int] = {}
        for line, raw in numbered[:limit]:
            sample = None
            try:
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise InputError(f"not JSON ({err})") from None
                if isinstance(rec, dict) and "id" in rec:
                    sample = str(rec["id"])
                paths = _check_record(rec)
                sid = str(rec.get("id", len(self.records)))
                if sid in seen:
                    raise InputError(f"id {sid!r} repeats line {seen[sid]}", hint="ids must be unique")
                seen[sid] = line
                for rel in paths:
                    if not (self.path.parent / rel).is_file():
                        raise InputError(f"no file {self.path.parent / rel}", hint="fix the path (relative to "
                                         "the manifest) or remove the line")
                try:
                    self._check_media(rec)
                except InputError as err:  # an unreadable image: stops here, or its sample is skipped later
                    if on_error != "skip":
                        raise
                    self.bad[len(self.records)] = InputError(err.message, file=self.path, line=line,
                                                             sample=sid, hint=err.hint)
            except InputError as err:
                errors.append(InputError(err.message, file=self.path, line=line, sample=sample, hint=err.hint))
                continue
            self.records.append(rec)
            self.lines.append(line)
        if errors:
            first = errors[0]
            more = f" (and {len(errors) - 1} more bad line{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
            raise InputError(first.message + more, file=first.file, line=first.line, sample=first.sample,
                             hint=first.hint)
        if not self.records:
            raise InputError("holds no samples", file=self.path)
        self.limit, self.max_frames = limit, max_frames

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> dict[str, Any]:
        """Where sample ``i`` comes from (for messages): file, line and id."""
        return {"file": str(self.path), "line": self.lines[i], "sample": str(self.records[i].get("id", i))}

    def _check_media(self, rec: dict[str, Any]) -> None:
        """Every image of ``rec`` (image, images, video frames; not a video file) checked from its header
        (``images.check_image``: decodable, not animated, aspect ratio accepted); InputError otherwise."""
        value = next(rec[f] for f in MEDIA_FIELDS if f in rec)
        if isinstance(value, str) and "video" in rec:
            return
        for rel in [value] if isinstance(value, str) else value:
            check_image(self.path.parent / rel)

    def _open(self, rel: str) -> Any:
        return open_image(self.path.parent / rel)

    def __getitem__(self, i: int) -> LabelSample:
        """Sample ``i``, its media decoded; a corrupt or unreadable file raises InputError with the line."""
        if i in self.bad:
            raise self.bad[i]
        rec = self.records[i]
        images = video = None
        try:
            if "image" in rec:
                images = self._open(rec["image"])
            elif "images" in rec:
                images = [self._open(p) for p in rec["images"]]
            elif isinstance(rec["video"], str):
                video = read_video(self.path.parent / rec["video"], self.max_frames)
            else:
                video = Video([self._open(p) for p in rec["video"]], fps=rec.get("fps"))
        except InputError as err:  # refused by open_image (an animated image)
            where = self.where(i)
            raise InputError(err.message, file=where["file"], line=where["line"], sample=where["sample"],
                             hint=err.hint) from None
        except Exception as err:  # PIL / PyAV raise many types for damaged files
            where = self.where(i)
            raise InputError(f"cannot read its media ({type(err).__name__}: {err})", file=where["file"],
                             line=where["line"], sample=where["sample"],
                             hint="fix or replace the file, or pass --on-error skip") from None
        region = [tuple(c) for c in rec["region"]] if rec.get("region") is not None else None
        meta = {k: v for k, v in rec.items() if k in ("kind", "match")}
        answers = normalize_answers(rec["answer"])
        answer = answers[0] if len(answers) == 1 else answers
        return LabelSample(str(rec.get("id", i)), rec["question"], answer, images=images, video=video,
                           region=region, meta=meta)

    def _media_paths(self, i: int) -> list[Path]:
        """The media files of sample ``i`` (image(s), frame files or a video file), relative to the manifest."""
        value = next(self.records[i][f] for f in MEDIA_FIELDS if f in self.records[i])
        return [self.path.parent / rel for rel in ([value] if isinstance(value, str) else value)]

    def media_files(self, i: int) -> list[Path]:
        """The files sample ``i`` reads, resolved (the same paths whichever folder or symlink the manifest was
        named from); no file is read."""
        return [p.resolve() for p in self._media_paths(i)]

    def sample_digest(self, i: int) -> str:
        """A digest of sample ``i``: its record and the bytes of its media files (same digest, same sample)."""
        h = hashlib.sha256(json.dumps(self.records[i], sort_keys=True).encode())
        for path in self._media_paths(i):
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(b"<missing>")
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        return {"task": "manifest", "manifest": str(self.path.resolve()), "sha256": digest, "limit": self.limit,
                "max_frames": self.max_frames}


class VideoClip(Video):
    """Frames sampled from a video file: a ``Video`` (a list of RGB PIL images with ``fps``, the rate of the
    SAMPLED frames: source fps x kept / total, None when the file states no rate), plus when they are shown.

    timestamps    seconds of each kept frame from the first frame of the file (None when unknown)
    source_fps    the file's frame rate; total_frames: frames in the file; indices: the kept frame numbers
    """

    def __init__(self, frames: list[Any], timestamps: list[float] | None, fps: float | None,
                 source_fps: float | None, total_frames: int, indices: list[int]):
        super().__init__(frames, fps=fps)
        self.timestamps, self.source_fps = timestamps, source_fps
        self.total_frames, self.indices = total_frames, indices


def sample_indices(total: int, max_frames: int) -> list[int]:
    """Up to ``max_frames`` evenly spaced frame numbers of ``total`` (frame int(k * total / max_frames))."""
    step = max(1, total / max_frames)
    return [int(k * step) for k in range(min(max_frames, total))]


def read_video(path: str | Path, max_frames: int = 8) -> VideoClip:
    """Up to ``max_frames`` evenly spaced RGB frames of a video file (needs PyAV: ``pip install av``), as a
    ``VideoClip`` (a ``Video``: its ``fps`` is the rate of the sampled frames, the file's frame rate times
    the share of frames kept; None when the file states no rate).

    Only the sampled frames are decoded: the packets are read once (no decoding) for their timestamps,
    then for each sampled frame the file is seeked to the keyframe before it and decoded forward to it
    (or decoding just continues when no keyframe lies in between). Memory holds the kept frames and the
    decoder's reference frames, not the whole clip. Files without timestamps are decoded in one pass,
    keeping only the sampled frames. Same frames as decoding everything and taking frame
    ``int(k * total / max_frames)``."""
    try:
        import av
    except ImportError:
        raise ValueError(f"reading {path} needs PyAV (pip install 'explainprune[video]')") from None
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1; got {max_frames}")
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} holds no video stream")
        stream = container.streams.video[0]
        pts, keys, count = _packet_index(container, stream)
        if count == 0:
            raise ValueError(f"{path} holds no video frames")
        indices = sample_indices(count, max_frames)
        frames = _seek_frames(container, stream, [pts[i] for i in indices], keys) if pts else None
        tb = float(stream.time_base or 0)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
    if frames is None:  # no usable timestamps: one pass, keeping only the sampled frames
        with av.open(str(path)) as container:
            frames = _scan_frames(container, container.streams.video[0], indices)
    if not rate and pts and tb and pts[-1] > pts[0]:
        rate = (count - 1) / ((pts[-1] - pts[0]) * tb)
    times = [(pts[i] - pts[0]) * tb for i in indices] if pts and tb else [i / rate for i in indices] if rate else None
    return VideoClip(frames, times, rate * len(indices) / count if rate else None, rate or None, count, indices)


def _packet_index(container: Any, stream: Any) -> tuple[list[int], list[int], int]:
    """(sorted frame pts, sorted keyframe pts, frame count) from the packets alone (nothing decoded);
    the pts lists are empty when a packet has no timestamp."""
    pts: list[int] | None = []
    keys: list[int] = []
    count = 0
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # the demuxer's flush packet; frames the decoder drops
            continue
        count += 1
        if packet.pts is None:
            pts = None
        elif pts is not None:
            pts.append(int(packet.pts))
            if packet.is_keyframe:
                keys.append(int(packet.pts))
    if pts is None or not keys or len(set(pts)) != len(pts):
        return [], [], count
    return sorted(pts), sorted(keys), count


def _seek_frames(container: Any, stream: Any, wanted: list[int], keys: list[int]) -> list[Any] | None:
    """The frames shown at pts ``wanted`` (ascending), each reached by seeking to the keyframe before it and
    decoding forward (or by decoding on when no keyframe lies between the last frame and it); None when the
    file does not behave (a frame missing, or not reached by seeking)."""
    import bisect

    frames: list[Any] = []
    decoder, last = None, None
    for target in wanted:
        k = bisect.bisect_right(keys, target) - 1
        found = None
        if decoder is not None and last is not None and last < target and keys[k] <= last:
            found, _ = _decode_to(decoder, target)
        while found is None and k >= 0:
            container.seek(keys[k], stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
            found, first = _decode_to(decoder, target)
            if first is None or first <= target:
                break
            found, k = None, k - 1  # the seek landed after the target: start from the keyframe before
        if found is None or found.pts != target:
            return None
        last = found.pts
        frames.append(found.to_image())
    return frames


def _decode_to(decoder: Any, target: int) -> tuple[Any, int | None]:
    """Decode on to the first frame at or after pts ``target``: (that frame or None, first pts decoded)."""
    first = None
    for frame in decoder:
        if frame.pts is None:
            return None, None
        first = frame.pts if first is None else first
        if frame.pts >= target:
            return frame, first
    return None, first


def _scan_frames(container: Any, stream: Any, indices: list[int]) -> list[Any]:
    """Decode in order and keep the frames numbered ``indices`` (ascending)."""
    wanted, out = set(indices), []
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            out.append(frame.to_image())
            if len(out) == len(indices):
                break
    return out
