"""The lmms-eval model class (needs lmms-eval: `make test` installs the extra): entry-point registration,
lmms-eval Instances with the tiny checkpoints of all four families, errors, the efficiency file."""

from __future__ import annotations

import json

import pytest

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
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
    assert model.engine.ratio == 1.0 and model.batch_size == 1 and model.rank == 0 and model.world_size == 1


@pytest.mark.parametrize("args, message", [
    ("method=fastvv,ratio=0.25", "unknown pruner 'fastvv'. did you mean 'fastv'"),
    ("method=fastv,ratio=1.5", r"ratio must be a number in \(0, 1\]"),
    ("method=fastv,ratio=abc", r"ratio must be a number in \(0, 1\]"),
    ("method=fastv,ratio=0.5,depth=3", "pruner 'fastv' accepts options"),
    ("method=random", "method 'random' needs ratio="),
])
def test_bad_model_args_fail_before_loading(args, message):
    with pytest.raises(ValueError, match=message):  # the checkpoint does not even exist: checked first
        ExplainPrune.create_from_arg_string(f"pretrained=/nonexistent/ckpt,{args}", {"device": "cpu"})
