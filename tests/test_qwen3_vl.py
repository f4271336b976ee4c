"""Qwen3-VL specifics: video timestamps as the processor writes them, DeepStack rows follow pruning."""

from __future__ import annotations

import pytest
import torch

from explainprune import get_pruner
from explainprune.models.qwen3_vl import frame_timestamps


def test_frame_timestamps_match_the_processor_rule():
    # Qwen3VLProcessor._calculate_timestamps: pad to the temporal patch with the last index, mean of each pair
    assert frame_timestamps([0.0, 0.5, 1.0, 1.5], 2) == [0.25, 1.25]
    assert frame_timestamps([0.0, 1.0, 2.0], 2) == [0.5, 2.0]


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_video_prompt_carries_a_timestamp_per_frame(vlm, frames):
    p = vlm.prepare(video=frames, question="in frame 1 what digit is in row 1 column 1 ?", fps=2.0)
    text = vlm.tokenizer.decode(p.input_ids[0])
    per_frame = p.num_visual // 2  # 4 raw frames -> 2 temporal tokens
    assert text.count("seconds") == 2 and text.count("<|video_pad|>") == 2 * per_frame
    # frames 0,1 at 2 fps -> 0.25 s, frames 2,3 -> 1.25 s (rendered with one decimal: "0.2", "1.2")
    assert "0. 2 seconds" in text and "1. 2 seconds" in text
    # the visual blocks are interleaved with text, and each frame keeps its own grid frame index
    gaps = torch.diff(p.visual_pos)
    assert int((gaps > 1).sum()) == 1 and set(p.visual_grid[:, 0].tolist()) == {0, 1}
    clip = type("Clip", (list,), {})(frames)
    clip.timestamps = [0.0, 10.0, 20.0, 30.0]
    q = vlm.prepare(video=clip, question="in frame 1 what digit is in row 1 column 1 ?")
    assert "5. 0 seconds" in vlm.tokenizer.decode(q.input_ids[0])
    assert not torch.equal(p.input_ids, q.input_ids)  # time is text in Qwen3-VL, not a position offset


@pytest.mark.parametrize("family", ["qwen3_vl"])
def test_deepstack_rows_follow_the_kept_tokens(vlm, image):
    hooks_before = [dict(m._forward_hooks) for m in vlm.language_model.layers]
    p = vlm.prepare(images=image, question="what digit is in row 2 column 3 ?")
    assert sorted(p.visual_residuals) == [0, 1]
    assert all(t.shape == (p.num_visual, p.inputs_embeds.shape[-1]) for t in p.visual_residuals.values())
    keep = get_pruner("random", seed=0).keep(vlm, p, 0.5)
    with_ds = vlm.generate(p, keep=keep, max_new_tokens=4, output_logits=True)
    p.visual_residuals = {}  # the same prompt without DeepStack gives other logits: the rows are used
    without = vlm.generate(p, keep=keep, max_new_tokens=4, output_logits=True)
    assert not torch.allclose(with_ds.logits, without.logits)
    assert vlm.active_residuals is None  # hooks gone after generate
    assert [dict(m._forward_hooks) for m in vlm.language_model.layers] == hooks_before


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_label_train_eval_pipeline(family, tiny_dirs, load_tiny, tmp_path, capsys):
    """The whole CLI pipeline on a tiny Qwen3-VL: label (A_v^0 + R_v), train f_θ, eval every method."""
    import json

    from explainprune.cli.main import main
    from explainprune.labels import read_index
    from explainprune.testing import random_image

    vlm, ckpt = load_tiny(family), str(tiny_dirs(family))
    rows = []
    for i in range(4):
        random_image(i).save(tmp_path / f"{i}.png")
        q = "what digit is in row 1 column 2 ?"
        answer = vlm.generate(vlm.prepare(images=random_image(i), question=q), max_new_tokens=3).text
        rows.append({"id": f"s{i}", "question": q, "answer": answer, "image": f"{i}.png"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    labels, f, ev = tmp_path / "labels", tmp_path / "f", tmp_path / "eval"
    assert main(["label", "--model", ckpt, "--manifest", str(tmp_path / "m.jsonl"), "--out", str(labels),
                 "--no-progress", "--max-new-tokens", "3"]) == 0
    assert read_index(labels)["counts"]["labeled"] == 4  # the references are the model's own answers
    assert main(["train", "--labels", str(labels), "--out", str(f), "--epochs", "2", "--no-progress",
                 "--val-fraction", "0.25"]) == 0
    assert main(["eval", "--model", ckpt, "--task", str(tmp_path / "m.jsonl"), "--compressor", str(f / "compressor"),
                 "--methods", "vanilla", "oracle", "learned", "fastv:layer=1", "random", "uniform",
                 "--ratios", "0.5", "--max-new-tokens", "3", "--out", str(ev), "--no-plots", "--no-progress",
                 "--json"]) == 0
    report = json.loads((ev / "report.json").read_text())
    methods = {r["method"] for r in report["results"]}
    assert methods == {"vanilla", "oracle", "learned", "fastv:layer=1", "random", "uniform"}
    vanilla = next(r for r in report["results"] if r["method"] == "vanilla")
    assert vanilla["accuracy"] == 1.0
    capsys.readouterr()


def test_moe_flops_count_the_active_experts(load_tiny):
    from explainprune.evaluation.flops import LLMShape

    t = load_tiny("qwen3_vl_moe").text_config
    shape = LLMShape.from_config(t)
    assert shape.intermediate == t.num_experts_per_tok * t.moe_intermediate_size != t.intermediate_size
    dense = LLMShape.from_config(load_tiny("qwen3_vl").text_config)
    assert dense.intermediate == load_tiny("qwen3_vl").text_config.intermediate_size
