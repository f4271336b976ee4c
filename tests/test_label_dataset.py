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
