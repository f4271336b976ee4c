"""Conversation datasets (LLaVA / messages formats) as label sources: parsing, media, errors, sampling."""

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from explainprune.conversations import (
    ConversationSource,
    DatasetConfig,
    balanced_indices,
    duration_bucket,
    parse_columns,
    video_duration,
)
from explainprune.testing import write_video


def _png(path, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def _mp4(path, seconds, fps=2, size=(32, 32)):
    pytest.importorskip("av")
    return write_video(path, lambda k: np.full((*size, 3), (k * 7) % 255, dtype=np.uint8), int(seconds * fps), fps)


@pytest.fixture()
def llava_json(tmp_path):
    (tmp_path / "img").mkdir()
    for k in range(3):
        _png(tmp_path / "img" / f"{k}.png", k)
    rows = [
        {"id": "a", "image": "img/0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the car?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "And the other one?"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "b", "images": ["img/1.png", "img/2.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is larger?\nA. left\nB. right"},
            {"from": "gpt", "value": "B. right"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    return path


def test_llava_rows_become_samples(llava_json):
    src = ConversationSource(DatasetConfig(str(llava_json)))
    assert len(src) == 2  # turns="first": one sample per row
    s = src[0]
    assert (s.id, s.question, s.answer) == ("a", "What colour is the car?", "Red.")
    assert len(s.images) == 1 and s.images[0].size == (48, 40)
    assert s.meta["match"] == "exact" and s.meta["kind"] == "open-ended"
    s = src[1]
    assert s.question == "Which is larger?\nA. left\nB. right" and len(s.images) == 2
    assert s.meta["match"] == "choice" and s.meta["kind"] == "multi-choice"


def test_each_turn_drops_the_preceding_turns(llava_json):
    src = ConversationSource(DatasetConfig(str(llava_json), turns="each"))
    assert [src[i].id for i in range(len(src))] == ["a#0", "a#1", "b"]
    follow = src[1]
    assert (follow.question, follow.answer) == ("And the other one?", "Blue.")
    assert len(follow.images) == 1  # the row's media, no earlier turns in the prompt


def test_messages_format_and_column_mapping(tmp_path):
    _png(tmp_path / "x.png")
    rows = [{"uid": 7, "pics": ["x.png"], "chat": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many dogs?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}]}]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cols = parse_columns("id=uid,images=pics,messages=chat")
    src = ConversationSource(DatasetConfig(str(tmp_path / "m.jsonl"), format="messages", columns=cols))
    s = src[0]
    assert (s.id, s.question, s.answer, s.meta["match"]) == ("7", "How many dogs?", "3", "number")
    assert len(s.images) == 1


def test_parquet_with_embedded_image_bytes(tmp_path):
    """Infinity-MM-style parquet: images as {"bytes", "path"} structs; media root not needed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    _png(buf, 3)
    convs = [[{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "noise"}]]
    table = pa.table({"id": ["p0"], "image": [{"bytes": buf.getvalue(), "path": None}], "conversations": convs})
    pq.write_table(table, tmp_path / "gpt4_generated.parquet")
    src = ConversationSource(DatasetConfig(str(tmp_path)))
    s = src[0]
    assert s.images[0].size == (48, 40) and s.meta["subset"] == "gpt4_generated"


def test_media_root_and_missing_media(tmp_path, llava_json):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    data = moved / "d.json"
    data.write_text(llava_json.read_text())
    src = ConversationSource(DatasetConfig(str(data)))
    with pytest.raises(FileNotFoundError, match=r"row a: image .*img/0.png not found .*--media-root"):
        src.validate()
    ConversationSource(DatasetConfig(str(data), media_root=str(tmp_path))).validate()


@pytest.mark.parametrize("row,message", [
    ({"id": "t1", "image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]}, "row t1: no human/user turn"),
    ({"id": "t2", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n<image>\nq?"},
                                                      {"from": "gpt", "value": "a"}]}, "row t2: 2 <image> tags but 1"),
    ({"id": "t3", "image": "x.png", "conversations": [{"from": "human", "value": "q?"}]},
     "row t3: no answer follows"),
    ({"id": "t4", "image": "x.png"}, "row t4: no 'conversations' list"),
    ({"id": "t5", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\n"},
                                                      {"from": "gpt", "value": "a"}]}, "row t5: empty question"),
])
def test_bad_rows_name_the_row(tmp_path, row, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([row]))
    with pytest.raises(ValueError, match=message):
        ConversationSource(DatasetConfig(str(path)))


def test_bad_options():
    with pytest.raises(ValueError, match="accepted: llava, messages"):
        DatasetConfig("x", format="sharegpt")
    with pytest.raises(ValueError, match="did you mean 'choice'"):
        DatasetConfig("x", match="choise")
    with pytest.raises(ValueError, match="accepted: subset, task, duration"):
        DatasetConfig("x", strata=("length",))
    with pytest.raises(ValueError, match=">= 1"):
        DatasetConfig("x", target=0)
    with pytest.raises(ValueError, match="ours=theirs"):
        parse_columns("image")
    with pytest.raises(FileNotFoundError, match="no dataset at ./nope.json"):
        ConversationSource(DatasetConfig("./nope.json"))


def test_balanced_indices():
    strata = [("a",)] * 10 + [("b",)] * 2 + [("c",)] * 6
    got = balanced_indices(strata, 9, seed=0)
    per = Counter(strata[i] for i in got)
    assert per == {("a",): 4, ("b",): 2, ("c",): 3} or per == {("a",): 3, ("b",): 2, ("c",): 4}
    assert len(got) == 9 and got == sorted(got)
    assert balanced_indices(strata, 9, seed=0) == got  # deterministic
    assert balanced_indices(strata, 9, seed=1) != got
    assert balanced_indices(strata, 6, seed=0) and Counter(strata[i] for i in balanced_indices(strata, 6)) == {
        ("a",): 2, ("b",): 2, ("c",): 2}
    assert balanced_indices(strata, None) == list(range(18))
    assert balanced_indices(strata, 100) == list(range(18))


def test_video_rows_balanced_by_task_and_duration(tmp_path):
    """LLaVA-Video-style JSON: multi-choice and open-ended questions over clips of several durations."""
    lengths = {"short": 10, "mid": 40, "long": 90}
    for name, sec in lengths.items():
        _mp4(tmp_path / f"{name}.mp4", sec, fps=1)
    rows = []
    for k in range(12):
        name = list(lengths)[k % 3]
        mc = k % 2 == 0
        q = "<video>\nWhat happens?" + ("\nA. a dog runs\nB. a cat sleeps" if mc else "")
        rows.append({"id": f"v{k}", "video": f"{name}.mp4", "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": "A." if mc else "a dog runs"}]})
    (tmp_path / "llava_video.json").write_text(json.dumps(rows))
    assert duration_bucket(video_duration(tmp_path / "mid.mp4")) == "30-60s"
    src = ConversationSource(DatasetConfig(str(tmp_path / "llava_video.json"), target=6, strata=("task", "duration"),
                                           max_frames=4))
    assert len(src) == 6
    assert src.counts() == {f"{t}/{d}": 1 for t in ("multi-choice", "open-ended") for d in ("0-30s", "1-2min",
                                                                                             "30-60s")}
    s = src[0]
    assert len(s.video) == 4 and s.images is None
    again = ConversationSource(DatasetConfig(str(tmp_path / "llava_video.json"), target=6,
                                             strata=("task", "duration"), max_frames=4))
    assert again.describe() == src.describe() and [again[i].id for i in range(6)] == [src[i].id for i in range(6)]


def test_several_datasets_each_with_its_media_root(tmp_path):
    for name in ("nextqa", "activitynet"):
        (tmp_path / name / "media").mkdir(parents=True)
        _png(tmp_path / name / "media" / "f.png")
        (tmp_path / name / f"{name}.json").write_text(json.dumps([{"id": f"{name}-{k}", "image": "f.png",
            "conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "yes"}]} for k in range(3)]))
    paths = tuple(str(tmp_path / n / f"{n}.json") for n in ("nextqa", "activitynet"))
    roots = tuple(str(tmp_path / n / "media") for n in ("nextqa", "activitynet"))
    src = ConversationSource(DatasetConfig(paths, media_root=roots, target=4, strata=("subset",)))
    src.validate()
    assert src.counts() == {"activitynet": 2, "nextqa": 2}
    assert {src[i].meta["subset"] for i in range(4)} == {"nextqa", "activitynet"}
    with pytest.raises(ValueError, match="one media root for all datasets or one per dataset"):
        DatasetConfig(paths, media_root=(roots[0], roots[1], roots[1]))


def test_one_target_per_dataset(tmp_path):
    for name, n in (("llava_video", 8), ("nextqa", 8)):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"id": f"{name}-{k}", "conversations": [
            {"from": "human", "value": "q?" + ("\nA. x\nB. y" if k % 2 else "")},
            {"from": "gpt", "value": "A" if k % 2 else "yes"}]} for k in range(n)]))
    paths = (str(tmp_path / "llava_video.json"), str(tmp_path / "nextqa.json"))
    src = ConversationSource(DatasetConfig(paths, target=(4, 2), strata=("subset", "task")))
    assert src.counts() == {"llava_video/multi-choice": 2, "llava_video/open-ended": 2,
                            "nextqa/multi-choice": 1, "nextqa/open-ended": 1}
    with pytest.raises(ValueError, match="one sample target for all datasets or one per dataset"):
        DatasetConfig(paths, target=(1, 2, 3))
