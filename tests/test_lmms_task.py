"""The digits benchmark as lmms-eval tasks (`explainprune lmms-task`): files, documents, the same pixels
as the built-in task, and the same scoring as `explainprune eval` (no lmms-eval needed)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from explainprune.cli.main import main
from explainprune.integrations.lmms_eval import task as lt
from explainprune.sources import ManifestSource, read_video
from explainprune.tasks.digits import DigitsTask

pytest.importorskip("av")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    return out, lt.write_task(out, n=6)


def test_task_files(written):
    out, res = written
    assert set(res["tasks"]) == {"explainprune_digits", "explainprune_digits_image", "explainprune_digits_video",
                                 "explainprune_digits_mc"}
    mc = (out / "explainprune_digits_mc.yaml").read_text()
    assert "output_type: multiple_choice" in mc and 'doc_to_choice: ["0", "1", "2"' in mc
    assert 'target_delimiter: ""' in mc and "metric: acc" in mc
    assert res["counts"] == {"all": 6, "image": 4, "video": 2}  # kinds cycle rowcol, colour, video
    text = (out / "explainprune_digits_video.yaml").read_text()
    assert "task: explainprune_digits_video" in text and "dataset_path: json" in text
    assert f'test: "{out.resolve() / "data" / "video.jsonl"}"' in text
    assert "!function utils.process_results" in text and "metric: exact_match" in text
    spec = importlib.util.spec_from_file_location("digits_utils", out / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.ROOT == (out / "data").resolve() and utils.process_results is lt.process_results


def test_documents_hold_the_builtin_samples(written):
    """Doc i is DigitsTask sample i: same question, answer and pixels (images PNG, videos lossless FFV1);
    the exported manifest is what `explainprune eval --task` reads."""
    out, res = written
    docs = [json.loads(line) for line in (out / "data" / "all.jsonl").read_text().splitlines()]
    task, manifest = DigitsTask(split="test", n=6), ManifestSource(res["manifest"])
    for i, doc in enumerate(docs):
        s, m = task.sample(i), manifest[i]
        assert (doc["id"], doc["question"], doc["answer"], doc["kind"]) == (s.id, s.question, s.answer, s.kind)
        (visual,) = lt.doc_to_visual(doc, out / "data")
        if s.video is not None:
            assert visual.endswith(".mkv") and len(s.video) == len(m.video) == 8
            for a, b, c in zip(read_video(visual, 8), s.video, m.video):
                assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(b), np.asarray(c))
        else:
            assert np.array_equal(np.asarray(visual), np.asarray(s.image))
    image_docs = [json.loads(line) for line in (out / "data" / "image.jsonl").read_text().splitlines()]
    assert [d["id"] for d in image_docs] == [d["id"] for d in docs if d["video_file"] is None]


def test_scoring_is_explainprune_eval_exact_match():
    doc = {"question": "what digit is in the red cell ?", "answer": "7"}
    assert lt.process_results(doc, ["7"]) == {"exact_match": 1.0}
    assert lt.process_results(doc, [" 7."]) == {"exact_match": 1.0}  # eval's normalisation: strip, punctuation
    assert lt.process_results(doc, ["1"]) == {"exact_match": 0.0}
    assert lt.process_results({**doc, "answer": ["seven", "7"]}, ["Seven"]) == {"exact_match": 1.0}
    assert lt.doc_to_text(doc) == doc["question"]
    assert lt.doc_to_text(doc, {"pre_prompt": "Q: ", "post_prompt": " A:"}) == f"Q: {doc['question']} A:"


def test_cli_lmms_task(tmp_path, capsys):
    assert main(["lmms-task", "--out", str(tmp_path / "t"), "--n", "3", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["counts"] == {"all": 3, "image": 2, "video": 1}
    assert (tmp_path / "t" / "explainprune_digits.yaml").is_file() and (tmp_path / "t" / "utils.py").is_file()
    assert main(["lmms-task", "--out", str(tmp_path / "u"), "--n", "0"]) == 2
    assert "explainprune lmms-task: error: --n must be at least 1" in capsys.readouterr().err
