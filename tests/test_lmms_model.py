"""The lmms-eval model class (needs lmms-eval: `make test` installs the extra): entry-point registration,
lmms-eval Instances with the tiny checkpoints of all four families, errors, the efficiency file."""

from __future__ import annotations

import json

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request  # noqa: E402
from explainprune.integrations.lmms_eval.model import ExplainPrune  # noqa: E402
from explainprune.testing import random_image  # noqa: E402

QUESTIONS = ["what digit is in row 2 column 3 ?", "how many 7 are there ?", "in frame 1 what digit is in row 1 ?"]


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, get_model_manifest

    assert get_model("explainprune") is ExplainPrune
    assert get_model_manifest("explainprune").simple_class_path.endswith("model.ExplainPrune")


def _instances(docs, gen_kwargs):
    def doc_to_visual(doc):
        return doc["visual"]

    return [Instance(request_type="generate_until", idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1},
                     arguments=(doc["question"], dict(gen_kwargs), doc_to_visual, i, "t", "test"))
            for i, doc in enumerate(docs)]


def test_generate_until_on_every_family(tiny_dirs, family, frames, tmp_path):
    """Instances as lmms-eval builds them: answers in request order (batched 2 at a time, longest first),
    equal to the engine's answers one by one, with token counts, and the efficiency file written."""
    model = ExplainPrune.create_from_arg_string(
        f"pretrained={tiny_dirs(family)},method=random,ratio=0.5,seed=1,efficiency_out={tmp_path},warmup=false",
        {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    docs = [{"question": QUESTIONS[0], "visual": [random_image(1)]},
            {"question": QUESTIONS[1] + " answer in words", "visual": [random_image(2), random_image(3, (84, 84))]},
            {"question": QUESTIONS[2], "visual": [frames[0], frames[1]]}]
    model.task_dict = {"t": {"test": docs}}
    out = model.generate_until(_instances(docs, {"max_new_tokens": 3, "until": ["\n\n"]}))
    ref = PrunedEngine(model.vlm, "random", 0.5, warmup=False, seed=1)
    for doc, res in zip(docs, out):
        (expected,) = ref.run([Request(doc["question"], doc["visual"], {"max_new_tokens": 3})])
        assert res.text == expected.text
        assert res.token_counts.input_tokens == expected.prompt_tokens
        assert res.token_counts.output_tokens == expected.new_tokens
    (path,) = tmp_path.glob("*_explainprune_efficiency.json")
    summary = json.loads(path.read_text())
    assert summary["tasks"]["t"]["n"] == 3 and summary["method"] == "random:seed=1" and summary["ratio"] == 0.5
    assert sorted(s["id"] for s in summary["samples"]) == ["t/0", "t/1", "t/2"]
    assert path.with_suffix(".md").read_text().startswith("explainprune efficiency")


def test_what_a_pruning_method_cannot_do(tiny_dirs):
    model = ExplainPrune(pretrained=str(tiny_dirs("qwen2_vl")), device="cpu")
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
    assert model.engine.ratio == 1.0 and model.batch_size == 1 and model.rank == 0 and model.world_size == 1


def test_loglikelihood_instances(tiny_dirs, tmp_path):
    """multiple_choice Instances (context, continuation, doc_to_visual, ...) and an unconditional ("", choice)
    one: lmms-eval's loss convention (mean NLL per token, lower = more likely) from the engine's log p."""
    model = ExplainPrune.create_from_arg_string(
        f"pretrained={tiny_dirs('qwen2_vl')},method=fastv,ratio=0.5,layer=1,efficiency_out={tmp_path},warmup=false",
        {"batch_size": 2, "device": "cpu"})
    docs = [{"question": QUESTIONS[0], "visual": [random_image(1)]}]
    model.task_dict = {"t": {"test": docs}}

    def doc_to_visual(doc):
        return doc["visual"]

    choices = ["7", "7 blue", "3"]
    instances = [Instance(request_type="loglikelihood", idx=i, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                          arguments=(QUESTIONS[0], c, doc_to_visual, 0, "t", "test")) for i, c in enumerate(choices)]
    instances.append(Instance(request_type="loglikelihood", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                              arguments=("", "3")))
    out = [o.text for o in model.loglikelihood(instances)]  # lmms-eval 0.7 keeps a GenerationResult's text as is
    ref = PrunedEngine(model.vlm, "fastv", 0.5, warmup=False, layer=1).score(
        [Request(QUESTIONS[0], docs[0]["visual"], continuation=c) for c in choices]
        + [Request("", None, continuation="3")])
    assert [o[0] for o in out] == pytest.approx([-r.logprob / r.tokens for r in ref], abs=1e-5)
    assert [o[1] for o in out] == [r.greedy for r in ref]
    (path,) = tmp_path.glob("*_explainprune_efficiency.json")
    summary = json.loads(path.read_text())
    assert summary["tasks"]["t"]["n"] == 1 and summary["text_only_requests"] == 1 and summary["dtype"] == "float32"


def _model(tiny_dirs, args: str, tmp_path):
    return ExplainPrune.create_from_arg_string(f"pretrained={tiny_dirs('qwen2_vl')},{args},efficiency_out={tmp_path}",
                                               {"device": "cpu"})


def test_load_and_processor_options_through_model_args(tiny_dirs, tmp_path):
    """max_pixels / min_pixels reach the image processor, dtype / revision / attn_implementation the loader,
    fps the engine; the pruner keeps its own options; everything is recorded in the efficiency file."""
    model = _model(tiny_dirs, "method=random,ratio=0.5,seed=3,max_pixels=12544,min_pixels=3136,dtype=bfloat16,"
                   "attn_implementation=eager,fps=1.5,warmup=false", tmp_path)
    size = model.vlm.image_processor.size
    assert (size["longest_edge"], size["shortest_edge"]) == (12544, 3136)
    assert model.vlm.model.dtype == torch.bfloat16 and model.engine.fps == 1.5 and model.engine.pruner.seed == 3
    assert model.vlm.text_config._attn_implementation == "eager"  # the language model's (models.base.text_attention)
    prompt = model.engine.prepare(Request(QUESTIONS[0], [random_image(1, (280, 280))]))
    assert prompt.num_visual == 12544 // 784  # the image budget holds
    model.task_dict = {"t": {"test": [{"question": QUESTIONS[0], "visual": [random_image(1)]}]}}
    model.generate_until(_instances(model.task_dict["t"]["test"], {"max_new_tokens": 2}))
    (path,) = tmp_path.glob("*_explainprune_efficiency.json")
    s = json.loads(path.read_text())
    assert s["dtype"] == "bfloat16" and s["revision"] is None and s["compressor"] is None
    assert s["load_options"] == {"attn_implementation": "eager", "max_pixels": "12544", "min_pixels": "3136"}
    assert s["prepare_options"] == {"fps": 1.5} and s["method"] == "random:seed=3"


def test_compressor_recorded_with_its_checksum(tiny_dirs, tmp_path):
    """A training run folder is accepted (its compressor/ is loaded) and the file names the folder loaded and
    the SHA-256 of its weights."""
    import hashlib

    from explainprune.compressor import Compressor
    from explainprune.models import load

    vlm = load(tiny_dirs("qwen2_vl"))
    run = tmp_path / "run"
    Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8,),
               fingerprint=vlm.fingerprint()).save_pretrained(run / "compressor")
    model = _model(tiny_dirs, f"method=learned,ratio=0.5,compressor={run},warmup=false", tmp_path / "eff")
    model.task_dict = {"t": {"test": [{"question": QUESTIONS[0], "visual": [random_image(1)]}]}}
    model.generate_until(_instances(model.task_dict["t"]["test"], {"max_new_tokens": 2}))
    (path,) = (tmp_path / "eff").glob("*_explainprune_efficiency.json")
    c = json.loads(path.read_text())["compressor"]
    assert c["path"] == str((run / "compressor").resolve())
    assert c["sha256"] == hashlib.sha256((run / "compressor" / "model.safetensors").read_bytes()).hexdigest()


def test_cached_run_says_what_it_measured(tiny_dirs, tmp_path):
    """With --use_cache, clean() (lmms-eval calls it after every request type, cached or not) writes a file
    saying how many requests came from the cache and were not measured."""
    import argparse

    model = _model(tiny_dirs, "method=random,ratio=0.5,warmup=false", tmp_path)

    class Cache:
        def get_stats(self):
            return {"hits": 5, "misses": 1, "skipped_non_deterministic": 0}

    def evaluate(lm):  # the locals lmms-eval's evaluate() holds when it calls lm.clean()
        cli_args = argparse.Namespace(output_path=None, use_cache=str(tmp_path / "cache"), timezone="UTC")  # noqa: F841
        response_cache = Cache()  # noqa: F841
        lm.clean()

    evaluate(model)
    (path,) = tmp_path.glob("*_explainprune_efficiency.json")
    s = json.loads(path.read_text())
    assert s["use_cache"]["answered_from_cache"] == 5 and s["use_cache"]["recomputed"] == 1
    assert s["overall"] is None and "not run" in s["use_cache"]["note"]
    assert "5 requests came from lmms-eval's cache" in path.with_suffix(".md").read_text()


@pytest.mark.parametrize("args, message", [
    ("method=fastvv,ratio=0.25", "unknown pruner 'fastvv'. did you mean 'fastv'"),
    ("method=fastv,ratio=1.5", r"ratio must be a number in \(0, 1\]"),
    ("method=fastv,ratio=abc", r"ratio must be a number in \(0, 1\]"),
    ("method=random", "method 'random' needs ratio="),
    ("method=vanilla,ratio=0.25", "method 'vanilla' keeps every visual token, so ratio=0.25 would be mislabelled"),
    ("method=fastv,ratio=0.5,batch_size=0", "batch_size must be an integer >= 1"),
])
def test_bad_model_args_fail_before_loading(args, message):
    """Checked before the checkpoint (which does not even exist); one line and SystemExit (non-zero exit)."""
    with pytest.raises(SystemExit, match="explainprune lmms-eval model: error: " + message) as err:
        ExplainPrune.create_from_arg_string(f"pretrained=/nonexistent/ckpt,{args}", {"device": "cpu"})
    assert "\n" not in str(err.value.code)


@pytest.mark.parametrize("args, message", [
    ("method=fastv,ratio=0.5,depth=3", "unknown model_args depth; accepted: the model's pretrained, method"),
    ("method=fastv,ratio=0.5,depth=3",
     "Qwen2VLImageProcessorPil image processor's .*max_pixels.*; pruner 'fastv''s layer$"),
    ("method=learned,ratio=0.5,compressor=/nonexistent/run", "no compressor at /nonexistent/run"),
    ("method=fastv,ratio=0.5,layer=abc", "option layer must be int"),
    ("method=vanilla,dtype=float8", "unknown dtype 'float8'"),
    ("method=vanilla,attn_implementation=fast", "attn_implementation='fast'; accepted: sdpa"),
])
def test_bad_options_fail_before_loading_weights(tiny_dirs, args, message):
    with pytest.raises(SystemExit, match=message):
        ExplainPrune.create_from_arg_string(f"pretrained={tiny_dirs('qwen2_vl')},{args}", {"device": "cpu"})


def test_bad_pretrained_device_and_output(tmp_path):
    with pytest.raises(SystemExit, match="'dmeo' is neither a local checkpoint.*did you mean 'demo'"):
        ExplainPrune.create_from_arg_string("pretrained=dmeo", {"device": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="device=cuda but this torch sees no CUDA GPU"):
            ExplainPrune.create_from_arg_string("pretrained=demo", {"device": "cuda"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=f"efficiency_out {tmp_path / 'file'} is a file"):
        ExplainPrune.create_from_arg_string(f"pretrained=demo,efficiency_out={tmp_path / 'file'}", {"device": "cpu"})


def test_loglikelihood_pair_survives_lmms_eval_unwrapping_and_its_cache():
    """lmms-eval 0.7 stringifies a bare (float, bool) (``unwrap_generation_output``); the GenerationResult
    carrying it keeps the pair, and its response cache accepts and stores it as a JSON pair."""
    from lmms_eval.api.instance import unwrap_generation_output
    from lmms_eval.caching.response_cache import ResponseCache, _serialize_response

    from explainprune.integrations.lmms_eval.model import _pair

    assert isinstance(unwrap_generation_output((0.5, True))[0], str)  # the lmms-eval behaviour worked around
    out = _pair(0.5, True)
    text, _ = unwrap_generation_output(out)
    assert tuple(text) == (0.5, True)
    assert ResponseCache._is_valid_response(out, "loglikelihood")
    assert _serialize_response(ResponseCache._extract_cacheable(out)) == "[0.5, true]"
