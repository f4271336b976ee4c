"""Request handling of the lmms-eval model (no lmms-eval needed): visuals as lmms-eval hands them over,
generation kwargs, ragged batches, and efficiency records equal to `explainprune eval`'s."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explainprune.compressor import Compressor
from explainprune.evaluation.flops import LLMShape
from explainprune.evaluation.report import SampleRecord
from explainprune.evaluation.runner import run_one
from explainprune.integrations.lmms_eval import efficiency
from explainprune.integrations.lmms_eval.engine import (
    PrunedEngine,
    Request,
    cut_at,
    generation_options,
    split_visuals,
)
from explainprune.pruning import available, get_pruner
from explainprune.sources import LabelSample
from explainprune.testing import random_image

Q1 = "what digit is in row 2 column 3 ?"
Q2 = "how many 7 are there ? answer with one word please"


def _video_file(frames, tmp_path):
    pytest.importorskip("av")
    from explainprune.integrations.lmms_eval.task import write_video

    return str(write_video(frames, tmp_path / "clip.mkv"))


def test_requests_answer_as_explainprune_generates(vlm, image, frames, tmp_path):
    """One image, two images, a video file and decoded video frames: each request, alone and in one ragged
    batch, answers what VLM.generate answers on the same inputs."""
    second = random_image(5, (84, 112))
    path = _video_file(frames, tmp_path)
    requests = [Request(Q1, [image], {"max_new_tokens": 3}, "t", 0),
                Request(f"<image>\n{Q2}", [[image, second]], {"max_new_tokens": 3}, "t", 1),
                Request(Q1, path, {"max_new_tokens": 3}, "t", 2),
                Request(Q2, np.stack([np.asarray(f) for f in frames]), {"max_new_tokens": 3}, "t", 3)]
    prompts = [vlm.prepare(images=image, question=Q1), vlm.prepare(images=[image, second], question=Q2),
               vlm.prepare(video=frames, question=Q1), vlm.prepare(video=frames, question=Q2)]
    expected = [vlm.generate(p, max_new_tokens=3) for p in prompts]
    engine = PrunedEngine(vlm, "vanilla", warmup=False)
    alone = [engine.run([r])[0] for r in requests]
    batch = engine.run(requests)
    for a, b, e in zip(alone, batch, expected):
        assert a.text == b.text == e.text
        assert a.new_tokens == len(e.token_ids) and a.prompt_tokens == e.prompt_tokens
    assert len(engine.records) == 8 and {r.id for r in engine.records} == {f"t/{i}" for i in range(4)}
    assert [r.n_visual for r in engine.records[:4]] == [p.num_visual for p in prompts]


def test_pruned_batch_equals_one_by_one(load_tiny, image, frames):
    vlm = load_tiny("qwen2_vl")
    requests = [Request(Q1, image, {"max_new_tokens": 4}), Request(Q2, frames[0], {"max_new_tokens": 4}),
                Request(Q1, [image, frames[1]], {"max_new_tokens": 4})]
    for method, options in (("random", {"seed": 2}), ("fastv", {"layer": 1})):
        engine = PrunedEngine(vlm, method, 0.5, warmup=False, **options)
        alone = [engine.run([r])[0].text for r in requests]
        assert [a.text for a in engine.run(requests)] == alone
        for r in engine.records:
            assert r.kept == -(-r.n_visual // 2) and r.layer == (1 if method == "fastv" else 0)


def test_generation_kwargs():
    g = generation_options({"until": "\n\n", "max_new_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3,
                            "image_aspect_ratio": "pad", "num_beams": 1})
    assert g.max_new_tokens == 5 and g.until == ("\n\n",) and g.generate == {}  # greedy: sampling-only dropped
    assert g.ignored == ("image_aspect_ratio='pad' (not a generate option)",)
    assert generation_options({}, 7).max_new_tokens == 7
    s = generation_options({"temperature": 0.5, "top_p": 0.9, "top_k": 4, "repetition_penalty": 1.3,
                            "no_repeat_ngram_size": 2, "min_new_tokens": 2, "num_beams": 3, "use_cache": True})
    assert s.generate == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "repetition_penalty": 1.3,
                          "no_repeat_ngram_size": 2, "min_new_tokens": 2}
    assert s.ignored == ("num_beams=3 (beam search is not run on pruned prompts; decoding greedily)",
                         "use_cache=True (set by explainprune)")
    assert generation_options({"do_sample": True}).generate == {"do_sample": True}  # the checkpoint's sampling
    with pytest.raises(ValueError, match="until"):
        generation_options({"until": 3})
    assert cut_at(" 7 , then more\n\nQ:", ["\n\n", ","]) == "7"
    assert cut_at("yes", ["", "."]) == "yes"


def test_generation_settings_reach_generate(load_tiny, image):
    """repetition_penalty, no_repeat_ngram_size and top_k change the answer exactly as in VLM.generate; the
    settings not applied are named once in a warning line."""
    from loguru import logger

    vlm = load_tiny("qwen2_vl")
    prompt = vlm.prepare(images=image, question=Q1)
    plain = vlm.generate(prompt, max_new_tokens=8).token_ids
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING")
    try:
        for kw in ({"repetition_penalty": 5.0}, {"no_repeat_ngram_size": 1},
                   {"do_sample": True, "top_k": 1, "temperature": 0.7}):
            engine = PrunedEngine(vlm, "random", 0.5, warmup=False, seed=0)
            keep = get_pruner("random", seed=0).keep(vlm, prompt, 0.5)
            expected = vlm.generate(prompt, keep=keep, max_new_tokens=8, **kw)
            (got,) = engine.run([Request(Q1, image, {"max_new_tokens": 8, "image_aspect_ratio": "pad", **kw})])
            assert got.text == expected.text, kw
        assert vlm.generate(prompt, max_new_tokens=8, no_repeat_ngram_size=1).token_ids != plain
        engine.run([Request(Q1, image, {"max_new_tokens": 2, "image_aspect_ratio": "pad"})])
    finally:
        logger.remove(sink)
    named = [line for line in lines if "image_aspect_ratio='pad' (not a generate option)" in line]
    assert len(named) == 3 and "explainprune: generation settings not applied" in named[0]  # once per engine


def test_max_new_tokens_and_until_reach_the_answer(load_tiny, image):
    vlm = load_tiny("qwen2_vl")
    engine = PrunedEngine(vlm, warmup=False)
    full = vlm.generate(vlm.prepare(images=image, question=Q1), max_new_tokens=6)
    assert len(full.text.split()) >= 2, "the tiny model should answer several words"
    one = engine.run([Request(Q1, image, {"max_new_tokens": 1})])[0]
    assert one.new_tokens == 1 and full.text.startswith(one.text)
    stop = full.text.split()[1]
    cut = engine.run([Request(Q1, image, {"max_new_tokens": 6, "until": [stop]})])[0]
    assert cut.text == full.text[: full.text.index(stop)].strip()


@pytest.mark.parametrize("method", available())
def test_records_equal_explainprune_eval(load_tiny, image, frames, method):
    """At batch size 1 a request's record holds what `explainprune eval` records for the same prompt
    (kept tokens, retention over layers, FLOPs incl. the compressor's or method's overhead, KV-cache bytes),
    for every registered method."""
    vlm = load_tiny("qwen2_vl")
    options = {}
    if method == "learned":
        torch.manual_seed(0)
        options["compressor"] = Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8, 8),
                                           fingerprint=vlm.fingerprint())
    if method in ("fastv", "dart"):
        options["layer"] = 1
    engine = PrunedEngine(vlm, method, 0.25 if method != "vanilla" else None, warmup=False, **options)
    media = {"video": frames} if method == "evs" else {"images": image}  # evs: videos only
    visuals = np.stack([np.asarray(f) for f in frames]) if method == "evs" else image
    answer = engine.run([Request(Q1, visuals, {"max_new_tokens": 3}, "digits", 7)])[0]
    (mine,) = engine.records
    pruner = get_pruner(method, **options)
    prompt = vlm.prepare(question=Q1, **media)
    ref = run_one(vlm, pruner, method, prompt, LabelSample("7", Q1, "x", **media), engine.ratio,
                  LLMShape.from_config(vlm.text_config), 3)
    assert mine.prediction == ref.prediction == answer.text and mine.id == "digits/7" and mine.kind == "digits"
    for key in ("n_visual", "kept", "layer", "average_retention", "flops_llm", "flops_overhead", "kv_bytes",
                "new_tokens"):
        assert getattr(mine, key) == getattr(ref, key), key
    assert mine.prefill_s > 0 and mine.total_s >= mine.prefill_s


def test_batch_kv_bytes_are_shared_by_rows(load_tiny, image):
    vlm = load_tiny("qwen2_vl")
    engine = PrunedEngine(vlm, "fastv", 0.5, warmup=False, layer=1)
    engine.run([Request(Q1, image, {"max_new_tokens": 2}, "t", 0)])
    alone = engine.records[-1].kv_bytes
    engine.run([Request(Q1, image, {"max_new_tokens": 2}, "t", 1), Request(Q2, image, {"max_new_tokens": 2}, "t", 2)])
    a, b = engine.records[-2:]
    assert a.kv_bytes == alone and b.kv_bytes > a.kv_bytes  # the same prompt holds the same rows; Q2 is longer


def test_text_only_requests_are_answered_and_counted(load_tiny):
    vlm = load_tiny("qwen2_vl")
    engine = PrunedEngine(vlm, "fastv", 0.5, warmup=False, layer=1)
    (answer,) = engine.run([Request(Q1, None, {"max_new_tokens": 2})])
    assert answer.text == vlm.generate(vlm.prepare(question=Q1), max_new_tokens=2).text
    assert engine.records == [] and engine.text_only == 1


def test_bad_method_options_and_ratio_fail_before_generation(load_tiny):
    vlm = load_tiny("qwen2_vl")
    with pytest.raises(ValueError, match="unknown pruner 'fastvv'. did you mean 'fastv'"):
        PrunedEngine(vlm, "fastvv", 0.5)
    with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\]"):
        PrunedEngine(vlm, "random", 1.5)
    with pytest.raises(ValueError, match="needs ratio"):
        PrunedEngine(vlm, "random")
    with pytest.raises(ValueError, match="accepts options"):
        PrunedEngine(vlm, "fastv", 0.5, compressor="x")
    with pytest.raises(ValueError, match="needs compressor"):
        PrunedEngine(vlm, "learned", 0.5)


def test_split_visuals(image, frames, tmp_path):
    image.save(tmp_path / "a.png")
    images, video = split_visuals([[image, str(tmp_path / "a.png")]])
    assert len(images) == 2 and video is None and np.array_equal(np.asarray(images[1]), np.asarray(image))
    path = _video_file(frames, tmp_path)
    images, video = split_visuals([path], max_frames=4)
    assert images == [] and [np.asarray(f).tolist() for f in video] == [np.asarray(f).tolist() for f in frames]
    assert len(split_visuals(path, max_frames=2)[1]) == 2
    with pytest.raises(ValueError, match="2 videos"):
        split_visuals([path, path])
    with pytest.raises(ValueError, match="not an image"):
        split_visuals("notes.txt")
    with pytest.raises(ValueError, match="unsupported visual of type dict"):
        split_visuals({"a": 1})


def _record(i: str, kind: str, kept: int, kv: int) -> SampleRecord:
    return SampleRecord(id=i, kind=kind, method="m", ratio=0.5, question="q", reference="", prediction="p",
                        correct=False, n_visual=8, kept=kept, layer=0, average_retention=kept / 8, flops_llm=100 * kept,
                        flops_overhead=0, prefill_s=0.1, decode_s=0.2, total_s=0.3, new_tokens=2, kv_bytes=kv)


def test_efficiency_summary_by_task():
    records = [_record("a/0", "a", 4, 10), _record("a/1", "a", 2, 30), _record("a/0", "a", 8, 99),
               _record("b/0", "b", 8, 50)]
    s = efficiency.summarize(records, model="demo", method="m", ratio=0.5, text_only=1)
    assert s["tasks"]["a"]["n"] == 2 and s["tasks"]["a"]["kept"] == 3 and s["tasks"]["a"]["kv_bytes"] == 20
    assert s["tasks"]["a"]["average_retention"] == pytest.approx(3 / 8)
    assert s["overall"]["n"] == 3 and s["overall"]["flops"] == pytest.approx(100 * 14 / 3)
    assert len(s["samples"]) == 3 and s["samples"][0]["task"] == "a" and s["text_only_requests"] == 1
    text = efficiency.to_markdown(s)
    assert "| a | 2 | 8.0 | 3.0 | 37.5% |" in text and "| overall | 3 |" in text


def test_kept_column_is_the_average_over_layers():
    """A multi-stage method (PyramidDrop) keeps 2 of 8 tokens after its last stage but 4 per layer on average:
    the "kept" column reports the average over layers, as `eval` does, and the last stage apart."""
    r = _record("p/0", "p", 2, 10)
    r.average_retention = 0.5
    s = efficiency.summarize([r], model="demo", method="pdrop", ratio=0.5)
    assert s["tasks"]["p"]["kept"] == 4.0 and s["tasks"]["p"]["kept_last_stage"] == 2.0
    assert "| p | 1 | 8.0 | 4.0 | 50.0% |" in efficiency.to_markdown(s)
