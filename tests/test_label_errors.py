"""Labelling with bad input: answer lists stored and matched, unreadable media (--on-error), damaged or
truncated shards, a manifest fixed after a failed run, file permissions."""

from __future__ import annotations

import json
import os
import stat

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from explainprune.answers import is_correct
from explainprune.errors import InputError
from explainprune.labels import LabelConfig, LabelOutput, label, read_index, read_table, shard_path
from explainprune.sources import ManifestSource
from hostile_media import truncated_png
from test_labels import FakeVLM  # tests/ is on sys.path (its conftest.py)


class ImageVLM(FakeVLM):
    """Enough of a VLM for the label loop: every image becomes a 1 x 2 x 3 token grid."""

    def prepare(self, images=None, video=None, question=""):
        return super().prepare((1, 2, 3), video, question)


class NineLabeler:
    """Always answers "neun"; correct when one of the sample's answers matches (only the list alternatives do:
    "9" alone does not match "neun", though the exact matcher reads "nine" as 9)."""

    def __init__(self):
        self.seen = []

    def __call__(self, vlm, prompt, sample):
        self.seen.append(sample.id)
        ok = is_correct("neun", sample.answers)
        g = torch.Generator().manual_seed(int(sample.id[1:]))
        return LabelOutput("neun", [1], ok, torch.rand(3, 6, generator=g), torch.rand(6, generator=g))


def write_manifest(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        Image.new("RGB", (8, 8), ("red", "green", "blue")[k]).save(d / f"{k}.png")
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "m.jsonl"


def rows(n, **change):
    out = [{"id": f"q{i}", "question": f"q {i}", "answer": ["9", "neun"] if i % 2 else "9", "image": f"{i % 3}.png"}
           for i in range(n)]
    for i, rec in change.items():
        out[int(i[1:])] = rec
    return out


def test_list_answers_are_matched_and_stored(tmp_path):
    path = write_manifest(tmp_path / "data", rows(4))
    rep = label(ImageVLM(), ManifestSource(path), tmp_path / "out", LabelConfig(shard_size=2), labeler=NineLabeler(),
                progress=False)
    assert rep.complete and rep.totals["labeled"] == 2 and rep.totals["skipped_wrong"] == 2
    t = read_table(tmp_path / "out").to_pydict()
    assert t["id"] == ["q1", "q3"] and t["references"] == [["9", "neun"]] * 2 and t["reference"][0] == "9 | neun"


def broken(tmp_path, n=6, bad=3):
    d = tmp_path / "data"
    path = write_manifest(d, rows(n, **{f"r{bad}": {"id": f"q{bad}", "question": "q", "answer": "9",
                                                    "image": "broken.png"}}))
    (d / "broken.png").write_bytes(truncated_png())  # its header reads: found when the sample is decoded
    return path


def test_unreadable_image_stops_and_keeps_finished_shards(tmp_path):
    path = broken(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"m.jsonl:4: sample q3: cannot read its media"):
        label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=NineLabeler(), progress=False)
    assert shard_path(out, 0).is_file() and not shard_path(out, 1).exists()
    # the image is fixed: the rerun keeps shard 0 and does the rest
    Image.new("RGB", (8, 8), "white").save(path.parent / "broken.png")
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False)
    assert rep.complete and rep.shards_reused == 1 and lab.seen == ["q2", "q3", "q4", "q5"]


def test_on_error_skip_lists_the_sample_and_retries_it_once_fixed(tmp_path):
    path = broken(tmp_path)
    out = tmp_path / "out"
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=NineLabeler(),
                progress=False, on_error="skip")
    assert rep.complete and rep.totals["skipped_error"] == 1
    assert [(e["id"], e["line"]) for e in rep.errors] == [("q3", 4)] and "cannot read" in rep.errors[0]["error"]
    assert read_index(out)["errors"] == rep.errors
    idle = NineLabeler()
    label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=idle, progress=False,
          on_error="skip")
    assert idle.seen == []  # still broken: nothing to redo
    Image.new("RGB", (8, 8), "white").save(path.parent / "broken.png")
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False,
                on_error="skip")
    assert lab.seen == ["q2", "q3"] and rep.totals["skipped_error"] == 0 and rep.errors == []


def test_fixed_manifest_resumes_unchanged_shards(tmp_path):
    d = tmp_path / "data"
    path = write_manifest(d, rows(6, r3={"id": "q3", "question": "q", "answer": "9", "image": "gone.png"}))
    with pytest.raises(InputError, match="m.jsonl:4: sample q3: no file"):
        ManifestSource(path)
    path = write_manifest(d, rows(4))  # a first run on the first 4 lines
    out = tmp_path / "out"
    label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=NineLabeler(), progress=False)
    before = shard_path(out, 0).read_bytes()
    fixed = rows(6, r3={"id": "q3", "question": "q fixed", "answer": "9", "image": "0.png"})
    write_manifest(d, fixed)
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False)
    assert lab.seen == ["q2", "q3", "q4", "q5"] and rep.shards_reused == 1 and rep.complete
    assert shard_path(out, 0).read_bytes() == before and read_index(out)["samples"] == 6


def test_other_manifest_is_still_refused(tmp_path):
    a = write_manifest(tmp_path / "a", rows(2))
    b = write_manifest(tmp_path / "b", rows(2))
    label(ImageVLM(), ManifestSource(a), tmp_path / "out", labeler=NineLabeler(), progress=False)
    with pytest.raises(InputError, match="different run .*source"):
        label(ImageVLM(), ManifestSource(b), tmp_path / "out", labeler=NineLabeler(), progress=False)


def _labelled(tmp_path, n=6):
    path = write_manifest(tmp_path / "data", rows(n))
    out = tmp_path / "out"
    label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=NineLabeler(), progress=False)
    return path, out


def test_damaged_shard_is_refused_by_readers_and_redone_by_label(tmp_path):
    path, out = _labelled(tmp_path)
    good = shard_path(out, 1).read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle: parquet still opens
    shard_path(out, 1).write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"00001.parquet: is damaged \(its SHA-256 differs"):
        read_table(out)
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False)
    assert lab.seen == ["q2", "q3"] and rep.shards_reused == 2
    assert shard_path(out, 1).read_bytes() == good and read_table(out).num_rows == 3


def test_truncated_shard_is_redone_before_the_index_exists(tmp_path):
    path, out = _labelled(tmp_path)
    (out / "index.json").unlink()  # an unfinished run (e.g. other ranks still working)
    good = shard_path(out, 2).read_bytes()
    shard_path(out, 2).write_bytes(good[: len(good) // 2])
    lab = NineLabeler()
    rep = label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False)
    assert lab.seen == ["q4", "q5"] and rep.complete and shard_path(out, 2).read_bytes() == good


def test_middle_damage_caught_by_page_checksums_without_the_index(tmp_path):
    path, out = _labelled(tmp_path)
    (out / "index.json").unlink()
    meta = pq.ParquetFile(shard_path(out, 0)).metadata
    col = meta.row_group(0).column(SCHEMA_ATTENTION := 13)  # the attention values' data pages
    assert meta.schema.column(SCHEMA_ATTENTION).path.startswith("attention")
    data = bytearray(shard_path(out, 0).read_bytes())
    at = col.data_page_offset + col.total_compressed_size - 8
    data[at] ^= 0xFF
    shard_path(out, 0).write_bytes(bytes(data))
    lab = NineLabeler()
    label(ImageVLM(), ManifestSource(path), out, LabelConfig(shard_size=2), labeler=lab, progress=False)
    assert lab.seen == ["q0", "q1"]


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _, out = _labelled(tmp_path)
        for p in [shard_path(out, 0), out / "index.json", out / "run.json"]:
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    finally:
        os.umask(old)


def test_fixed_manifest_seen_by_a_second_rank_after_rank_0_recorded_it(tmp_path):
    """Under torchrun another rank may find run.json already updated: its shards still know their revision."""
    import explainprune.labels as labels

    d = tmp_path / "data"
    path = write_manifest(d, rows(4))
    out = tmp_path / "out"
    cfg = LabelConfig(shard_size=2)
    label(ImageVLM(), ManifestSource(path), out, cfg, labeler=NineLabeler(), progress=False)
    write_manifest(d, rows(4, r3={"id": "q3", "question": "q fixed", "answer": "9", "image": "0.png"}))
    labels._check_run(out, labels._run_record(ManifestSource(path), cfg, ImageVLM().fingerprint()))  # rank 0
    lab = NineLabeler()
    label(ImageVLM(), ManifestSource(path), out, cfg, labeler=lab, progress=False)
    assert lab.seen == ["q2", "q3"]
