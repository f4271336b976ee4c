"""Dataset rows read lazily: text up front, embedded images only for the samples that are read."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from explainprune.conversations import ConversationSource, DatasetConfig
from explainprune.dataset_rows import Lazy, media_digest


def _png(seed, size=(12, 16)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _convs(k, tags=1):
    mc = k % 2 == 0
    return [{"from": "human", "value": "<image>\n" * tags + f"What is {k}?" + ("\nA. x\nB. y" if mc else "")},
            {"from": "gpt", "value": "A" if mc else f"thing {k}"}]


def _hf_parquet(path, n, row_group=8):
    """Rows with one embedded image each, typed as the ``datasets`` Image feature (as push_to_hub writes
    them): the ``datasets`` library decodes such a column into PIL images when it reads the file."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": datasets.List({"from": datasets.Value("string"),
                                                                  "value": datasets.Value("string")})})
    table = pa.table({"id": [f"r{k}" for k in range(n)], "image": [{"bytes": _png(k), "path": None} for k in range(n)],
                      "conversations": [_convs(k) for k in range(n)]}).cast(features.arrow_schema)
    pq.write_table(table, path, row_group_size=row_group)
    return path


@pytest.fixture()
def opens(monkeypatch):
    """Every PIL.Image.open call (the decoder both ``datasets`` and the source use), by count."""
    calls = []
    real = Image.open

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def test_building_and_sampling_decodes_no_image(tmp_path, opens):
    """40 rows, 4 sampled: no image is decoded until a sample is read, then exactly the sampled ones, equal
    to the embedded images. (The eager reader decoded all 40 while building the source.)"""
    _hf_parquet(tmp_path / "gpt4.parquet", 40)
    src = ConversationSource(DatasetConfig(str(tmp_path / "gpt4.parquet"), target=4, strata=("task",)))
    src.validate()
    assert len(src) == 4 and src.counts() == {"multi-choice": 2, "open-ended": 2}
    assert opens == []
    assert all(isinstance(im, Lazy) for it in src._all for im in it.images)  # no bytes held
    for i in range(len(src)):
        s = src[i]
        k = int(s.id[1:])
        want = np.asarray(Image.open(io.BytesIO(_png(k))).convert("RGB"))
        assert np.array_equal(np.asarray(s.images[0]), want)
    assert len(opens) == 4 + 4  # the 4 samples, and the 4 references above


def test_only_the_text_and_the_image_paths_are_read_up_front(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{k}" for k in range(20)], "extra": [b"x" * 100] * 20,
                             "image": [{"bytes": _png(k), "path": None} for k in range(20)],
                             "conversations": [_convs(k) for k in range(20)]}), tmp_path / "d.parquet",
                   row_group_size=5)
    read = []
    real_read, real_group = pq.ParquetFile.read, pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read", lambda self, columns=None, **k: (
        read.append(tuple(columns or ())), real_read(self, columns=columns, **k))[1])
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, columns=None, **k: (
        read.append((g, *(columns or ()))), real_group(self, g, columns=columns, **k))[1])
    src = ConversationSource(DatasetConfig(str(tmp_path / "d.parquet"), target=2, strata=("task",)))
    assert read and all("image" not in r and "extra" not in r for r in read)  # never the bytes
    assert ("image.path",) in read
    read.clear()
    fetched = [src._all[i].row for i in src.indices]
    assert [src[i].id for i in range(2)] == [f"r{k}" for k in fetched]
    assert sorted({r[0] for r in read}) == sorted({k // 5 for k in fetched})  # the selected rows' groups only
    assert all(r[1:] == ("image",) for r in read)


def test_binary_image_lists_with_nulls_and_tag_counts(tmp_path):
    """A list<binary> column has no text leaf: its shape is read group by group; counts drive the tag check."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"id": ["a", "b", "c"], "images": [[_png(1), _png(2)], None, []],
            "conversations": [_convs(0, tags=2), _convs(1, tags=0), _convs(3, tags=0)]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet", row_group_size=2)
    src = ConversationSource(DatasetConfig(str(tmp_path / "d.parquet")))
    assert [len(src._all[i].images) for i in range(3)] == [2, 0, 0]
    assert [np.asarray(im).shape for im in src[0].images] == [(12, 16, 3)] * 2 and src[1].images is None
    rows["conversations"][0] = _convs(0, tags=3)
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="row a: 3 <image> tags but 2 images"):
        ConversationSource(DatasetConfig(str(tmp_path / "d.parquet")))


def test_hub_dataset_image_columns_decoded_only_when_read(monkeypatch, opens):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"id": ["h0", "h1", "h2"], "image": [{"bytes": _png(k), "path": None} for k in range(3)],
         "conversations": [_convs(k) for k in range(3)]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "conversations": datasets.List({"from": datasets.Value("string"),
                                                                    "value": datasets.Value("string")})}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, split: ds)
    src = ConversationSource(DatasetConfig("org/infinity-mm", target=1, strata=("task",)))
    assert opens == []
    s = src[0]
    assert len(opens) == 1 and s.meta["subset"] == "org/infinity-mm"
    want = np.asarray(Image.open(io.BytesIO(_png(int(s.id[1:])))).convert("RGB"))
    assert np.array_equal(np.asarray(s.images[0]), want)


def test_sample_digest_follows_the_sample(tmp_path):
    """Same rows, same digests (read or not); an edited answer or replaced image bytes change that sample's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(answer=None, image=None):
        convs = [_convs(k) for k in range(6)]
        images = [{"bytes": _png(k), "path": None} for k in range(6)]
        if answer:
            convs[2][1]["value"] = answer
        if image:
            images[4]["bytes"] = image
        pq.write_table(pa.table({"id": [f"r{k}" for k in range(6)], "image": images, "conversations": convs}),
                       tmp_path / "d.parquet", row_group_size=4)
        return ConversationSource(DatasetConfig(str(tmp_path / "d.parquet")))

    src = write()
    before = [src.sample_digest(i) for i in range(6)]  # media read for the digest
    assert len(set(before)) == 6
    again = write()
    [again[i] for i in range(6)]
    assert [again.sample_digest(i) for i in range(6)] == before  # digests kept from reading
    edited = [write(answer="B").sample_digest(i) for i in range(6)]
    assert [a != b for a, b in zip(edited, before)] == [k == 2 for k in range(6)]
    edited = [write(image=_png(99)).sample_digest(i) for i in range(6)]
    assert [a != b for a, b in zip(edited, before)] == [k == 4 for k in range(6)]


def test_media_digest_of_paths_and_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    one = media_digest(["a.png"], str(tmp_path))
    assert media_digest(["a.png"], str(tmp_path)) == one
    (tmp_path / "a.png").write_bytes(_png(1) + b"more")  # another file at the same path
    assert media_digest(["a.png"], str(tmp_path)) != one
    assert media_digest([{"bytes": b"x", "path": None}], "") != media_digest([{"bytes": b"y", "path": None}], "")
    assert json.dumps(media_digest([], ""))


def _files(tmp_path, n_files, rows=6):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in range(n_files):
        pq.write_table(pa.table({"id": [f"f{f}r{k}" for k in range(rows)],
                                 "image": [{"bytes": _png(100 * f + k), "path": None} for k in range(rows)],
                                 "conversations": [_convs(k) for k in range(rows)]}), tmp_path / f"p{f:03d}.parquet")
    return tmp_path


def _open_fds():
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
def test_parquet_files_are_not_held_open():
    """A folder of many parquet files: no handle stays open between reads (a handle per file used to stay open
    for the source's life and hit the open-files limit on Infinity-MM-sized folders)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        folder = _files(Path(d), 40, rows=2)
        before = _open_fds()
        src = ConversationSource(DatasetConfig(str(folder), strata=()))
        assert len(src) == 80 and _open_fds() == before
        for i in (0, 41, 79):
            src[i]
        assert _open_fds() == before


def test_one_row_group_of_images_is_held_across_files(tmp_path):
    """Reading samples from several files keeps one row group of images in all (each file used to keep its
    last row group for the source's life: memory grew with the number of files read)."""
    folder = _files(tmp_path, 5)
    src = ConversationSource(DatasetConfig(str(folder), target=5, strata=("subset",)))
    caches = {id(t._cache) for t in src._tables}
    got = [src[i] for i in range(len(src))]
    assert len({s.images[0].tobytes() for s in got}) == 5  # five different embedded images read back
    (held,) = caches  # one cache for the source, holding the row group of the last file read
    assert src._tables[0]._cache._key[0] in {str(t.path) for t in src._tables}
