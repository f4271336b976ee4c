"""Without the optional packages: no PyAV makes `--strata duration` an error (it put every video under
"unknown" silently), and local JSON / JSONL / parquet datasets are read without `datasets`."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from explainprune.conversations import ConversationSource, DatasetConfig, video_duration
from explainprune.dataset_rows import open_tables
from explainprune.errors import InputError


@pytest.fixture
def no_av(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError


@pytest.fixture
def no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)


def rows(n):
    return [{"id": f"v{k}", "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "a dog runs"}]}
        for k in range(n)]


def test_duration_strata_without_pyav_is_an_error(tmp_path, no_av):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)  # never opened: the missing package is found first
    (tmp_path / "data.json").write_text(json.dumps(rows(4)))
    with pytest.raises(InputError, match="--strata duration needs PyAV"):
        video_duration(tmp_path / "clip.mp4")
    with pytest.raises(InputError, match="pip install av"):
        ConversationSource(DatasetConfig(str(tmp_path / "data.json"), target=2, strata=("task", "duration")))
    # without duration in the strata nothing needs PyAV at sampling time
    src = ConversationSource(DatasetConfig(str(tmp_path / "data.json"), target=2, strata=("task",)))
    assert len(src) == 2


def test_local_files_need_no_datasets(tmp_path, no_datasets):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows(3)))
    (tmp_path / "b.json").write_text(json.dumps(rows(2)))
    pq.write_table(pa.Table.from_pylist([{"id": "p0", "question": "q", "answer": "a"}]), tmp_path / "c.parquet")
    for name, n in (("a.jsonl", 3), ("b.json", 2), ("c.parquet", 1)):
        tables, digest = open_tables(str(tmp_path / name), ["id"], [], None, "train")
        assert sum(len(t) for t in tables) == n and digest
    with pytest.raises(ValueError, match="needs the datasets library.*local .json"):
        open_tables("someorg/somedata", ["id"], [], None, "train")
