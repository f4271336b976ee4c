"""Media stamps: a media file replaced on disk under the same path (manifest / dataset files unchanged) is
noticed on resume, by size and modification time only, and exactly its shard is labelled again."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
from PIL import Image

from explainprune.cli.main import main
from explainprune.labels import LabelConfig, label, shard_path
from explainprune.shards import META_KEY, media_stamp, shard_meta, write_shard
from explainprune.sources import DigitsSource, ManifestSource
from explainprune.tasks.digits import DigitsTask
from test_label_errors import ImageVLM, NineLabeler

COLOURS = ("red", "green", "blue", "white", "black", "yellow")


def replace_file(path, data: bytes) -> None:
    """Write other bytes under the same path, its modification time surely moved on."""
    before = os.stat(path)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))


def png(colour: str, size: int = 8) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def shard_bytes(out, n=3):
    return [shard_path(out, s).read_bytes() for s in range(n)]


def run(path, out, **kw):
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False, **kw)
    return lab.seen, rep


def image_manifest(d):
    d.mkdir()
    for k, c in enumerate(COLOURS):
        (d / f"{k}.png").write_bytes(png(c))
    rows = [{"id": f"q{i}", "question": f"q {i}", "answer": "neun", "image": f"{i}.png"} for i in range(6)]
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def test_replaced_image_relabels_exactly_its_shard(tmp_path):
    path, out = image_manifest(tmp_path / "data"), tmp_path / "out"
    seen, rep = run(path, out)
    assert rep.complete and len(seen) == 6
    before = shard_bytes(out)
    replace_file(path.parent / "3.png", png("purple", 9))  # sample q3: shard 1
    seen, rep = run(path, out)
    assert seen == ["q2", "q3"] and rep.shards_written == 1 and rep.shards_reused == 2 and rep.complete
    after = shard_bytes(out)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    seen, rep = run(path, out)  # the new stamp is recorded: nothing to do
    assert seen == [] and rep.shards_written == 0 and shard_bytes(out) == after


def test_touched_image_with_the_same_bytes_is_kept(tmp_path):
    """A changed stamp makes the shard compare its samples' digest (a manifest's: the media bytes)."""
    path, out = image_manifest(tmp_path / "data"), tmp_path / "out"
    run(path, out)
    before = shard_bytes(out)
    replace_file(path.parent / "3.png", (path.parent / "3.png").read_bytes())
    seen, rep = run(path, out)
    assert seen == [] and rep.shards_reused == 3 and shard_bytes(out) == before


def test_shards_without_a_stamp_keep_the_old_behaviour(tmp_path):
    path, out = image_manifest(tmp_path / "data"), tmp_path / "out"
    run(path, out)
    p = shard_path(out, 1)
    table = pq.read_table(p)
    meta = shard_meta(p)
    assert meta["media_stamp"] == media_stamp(ManifestSource(path), 2, 4)
    del meta["media_stamp"]  # as written before stamps existed
    write_shard(p, table.to_pylist(), meta)
    (out / "index.json").unlink()
    replace_file(path.parent / "3.png", png("purple", 9))
    seen, _ = run(path, out)
    assert seen == []


def test_stamp_is_stat_only_and_digits_have_none(tmp_path, monkeypatch):
    path = image_manifest(tmp_path / "data")
    src = ManifestSource(path)
    assert src.media_files(2) == [(tmp_path / "data" / "2.png").absolute()]
    stamp, stamp_0_4 = media_stamp(src, 0, 6), media_stamp(src, 0, 4)

    def no_read(*a, **k):
        raise AssertionError("a stamp must not read files")

    monkeypatch.setattr("builtins.open", no_read)
    monkeypatch.setattr(type(path), "read_bytes", no_read)
    assert media_stamp(src, 0, 6) == stamp and len(stamp) == 16
    monkeypatch.undo()
    (path.parent / "5.png").unlink()  # a missing file changes the stamp too
    assert media_stamp(src, 0, 6) != stamp and media_stamp(src, 0, 4) == stamp_0_4
    assert media_stamp(DigitsSource(n=4), 0, 4) is None


def video_manifest(d):
    d.mkdir()
    rows = []
    for i in range(4):
        frames = [f"v{i}_{f}.png" for f in range(3)]
        for f, name in enumerate(frames):
            (d / name).write_bytes(png(COLOURS[(i + f) % 6]))
        rows.append({"id": f"q{i + 1}", "question": "q", "answer": "neun", "video": frames})
    (d / "clip.mp4").write_bytes(b"not decoded by a stamp")
    rows.append({"id": "q5", "question": "q", "answer": "neun", "video": "clip.mp4"})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def test_video_frame_or_file_replaced_changes_the_stamp(tmp_path):
    path, out = video_manifest(tmp_path / "data"), tmp_path / "out"
    src = ManifestSource(path)
    assert [p.name for p in src.media_files(1)] == ["v1_0.png", "v1_1.png", "v1_2.png"]
    assert [p.name for p in src.media_files(4)] == ["clip.mp4"]
    file_stamp = media_stamp(src, 4, 5)
    replace_file(path.parent / "clip.mp4", b"another clip, longer than before")
    assert media_stamp(src, 4, 5) != file_stamp
    # frame lists through a label run (the file sample is left out: the fake model reads no video files)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))
    seen, rep = run(path, out)
    assert rep.complete and len(seen) == 4
    before = shard_bytes(out, 2)
    replace_file(path.parent / "v3_1.png", png("purple", 9))  # sample q4 (index 3): shard 1
    seen, rep = run(path, out)
    assert seen == ["q3", "q4"] and rep.shards_reused == 1
    assert shard_bytes(out, 2)[0] == before[0]
    assert run(path, out)[0] == []


def digits_rows(folder, n, seed, cell=lambda rel: rel):
    """LLaVA rows of ``n`` digits questions whose images are saved as ``folder``/i.png; ``cell`` maps the
    image's path (relative to ``folder``'s parent) to the row's image value."""
    folder.mkdir(parents=True)
    task = DigitsTask("test", seed=seed, n=n, kinds=("rowcol",))
    rows = []
    for i in range(len(task)):
        s = task.sample(i)
        s.image.save(folder / f"{i}.png")
        rows.append({"id": s.id, "image": cell(f"{folder.name}/{i}.png"), "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]})
    return rows


def test_dataset_image_replaced_relabels_exactly_its_shard(tmp_path, capsys):
    root = tmp_path / "llava"
    rows = digits_rows(root / "images", 6, seed=3)
    (root / "d.json").write_text(json.dumps(rows))
    out = tmp_path / "labels"
    args = ["label", "--model", "demo", "--dataset", str(root / "d.json"), "--out", str(out), "--no-progress",
            "--shard-size", "2", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    before = shard_bytes(out)
    data = (root / "d.json").read_bytes()
    other = DigitsTask("test", seed=11, n=1, kinds=("rowcol",)).sample(0).image
    other.save(root / "images" / "2.png")  # sample 2: shard 1
    st = os.stat(root / "images" / "2.png")
    os.utime(root / "images" / "2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_written"] == 1 and rep["shards_reused"] == 2
    after = shard_bytes(out)
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1]
    assert (root / "d.json").read_bytes() == data
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_written"] == 0 and shard_bytes(out) == after
    assert META_KEY in pq.read_schema(shard_path(out, 1)).metadata


def test_touched_image_is_verified_once_then_resumes_by_stat_again(tmp_path, monkeypatch):
    """After a touch (same bytes) the shard's samples are compared once; the verified stamp is kept beside the
    shard, so later resumes are stat-only again (they used to re-read the media bytes on every resume)."""
    import explainprune.shards as shards

    path, out = image_manifest(tmp_path / "data"), tmp_path / "out"
    run(path, out)
    replace_file(path.parent / "3.png", (path.parent / "3.png").read_bytes())
    calls = []
    real = shards.samples_digest
    monkeypatch.setattr(shards, "samples_digest", lambda *a: calls.append(a[1:]) or real(*a))
    for expected in ([(2, 4)], [(2, 4)], [(2, 4)]):  # first resume verifies shard 1; the next ones do not
        seen, rep = run(path, out)
        assert seen == [] and rep.shards_reused == 3
        assert calls == expected
    assert shards.verified_stamp_path(shard_path(out, 1)).is_file()
    replace_file(path.parent / "3.png", png("purple"))  # then a real change is still noticed
    seen, rep = run(path, out)
    assert [s for s in seen] and rep.shards_reused == 2 and not shards.verified_stamp_path(shard_path(out, 1)).exists()


def test_parquet_image_stored_as_a_path_is_stamped(tmp_path, capsys):
    """A parquet image cell {bytes: null, path: ...} (what datasets' to_parquet writes for local files) is
    read lazily; replacing its file must still relabel its shard (it was never stamped)."""
    import pyarrow as pa

    root = tmp_path / "pq"
    rows = digits_rows(root / "img", 4, seed=5, cell=lambda rel: {"bytes": None, "path": rel})
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # typed as datasets writes it
    conv = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("image", image), ("conversations", conv)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "d.parquet")
    out = tmp_path / "labels"
    args = ["label", "--model", "demo", "--dataset", str(root / "d.parquet"), "--out", str(out), "--no-progress",
            "--shard-size", "2", "--json"]
    assert main(args) == 0
    capsys.readouterr()
    before = shard_bytes(out, 2)
    other = DigitsTask("test", seed=11, n=1, kinds=("rowcol",)).sample(0).image
    other.save(root / "img" / "0.png")
    st = os.stat(root / "img" / "0.png")
    os.utime(root / "img" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert main(args) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_written"] == 1 and rep["shards_reused"] == 1
    after = shard_bytes(out, 2)
    assert after[1] == before[1] and after[0] != before[0]
