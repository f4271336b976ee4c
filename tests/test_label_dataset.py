"""`explainprune label --dataset`: LLaVA-format data labelled by the demo model and a tiny checkpoint."""

import json

import pytest

from explainprune.cli.main import main
from explainprune.labels import read_index, read_table
from explainprune.tasks.digits import DigitsTask


@pytest.fixture(scope="module")
def digits_llava(tmp_path_factory):
    """12 digits questions as a LLaVA-format JSON (images by relative path), answers as the task gives them
    plus a few written the way instruction data writes them."""
    root = tmp_path_factory.mktemp("llava_digits")
    (root / "images").mkdir()
    task = DigitsTask("test", seed=3, n=12, kinds=("rowcol", "colour"))
    rows = []
    for i in range(len(task)):
        s = task.sample(i)
        s.image.save(root / "images" / f"{i}.png")
        answer = s.answer if i % 3 else f"The digit is {s.answer}."
        rows.append({"id": s.id, "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": answer}]})
    (root / "digits.json").write_text(json.dumps(rows))
    return root / "digits.json"


def test_label_dataset_with_the_demo_model(tmp_path, digits_llava, capsys):
    out = tmp_path / "labels"
    args = ["label", "--model", "demo", "--dataset", str(digits_llava), "--out", str(out), "--no-progress",
            "--shard-size", "4", "--target", "8", "--strata", "task"]
    assert main(args) == 0
    text = capsys.readouterr().out
    index = read_index(out)
    counts = index["counts"]
    assert counts["samples"] == 8
    # auto: "number" for the plain digit answers, "exact" for the sentence ones ("The digit is 7." is not
    # what the demo says, so those are never kept)
    by_rule = counts["by_rule"]
    assert set(by_rule) == {"number", "exact"}
    assert by_rule["number"]["judged"] + by_rule["exact"]["judged"] == 8 and by_rule["exact"]["correct"] == 0
    assert counts["labeled"] == by_rule["number"]["correct"] >= by_rule["number"]["judged"] - 1  # demo: ~97%
    assert "matcher number:" in text
    t = read_table(out).to_pydict()
    assert all(q.startswith("what digit") for q in t["question"])  # the <image> tag is stripped
    assert index["source"]["task"] == "dataset" and index["source"]["target"] == [8]
    # a rerun resumes: every shard is reused, nothing is recomputed
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_written"] == 0 and rep["shards_reused"] == 2


def test_exact_matcher_keeps_fewer(tmp_path, digits_llava):
    out = tmp_path / "labels"
    assert main(["label", "--model", "demo", "--dataset", str(digits_llava), "--out", str(out), "--no-progress",
                 "--match", "exact"]) == 0
    c = read_index(out)["counts"]
    assert set(c["by_rule"]) == {"exact"} and c["by_rule"]["exact"]["judged"] == 12
    assert c["labeled"] <= 8  # the 4 sentence answers ("The digit is 7.") never match exactly


def test_label_dataset_tiny_checkpoint_keep_all(tmp_path, digits_llava, tiny_dirs):
    out = tmp_path / "labels"
    assert main(["label", "--model", str(tiny_dirs("qwen2_vl")), "--dataset", str(digits_llava), "--out", str(out),
                 "--no-progress", "--match", "any", "--target", "3", "--strata", "subset"]) == 0
    c = read_index(out)["counts"]
    assert c["labeled"] + c["skipped_wrong"] == 3
    assert c["by_rule"]["any"]["judged"] == 3


def test_bad_rows_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import explainprune

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(explainprune, "load", no_load)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "r9", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "a"}]}]))
    assert main(["label", "--model", "demo", "--dataset", str(data), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "explainprune label: error:" in err and "row r9: image" in err and "--media-root" in err
    assert main(["label", "--model", "demo", "--dataset", str(data), "--out", str(tmp_path / "o"),
                 "--match", "exakt"]) != 0
    assert "did you mean 'exact'" in capsys.readouterr().err


def _write(rows, path):
    """``rows`` as a JSON file, or as an Infinity-MM-style parquet (images embedded as {"bytes", "path"})."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_revised_dataset_keeps_unchanged_shards(tmp_path, digits_llava, capsys, fmt):
    """A row fixed after a run (its answer; for parquet also its embedded image): the rerun relabels only
    the shard holding it and keeps the others; a further rerun has nothing to do."""
    rows = json.loads(digits_llava.read_text())
    for r in rows:
        where = digits_llava.parent / r["image"]
        r["image"] = str(where) if fmt == "json" else {"bytes": where.read_bytes(), "path": None}
    data = tmp_path / f"digits.{fmt}"
    _write(rows, data)
    out = tmp_path / "labels"
    args = ["label", "--model", "demo", "--dataset", str(data), "--out", str(out), "--no-progress",
            "--shard-size", "4", "--json"]

    def run():
        assert main(args) == 0
        rep = json.loads(capsys.readouterr().out)
        return rep["shards_written"], rep["shards_reused"]

    assert run() == (3, 0)
    shards = sorted((out / "shards").glob("*.parquet"))
    kept = {p.name: p.read_bytes() for p in shards}
    rows[5]["conversations"][1]["value"] = "The digit is 4."  # row 5: shard 1 (samples 4-7)
    _write(rows, data)
    assert run() == (1, 2)
    assert [p.read_bytes() == kept[p.name] for p in shards] == [True, False, True]
    t = read_table(out).to_pydict()
    assert "The digit is 4." not in t["reference"] and rows[5]["id"] not in t["id"]  # the demo never says it
    assert read_index(out)["counts"]["samples"] == 12
    assert run() == (0, 3)
    if fmt == "parquet":  # another image in row 9 (shard 2): only that shard again
        rows[9]["image"] = rows[0]["image"]
        _write(rows, data)
        assert run() == (1, 2)
