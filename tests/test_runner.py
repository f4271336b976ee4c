"""The evaluation runner: every number of a record recomputed by hand on a tiny Qwen2-VL, the meter's
prefill / KV-cache attribution, the CLI end to end, method specs and task adapters."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

import explainprune.pruning.fastv  # noqa: F401  (registers "fastv" until pruning/__init__ imports it)
from explainprune import get_pruner
from explainprune.cli.main import main
from explainprune.evaluation.flops import LLMShape
from explainprune.evaluation.runner import EvalConfig, parse_method, run_eval, run_one, shared_scores
from explainprune.evaluation.tasks import TaskConfig, load_task, sample_kind
from explainprune.labels import ManifestSource
from explainprune.pruning.base import Pruner
from explainprune.testing import random_image

MAX_NEW = 4


@pytest.fixture(scope="module")
def qwen(load_tiny):
    return load_tiny("qwen2_vl")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, qwen):
    """Two images and a video whose reference answers are the vanilla model's own (upper-cased, padded)."""
    d = tmp_path_factory.mktemp("manifest")
    rows = []
    for i in range(3):
        if i < 2:
            random_image(i).save(d / f"img{i}.png")
            media, rec = {"images": random_image(i)}, {"image": f"img{i}.png", "kind": "image"}
        else:
            # frames on which the tiny model says something (on seeds 20-23 it answers "": empty answers are refused)
            frames = [random_image(28 + k, (112, 112)) for k in range(4)]
            for k, f in enumerate(frames):
                f.save(d / f"f{k}.png")
            media, rec = {"video": frames}, {"video": [f"f{k}.png" for k in range(4)], "kind": "video"}
        question = "what digit is in row 1 column 2 ?"
        text = qwen.generate(qwen.prepare(question=question, **media), max_new_tokens=MAX_NEW).text
        rows.append({"id": f"s{i}", "question": question, "answer": f"  {text.upper()} ", **rec})
    path = d / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def per_token_kv_bytes(vlm) -> int:
    t = vlm.text_config
    return 2 * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 4  # K and V, float32


def test_records_recomputed_by_hand(qwen, manifest):
    samples = ManifestSource(manifest)
    config = EvalConfig(methods=("vanilla", "random", "fastv:layer=1"), ratios=(0.5, 0.25),
                        max_new_tokens=MAX_NEW, progress=False)
    report = run_eval(qwen, samples, config, model_name="tiny")
    assert len(report.samples) == 3 * (1 + 2 + 2)
    d, m, n_layers = 64, 128, 2
    for r in report.samples:
        s = samples[int(r.id[1:])]
        p = qwen.prepare(images=s.images, video=s.video, question=s.question)
        n_v, text_len = p.num_visual, p.length - p.num_visual
        name, options = parse_method(r.method)
        kept = n_v if name == "vanilla" else math.ceil(r.ratio * n_v)
        layer = options.get("layer", 0)
        assert (r.n_visual, r.kept, r.layer, r.kind) == (n_v, kept, layer, "video" if r.id == "s2" else "image")
        expected = get_pruner(name, **options).generate(qwen, p, r.ratio, max_new_tokens=MAX_NEW)
        assert r.prediction == expected.text and r.new_tokens == len(expected.token_ids)
        assert r.correct == (r.prediction == s.answer.strip().lower())
        per_layer = [n_v] * layer + [kept] * (n_layers - layer)
        assert r.flops_llm == sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in per_layer)
        assert r.flops_overhead == 0
        assert r.average_retention == pytest.approx(sum(per_layer) / (n_layers * n_v))
        cache_tokens = sum(text_len + n for n in per_layer)  # each layer's KV cache after prefill
        assert r.kv_bytes == cache_tokens * per_token_kv_bytes(qwen)
        assert r.prefill_s > 0 and r.total_s >= r.prefill_s + r.decode_s
        assert (r.decode_s > 0) == (r.new_tokens > 1)
    vanilla = report.result("vanilla")
    assert vanilla.accuracy == 1.0 and vanilla.preservation == 100.0 and vanilla.n == 3
    fastv = report.result("fastv:layer=1", 0.25)
    assert fastv.preservation == pytest.approx(100 * fastv.accuracy)
    assert fastv.layer == 1 and 0.25 < fastv.average_retention < 1.0


@dataclass
class ForwardFirst(Pruner):
    """A pruner that runs the whole model (with a cache) to score, like the oracle does."""

    def score(self, vlm, prompt):
        vlm.forward(prompt.inputs_embeds, prompt.position_ids, prompt.attention_mask, use_cache=True)
        return torch.arange(prompt.num_visual, dtype=torch.float)


def test_meter_attributes_the_last_generation(qwen):
    p = qwen.prepare(images=random_image(5), question="how many 7 are there ?")
    sample = type("S", (), {"id": "x", "question": p.question, "answer": "7", "video": None, "meta": {}})()
    shape = LLMShape.from_config(qwen.text_config)
    rec = run_one(qwen, ForwardFirst(), "forward-first", p, sample, 0.25, shape, 3)
    kept_len = p.length - p.num_visual + math.ceil(0.25 * p.num_visual)
    assert rec.kv_bytes == 2 * kept_len * per_token_kv_bytes(qwen)  # the pruned generation's cache
    assert rec.kind == "image" and rec.layer == 0


def test_eval_cli_end_to_end(tiny_dirs, manifest, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_dirs("qwen2_vl")), "--task", str(manifest), "--methods", "vanilla",
                 "uniform", "fastv", "--fastv-layer", "1", "--ratios", "0.5", "--max-new-tokens", str(MAX_NEW),
                 "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["ratio"], r["layer"]) for r in printed["results"]] == [
        ("vanilla", 1.0, 0), ("uniform", 0.5, 0), ("fastv", 0.5, 1)]
    assert printed["results"][0]["accuracy"] == 1.0
    data = json.loads((out / "report.json").read_text())
    assert len(data["samples"]) == 9 and data["task"]["task"] == "manifest"
    assert {"prediction", "reference", "correct"} <= set(data["samples"][0])
    assert "## Efficiency" in (out / "report.md").read_text()
    assert (out / "preservation_vs_retention.png").is_file() and (out / "preservation_vs_flops.png").is_file()


def test_method_specs_and_errors(qwen, manifest):
    assert parse_method("fastv:layer=4") == ("fastv", {"layer": 4})
    assert parse_method("random:seed=1,x=abc") == ("random", {"seed": 1, "x": "abc"})
    with pytest.raises(ValueError, match="key=value"):
        parse_method("fastv:4")
    samples = ManifestSource(manifest)
    with pytest.raises(ValueError, match="did you mean 'fastv'"):
        run_eval(qwen, samples, EvalConfig(methods=("fastvv",), progress=False))
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\]"):
        run_eval(qwen, samples, EvalConfig(ratios=(1.5,), progress=False))
    with pytest.raises(FileNotFoundError, match="unknown task"):
        load_task(TaskConfig(name="nope.jsonl"))


def test_digits_task_adapter():
    pytest.importorskip("explainprune.tasks.digits")
    task = load_task(TaskConfig(limit=4, options={"kinds": ("rowcol", "video")}))
    assert len(task) == 4 and task.describe()["split"] == "test"
    kinds = [sample_kind(task[i]) for i in range(4)]
    assert kinds == ["rowcol", "video", "rowcol", "video"]
    assert task[1].video is not None and task[0].images is not None


def test_learned_overhead_is_accounted(qwen):
    from explainprune.compressor import Compressor
    from explainprune.evaluation.flops import attention_flops, conv_flops
    from explainprune.pruning.learned import Learned

    p = qwen.prepare(images=random_image(6), question="what digit is in row 2 column 3 ?")
    sample = type("S", (), {"id": "y", "question": p.question, "answer": "7", "video": None, "meta": {}})()
    heads = qwen.text_config.num_attention_heads
    pruner = Learned(compressor=Compressor(in_channels=heads))
    rec = run_one(qwen, pruner, "learned", p, sample, 0.25, LLMShape.from_config(qwen.text_config), 3)
    n = p.num_visual
    assert rec.flops_overhead == attention_flops(n, 64) + conv_flops(n, heads, (32, 64, 128, 256, 512), 3)
    assert rec.kept == math.ceil(0.25 * n) and rec.average_retention == pytest.approx(rec.kept / n)


@dataclass
class Counting(Pruner):
    calls: int = 0

    def score(self, vlm, prompt):
        self.calls += 1
        return torch.arange(prompt.num_visual, dtype=torch.float)


def test_scores_shared_across_ratios(qwen):
    p = qwen.prepare(images=random_image(7), question="how many 7 are there ?")
    sample = type("S", (), {"id": "z", "question": p.question, "answer": "7", "video": None, "meta": {}})()
    shape, pruner = LLMShape.from_config(qwen.text_config), Counting()
    with shared_scores(pruner) as timing:
        recs = [run_one(qwen, pruner, "counting", p, sample, r, shape, 2, timing) for r in (0.5, 0.25, 0.1)]
    assert pruner.calls == 1 and "score" not in vars(pruner)
    assert [r.kept for r in recs] == [math.ceil(f * p.num_visual) for f in (0.5, 0.25, 0.1)]
    assert recs[0].score_s == recs[2].score_s == timing.seconds > 0
    assert all(r.total_s >= r.score_s + r.prefill_s + r.decode_s for r in recs)


def test_baseline_selection_flops_and_stage_layers_are_accounted(qwen):
    """Each method's own selection cost is in flops_overhead; PyramidDrop's FLOPs sum its stages' layers."""
    from explainprune.evaluation.flops import attention_flops, llm_flops

    p = qwen.prepare(images=random_image(8), question="what digit is in row 2 column 3 ?")
    sample = type("S", (), {"id": "z", "question": p.question, "answer": "7", "video": None, "meta": {}})()
    shape = LLMShape.from_config(qwen.text_config)
    n, d = p.num_visual, shape.hidden
    div = run_one(qwen, get_pruner("divprune"), "divprune", p, sample, 0.25, shape, 3)
    assert div.flops_overhead == n * n * d + div.kept * n
    pd = run_one(qwen, get_pruner("pdrop"), "pdrop", p, sample, 0.5, shape, 3)
    out = get_pruner("pdrop").generate(qwen, p, 0.5, max_new_tokens=1)
    assert pd.flops_llm == llm_flops(out.visual_per_layer, shape) and pd.layer == 1
    assert pd.average_retention == pytest.approx(sum(out.visual_per_layer) / (2 * n))
    assert pd.flops_overhead == attention_flops(out.visual_per_layer[0], d)  # 2 layers: one boundary
    dart = run_one(qwen, get_pruner("dart", layer=1), "dart", p, sample, 0.25, shape, 3)
    assert dart.flops_overhead == n * d + 8 * n * d and dart.layer == 1
    assert run_one(qwen, get_pruner("random"), "random", p, sample, 0.25, shape, 3).flops_overhead == 0


def test_output_cache_reads_either_field_without_the_deprecated_alias():
    """transformers 5.24 names the KV cache ``cache`` and logs a deprecation when ``past_key_values`` is read
    (once per eval run, printed on every ``eval``/``demo``); 5.18 has only ``past_key_values``."""
    from collections import OrderedDict

    from explainprune.evaluation.runner import output_cache

    class Output(OrderedDict):
        @property
        def past_key_values(self):  # the deprecated alias: must not be read when "cache" is there
            raise AssertionError("read the deprecated past_key_values alias")

    new, old = object(), object()
    assert output_cache(Output(logits=1, cache=new)) is new
    assert output_cache(OrderedDict(logits=1, past_key_values=old)) is old
    assert output_cache(OrderedDict(logits=1)) is None
