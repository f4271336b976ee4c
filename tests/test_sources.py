"""Label sample sources: manifests (images, frame lists, errors), the digits source, and the old import path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import explainprune.labels as labels
import explainprune.sources as sources
from explainprune.errors import InputError
from explainprune.sources import LabelSample, ManifestSource
from explainprune.testing import write_video
from hostile_media import NOT_AN_IMAGE, truncated_png


def test_labels_reexports_the_sources():
    for name in ("DigitsSource", "ManifestSource", "read_video", "LabelSample", "SampleSource"):
        assert getattr(labels, name) is getattr(sources, name)


def test_manifest_reads_images_frames_regions(tmp_path):
    for k, colour in enumerate(("red", "green")):
        Image.new("RGB", (4, 3), colour).save(tmp_path / f"{k}.png")
    rows = [{"id": "a", "question": "q1", "answer": "7", "image": "0.png", "region": [[0, 1, 2]], "kind": "rowcol"},
            {"question": "q2", "answer": "3", "images": ["0.png", "1.png"], "extra": 1},
            {"question": "q3", "answer": "5", "video": ["0.png", "1.png", "0.png"]}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    man = ManifestSource(tmp_path)  # a folder means its manifest.jsonl
    assert len(man) == 3
    a, b, c = man[0], man[1], man[2]
    assert isinstance(a, LabelSample)
    assert (a.id, a.question, a.answer, a.region, a.meta) == ("a", "q1", "7", [(0, 1, 2)], {"kind": "rowcol"})
    assert a.images.size == (4, 3) and a.images.mode == "RGB" and a.video is None
    assert (b.id, b.region, b.meta, len(b.images)) == ("1", None, {}, 2)
    assert c.images is None and len(c.video) == 3
    d = man.describe()
    assert d["task"] == "manifest" and d["limit"] is None and d["max_frames"] == 8 and len(d["sha256"]) == 16
    assert len(ManifestSource(tmp_path / "manifest.jsonl", limit=2)) == 2


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ManifestSource(tmp_path / "none.jsonl")
    (tmp_path / "m.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="m.jsonl:1: missing answer"):
        ManifestSource(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="m.jsonl:1: not JSON"):
        ManifestSource(tmp_path / "m.jsonl")


def test_digits_source_is_deterministic():
    pytest.importorskip("explainprune.tasks.digits")
    from explainprune.sources import DigitsSource

    src = DigitsSource(split="test", seed=1, n=3, grid=2, kinds=("rowcol",))
    assert len(src) == 3
    s, again = src[0], DigitsSource(split="test", seed=1, n=3, grid=2, kinds=("rowcol",))[0]
    assert (s.id, s.question, s.answer, s.region, s.meta) == (again.id, again.question, again.answer,
                                                              again.region, again.meta)
    assert s.meta == {"kind": "rowcol"} and all(isinstance(c, tuple) and len(c) == 3 for c in s.region)
    assert src.describe() == {"task": "digits", "split": "test", "seed": 1, "n": 3, "grid": 2, "kinds": ["rowcol"]}


def test_read_video_reports_the_sampled_fps(tmp_path):
    pytest.importorskip("av")
    import numpy as np

    from explainprune.models.base import Video

    path = write_video(tmp_path / "v.mp4", lambda i: np.full((32, 32, 3), i * 12, dtype=np.uint8), 20, 10)  # 2 s
    video = sources.read_video(path, max_frames=4)  # frames 0, 5, 10, 15: 4 frames over 2 s
    assert isinstance(video, Video) and isinstance(video, list) and len(video) == 4
    assert video.fps == pytest.approx(2.0)
    assert [round(float(np.asarray(f).mean()) / 12) for f in video] == [0, 5, 10, 15]
    assert sources.read_video(path, max_frames=50).fps == pytest.approx(10.0)  # every frame: the file's rate
    # a manifest's frame list carries its optional fps
    Image.new("RGB", (4, 3)).save(tmp_path / "f.png")
    rows = [{"question": "q", "answer": "a", "video": ["f.png", "f.png"], "fps": 0.5},
            {"question": "q", "answer": "a", "video": ["f.png"]}, {"question": "q", "answer": "a", "video": "v.mp4"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    man = ManifestSource(tmp_path / "m.jsonl", max_frames=4)
    assert [man[i].video.fps for i in range(3)] == [0.5, None, pytest.approx(2.0)]


def _manifest(tmp_path, rows, name="m.jsonl"):
    Image.new("RGB", (4, 3), "red").save(tmp_path / "0.png")
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_manifest_answer_lists_and_numbers(tmp_path):
    path = _manifest(tmp_path, [{"id": "a", "question": "q", "answer": ["9", "nine"], "image": "0.png"},
                                {"id": "b", "question": "q", "answer": 9, "image": "0.png"}])
    man = ManifestSource(path)
    assert man[0].answer == ("9", "nine") and man[0].answers == ("9", "nine")
    assert man[1].answer == "9" and man[1].answers == ("9",)


OK = {"question": "q", "answer": "1", "image": "0.png"}


@pytest.mark.parametrize("bad, message", [
    ({**OK, "answer": {"x": 1}}, "answer must be a string, a number or a list"),
    ({**OK, "answer": None}, "answer must be"),
    ({**OK, "answer": []}, "answer is an empty list"),
    ({**OK, "question": ""}, "question is empty"),
    ({**OK, "question": "   "}, "question is empty"),
    ({**OK, "question": 3}, "question must be a string"),
    ({**OK, "image": "missing.png"}, "no file .*missing.png"),
    ({"question": "q", "answer": "1", "video": ["0.png", "gone.png"]}, "no file .*gone.png"),
    ({**OK, "images": []}, "exactly one of image, images, video"),
    ({"question": "q", "answer": "1", "images": []}, "images must be a non-empty list"),
    ({**OK, "region": [[0, 1]]}, "region must be"),
    ({**OK, "id": "first"}, "id 'first' repeats line 1"),
    ("[1, 2]", "must be a JSON object"),
])
def test_manifest_lines_checked_up_front(tmp_path, bad, message):
    path = _manifest(tmp_path, [{**OK, "id": "first"}, bad])
    with pytest.raises(InputError, match=message) as info:
        ManifestSource(path)
    assert info.value.line == 2 and str(info.value).startswith(f"{path}:2: ")


def test_manifest_error_names_the_sample_and_counts_the_others(tmp_path):
    path = _manifest(tmp_path, [{**OK, "id": "x1", "question": ""}, {**OK, "id": "x2", "image": "none.png"}])
    with pytest.raises(InputError, match=r"m.jsonl:1: sample x1: question is empty \(and 1 more bad line\)"):
        ManifestSource(path)


@pytest.mark.parametrize("limit", [0, -2, 1.5])
def test_limit_must_be_positive(tmp_path, limit):
    path = _manifest(tmp_path, [OK, OK, OK])
    with pytest.raises(InputError, match="--limit must be a positive number"):
        ManifestSource(path, limit=limit)
    with pytest.raises(InputError, match="--limit must be a positive number"):
        sources.DigitsSource(n=limit)


def test_corrupt_image_met_later_names_its_line(tmp_path):
    path = _manifest(tmp_path, [OK, {**OK, "id": "bad", "image": "broken.png"}])
    (tmp_path / "broken.png").write_bytes(truncated_png())
    man = ManifestSource(path)  # the file exists and its header reads: found only when decoded
    with pytest.raises(InputError, match=r"m.jsonl:2: sample bad: cannot read its media.*--on-error skip"):
        man[1]


def test_undecodable_image_header_is_refused_up_front_or_kept_for_skip(tmp_path):
    path = _manifest(tmp_path, [OK, {**OK, "id": "bad", "image": "broken.png"}])
    (tmp_path / "broken.png").write_bytes(NOT_AN_IMAGE)
    with pytest.raises(InputError, match=r"m.jsonl:2: sample bad: cannot read .*broken.png as an image"):
        ManifestSource(path)  # before any model work
    man = ManifestSource(path, on_error="skip")  # built; the sample fails when read (label/eval skip it)
    assert len(man) == 2 and man[0].id == "0"
    with pytest.raises(InputError, match=r"m.jsonl:2: sample bad: cannot read .*broken.png as an image") as err:
        man[1]
    assert (err.value.line, err.value.sample) == (2, "bad")


def test_sample_digest_follows_the_media_bytes(tmp_path):
    path = _manifest(tmp_path, [OK])
    man = ManifestSource(path)
    before = man.sample_digest(0)
    assert ManifestSource(path).sample_digest(0) == before
    Image.new("RGB", (4, 3), "blue").save(tmp_path / "0.png")
    assert man.sample_digest(0) != before


# -- video files: decoded by seeking to the sampled frames only ------------------------------------------
def write_clip(path, frames: int = 900, size: tuple[int, int] = (64, 48), codec: str = "libx264", gop: int = 30):
    """A ``frames``-frame 30 fps clip whose every frame differs (moving bar, colour ramp)."""
    pytest.importorskip("av")
    import numpy as np

    w, h = size

    def pixels(i: int) -> np.ndarray:
        img = np.zeros((h, w, 3), np.uint8)
        img[..., 0], img[..., 1] = (i * 7) % 256, (i // 30 * 40) % 256
        img[i % h, :, 2] = 255
        return img

    return write_video(path, pixels, frames, 30, codec=codec, gop=gop)


def full_decode_reference(path, max_frames: int = 8) -> list:
    """The previous read_video: decode every frame, then take frame int(k * total / max_frames)."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    step = max(1, len(frames) / max_frames)
    return [frames[int(k * step)] for k in range(min(max_frames, len(frames)))]


@pytest.mark.parametrize("codec, gop, name", [("libx264", 30, "clip.mp4"), ("mpeg4", 12, "clip.mp4"),
                                              ("libx264", 250, "clip.mkv")])
def test_read_video_seeks_to_the_same_frames_as_a_full_decode(tmp_path, monkeypatch, codec, gop, name):
    import numpy as np

    path = write_clip(tmp_path / name, codec=codec, gop=gop)
    # the seeking path must serve these files: the one-pass fallback is not allowed to run
    monkeypatch.setattr(sources, "_scan_frames", lambda *a: pytest.fail("fell back to a full decode"))
    for max_frames in (8, 5, 1, 900, 1000):
        clip, ref = sources.read_video(path, max_frames), full_decode_reference(path, max_frames)
        assert len(clip) == len(ref) == min(max_frames, 900)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip, ref))
    clip = sources.read_video(path, 8)
    assert isinstance(clip, list) and all(f.mode == "RGB" and f.size == (64, 48) for f in clip)
    assert clip.total_frames == 900 and clip.indices == [int(k * 112.5) for k in range(8)]
    assert clip.source_fps == pytest.approx(30) and clip.fps == pytest.approx(30 * 8 / 900)
    assert clip.timestamps == pytest.approx([i / 30 for i in clip.indices], abs=2e-3)


def test_read_video_without_timestamps_scans_once(tmp_path, monkeypatch):
    import numpy as np

    path = write_clip(tmp_path / "clip.mp4", frames=40)
    monkeypatch.setattr(sources, "_packet_index", lambda c, s: ([], [], sum(1 for _ in c.demux(s)) - 1))
    clip, ref = sources.read_video(path, 6), full_decode_reference(path, 6)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(clip, ref)) and len(clip) == 6
    assert clip.fps == pytest.approx(30 * 6 / 40)


PEAK_RSS = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("sources_under_test", {module!r})
mod = sys.modules["sources_under_test"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
import av, PIL.Image  # imported before the baseline
def full(path):
    with av.open(path) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    return [frames[int(k * len(frames) / 8)] for k in range(8)]
def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = peak_kb()
frames = (full if sys.argv[2] == "full" else mod.read_video)(sys.argv[1])
assert len(frames) == 8
print((peak_kb() - before) / 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_read_video_memory_stays_bounded(tmp_path):
    """900 frames of 160x120: decoding them all holds ~50 MB of RGB images (plus decoder frames); seeking
    holds the 8 kept ones. Peak RSS growth is measured in a fresh process (Linux VmHWM)."""
    import subprocess
    import sys

    path = write_clip(tmp_path / "clip.mp4", size=(160, 120), codec="mpeg4", gop=30)
    code = PEAK_RSS.format(module=sources.__file__)

    def peak_mb(kind: str) -> float:
        out = subprocess.run([sys.executable, "-c", code, str(path), kind], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    bound = 32.0
    assert peak_mb("seek") < bound
    assert peak_mb("full") > bound  # the bound tells the two apart: the old full decode exceeds it


def test_manifest_video_file_gives_a_clip_with_its_fps(tmp_path):
    write_clip(tmp_path / "v.mp4", frames=60)
    row = {"question": "q", "answer": "a", "video": "v.mp4"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    sample = ManifestSource(tmp_path, max_frames=4)[0]
    assert isinstance(sample.video, sources.VideoClip) and len(sample.video) == 4
    assert sample.video.fps == pytest.approx(30 * 4 / 60) and sample.video.indices == [0, 15, 30, 45]
