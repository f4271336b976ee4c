"""Inputs that can never score, refused up front (issue 21, item 7), and the weak input errors made clear:
one line naming the file / line / sample, before model work where the input allows."""

from __future__ import annotations

import json
import pathlib

import pytest
from PIL import Image

import explainprune
import explainprune.models.qwen2_vl as qwen2_vl
from explainprune.answers import normalize_answers
from explainprune.cli.main import main
from explainprune.conversations import ConversationSource, DatasetConfig
from explainprune.errors import InputError
from explainprune.evaluation.runner import EvalConfig, run_eval
from explainprune.prefetch import prepared
from explainprune.sources import ManifestSource
from explainprune.testing import random_image
from explainprune.validation import check_pixel_options, check_ratios, prepare_sample


def _manifest(d: pathlib.Path, rows: list[dict], name: str = "m.jsonl", prefix: bytes = b"") -> pathlib.Path:
    Image.new("RGB", (32, 32), "red").save(d / "0.png")
    path = d / name
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def _row(**change) -> dict:
    return {"id": "a", "question": "what?", "answer": "9", "image": "0.png", **change}


def _dataset(d: pathlib.Path, rows: list[dict], name: str = "data.json") -> pathlib.Path:
    path = d / name
    path.write_text(json.dumps(rows))
    return path


def _conv(rid, answer="9", image="0.png") -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                         {"from": "gpt", "value": answer}]}


def no_weights(monkeypatch):
    """Fail the test if a model's weights are loaded (the checks must come first)."""
    monkeypatch.setattr(qwen2_vl.Qwen2VL, "_load", classmethod(lambda cls, *a, **k: pytest.fail("weights loaded")))


# -- item 7: inputs that can never score ---------------------------------------------------------------------
def test_empty_answer_is_refused_like_an_empty_question(tmp_path):
    for bad in ("", "   "):
        with pytest.raises(InputError, match="answer is empty: no reference to score against"):
            normalize_answers(bad)
    with pytest.raises(InputError, match=r"answer\[1\] is empty"):
        normalize_answers(["9", ""])
    with pytest.raises(InputError, match=r"m.jsonl:2: sample b: answer is empty: no reference to score against; "
                                         r"give the expected answer or remove the sample"):
        ManifestSource(_manifest(tmp_path, [_row(), _row(id="b", answer="")]))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    with pytest.raises(ValueError, match=r"data.json: row r1: empty answer"):
        ConversationSource(DatasetConfig(str(_dataset(tmp_path, [_conv("r0"), _conv("r1", answer=" ")]))))


def test_cli_empty_answer_exits_2_in_one_line(tmp_path, capsys, monkeypatch):
    no_weights(monkeypatch)
    path = _manifest(tmp_path, [_row(answer="")])
    assert main(["eval", "--task", str(path), "--methods", "vanilla", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"explainprune eval: error: {path}:1: sample a: answer is empty: no reference to score against; "
                   "give the expected answer or remove the sample"]


def test_repeated_ratios_are_refused(tmp_path, capsys, monkeypatch):
    assert check_ratios([0.5, 0.25]) == (0.5, 0.25)
    with pytest.raises(InputError, match=r"ratios: 0.5 is given twice"):
        check_ratios([0.5, 0.25, 0.5])
    with pytest.raises(InputError, match=r"must be in \(0, 1\]"):
        check_ratios([1.5])
    no_weights(monkeypatch)
    path = _manifest(tmp_path, [_row()])
    assert main(["eval", "--task", str(path), "--ratios", "0.5", "0.5", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "explainprune eval: error: ratios: 0.5 is given twice (every sample would be counted twice at it); "
        "give each ratio once"]


def test_pixel_range_below_one_merged_patch_or_inverted_is_refused(tmp_path, capsys, monkeypatch):
    no_weights(monkeypatch)
    out = str(tmp_path / "l")
    assert main(["label", "--model", "demo", "--task", "digits", "--limit", "2", "--max-pixels", "1",
                 "--out", out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "explainprune label: error: max_pixels 1 is below one merged patch for qwen2_vl (28x28 = 784 pixels): "
        "every image would become 1 visual token; give --max-pixels >= 784 (and >= min_pixels 3136)"]
    assert main(["label", "--model", "demo", "--task", "digits", "--limit", "2", "--max-pixels", "1000",
                 "--out", out]) == 2  # the checkpoint's min_pixels (3136) is above it
    assert capsys.readouterr().err.strip().splitlines() == [
        "explainprune label: error: min_pixels 3136 is above max_pixels 1000 for qwen2_vl; give --max-pixels >= "
        "3136 or --min-pixels <= 1000 (accepted: max_pixels >= 784, min_pixels <= max_pixels)"]
    assert main(["eval", "--min-pixels", "5000", "--max-pixels", "4000", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "explainprune eval: error: --min-pixels 5000 is above --max-pixels 4000; give min <= max (the range an "
        "image's area is resized into)"]
    with pytest.raises(InputError, match="--max-pixels must be a positive"):
        check_pixel_options(None, 0)


def test_pixel_range_minimum_is_the_familys_merged_patch(tiny_dirs):
    with pytest.raises(InputError, match=r"max_pixels 1000 is below one merged patch for qwen3_vl \(32x32 = 1024"):
        explainprune.load(tiny_dirs("qwen3_vl"), min_pixels=1000, max_pixels=1000)
    vlm = explainprune.load(tiny_dirs("qwen2_vl"), min_pixels=784, max_pixels=784)  # the smallest accepted
    assert vlm.prepare(images=random_image(0), question="what?").visual_grid is not None


@pytest.fixture
def short_context(load_tiny, monkeypatch):
    vlm = load_tiny("qwen2_vl")
    n = vlm.prepare(images=Image.new("RGB", (32, 32)), question="what?").input_ids.shape[1]
    monkeypatch.setattr(vlm.text_config, "max_position_embeddings", n - 1)  # one token short
    return vlm


def test_prompt_longer_than_the_context_is_refused_naming_the_sample(short_context, tmp_path):
    vlm = short_context
    limit = vlm.text_config.max_position_embeddings
    with pytest.raises(InputError, match=rf"the prompt is {limit + 1} tokens, longer than the model's "
                                         rf"max_position_embeddings \({limit}\); lower --max-pixels"):
        vlm.prepare(images=Image.new("RGB", (32, 32)), question="what?")
    man = ManifestSource(_manifest(tmp_path, [_row(), _row(id="b")]))
    with pytest.raises(InputError, match=r"sample a: the prompt is \d+ tokens"):
        prepare_sample(vlm, man[0])
    with pytest.raises(InputError, match=r"m.jsonl:1: sample a: the prompt is \d+ tokens") as err:
        next(prepared(vlm, man, [0], depth=0)).result()  # label's loader
    assert (err.value.line, err.value.sample) == (1, "a")
    with pytest.raises(InputError, match=r"sample a: the prompt is \d+ tokens"):
        run_eval(vlm, man, EvalConfig(methods=("vanilla",), ratios=(0.5,), progress=False, warmup=False))


# -- weak errors: one line, before model work ----------------------------------------------------------------
def test_manifest_image_list_points_to_images(tmp_path):
    with pytest.raises(InputError, match=r'm.jsonl:1: sample a: image must be one path; got a list of 2; for '
                                         r'several images of one sample write "images": \[...\]'):
        ManifestSource(_manifest(tmp_path, [_row(image=["0.png", "0.png"])]))


def test_manifest_with_a_byte_order_mark_is_read(tmp_path):
    man = ManifestSource(_manifest(tmp_path, [_row(), _row(id="b")], prefix=b"\xef\xbb\xbf"))
    assert [man[i].id for i in range(2)] == ["a", "b"] and man.where(0)["line"] == 1


def test_dataset_image_of_another_type_is_refused_when_built(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    for bad, shown in ((5, "int 5"), ({"url": "x"}, "dict {'url': 'x'}"), (None, None)):
        rows = [_conv("r0"), {**_conv("r1"), "images": [bad]}]
        path = _dataset(tmp_path, rows)
        if shown is None:  # a null element of a list
            shown = "NoneType None"
        with pytest.raises(ValueError, match=rf"data.json: row r1: an image must be a path, embedded bytes or a "
                                             rf"{{\"bytes\", \"path\"}} object; got {shown}"):
            ConversationSource(DatasetConfig(str(path)))


def test_dataset_duplicate_ids_are_refused(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    path = _dataset(tmp_path, [_conv("r0"), _conv("r1"), _conv("r0")])
    with pytest.raises(InputError, match=r"data.json: id 'r0' repeats \(row 1 and row 3\); ids must be unique "
                                         r"within a dataset; fix the data, or number the rows .*--columns id=none"):
        ConversationSource(DatasetConfig(str(path)))
    numbered = ConversationSource(DatasetConfig(str(path), columns={"id": "none"}))  # the hint works
    assert [numbered[i].id for i in range(3)] == ["row 0", "row 1", "row 2"]
    folder = tmp_path / "d"
    folder.mkdir()
    _dataset(folder, [_conv("x")], "a.json")
    _dataset(folder, [_conv("x")], "b.json")
    with pytest.raises(InputError, match=r"id 'x' repeats \(row 1 of a and row 1 of b\)"):
        ConversationSource(DatasetConfig(str(folder), media_root=str(tmp_path)))
    other = _dataset(folder.parent, [_conv("x")], "c.json")  # another --dataset path may reuse an id
    assert len(ConversationSource(DatasetConfig((str(folder / "a.json"), str(other)), media_root=str(tmp_path)))) == 2


def test_datasets_progress_bars_follow_no_progress(tmp_path, capfd, monkeypatch):
    import datasets

    Image.new("RGB", (32, 32), "red").save(tmp_path / "0.png")
    path = _dataset(tmp_path, [_conv("r0")], "quiet.json")
    assert not datasets.are_progress_bars_disabled()
    ConversationSource(DatasetConfig(str(path)), progress=False)
    assert "Generating train split" not in capfd.readouterr().err
    assert not datasets.are_progress_bars_disabled()  # restored
    no_weights(monkeypatch)
    (tmp_path / "afile").write_text("")
    path = _dataset(tmp_path, [_conv("r0")], "quiet2.json")  # a new file: datasets has no cache of it
    assert main(["label", "--model", "demo", "--dataset", str(path), "--no-progress", "--out",
                 str(tmp_path / "afile")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "is a file" in err[0]


def test_lmms_task_out_not_writable_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert main(["lmms-task", "--out", str(tmp_path / "afile" / "t"), "--n", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"explainprune lmms-task: error: cannot write to --out {tmp_path / 'afile' / 't'} (Not a directory); "
        "choose a writable folder with free space"]
    real = pathlib.Path.mkdir

    def read_only(self, *a, **k):  # root ignores chmod: a read-only folder is simulated
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert main(["lmms-task", "--out", str(tmp_path / "ro" / "t"), "--n", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"explainprune lmms-task: error: cannot write to --out {tmp_path / 'ro' / 't'} (Permission denied); "
        "choose a writable folder with free space"]


def test_eval_skips_a_prompt_too_long_with_on_error_skip(short_context, tmp_path):
    """--on-error skip: the too-long sample is listed as skipped and the run goes on (it stopped before)."""
    man = ManifestSource(_manifest(tmp_path, [_row(), _row(id="b")]))
    report = run_eval(short_context, man, EvalConfig(methods=("vanilla",), ratios=(0.5,), progress=False,
                                                     warmup=False), on_error="skip")
    assert [e["id"] for e in report.skipped] == ["a", "b"] and "the prompt is" in report.skipped[0]["error"]
