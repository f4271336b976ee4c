"""lmms-eval's loglikelihood requests under pruning (no lmms-eval needed): log p(continuation | context) and
is-greedy equal the unpruned model's own log-probabilities at keep-all, a masked reference when pruned (the
pruned visual tokens hidden from the layers the method prunes at), and the logits of the method's own
generation, for every registered method."""

from __future__ import annotations

import pytest
import torch

from explainprune.compressor import Compressor
from explainprune.integrations.lmms_eval.engine import PrunedEngine, Request
from explainprune.pruning import available, get_pruner
from explainprune.testing import random_image

Q = "what digit is in row 2 column 3 ?"
CONT = "7 blue"
RAGGED = (Q, "how many 7 are there ?")


def _options(vlm, method: str) -> dict:
    if method == "learned":
        torch.manual_seed(0)
        return {"compressor": Compressor(in_channels=vlm.text_config.num_attention_heads, channels=(8, 8),
                                         fingerprint=vlm.fingerprint())}
    if method == "dart":
        return {"layer": 2, "budget": "exact"}  # ceil(ratio * N_v): all at ratio 1 (the authors' count rounds down)
    return {"layer": 2} if method == "fastv" else {"seed": 1} if method == "random" else {}


def _ids(vlm, text: str) -> list[int]:
    return vlm.tokenizer(text, add_special_tokens=False)["input_ids"]


def unpruned_logprob(vlm, prompt, text: str) -> float:
    """The model's own forward on the processor inputs with the continuation appended (positions and the
    mask computed by transformers)."""
    ids = _ids(vlm, text)
    inputs = dict(prompt.model_inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(ids)).long()], 1)
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[0, prompt.length - 1: prompt.length - 1 + len(ids)]
    return float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).sum())


def masked_logprob(vlm, prompt, text: str, keep: torch.Tensor, layer: int) -> float:
    """One forward over context + continuation where decoder layers >= ``layer`` cannot attend to the pruned
    visual tokens (their own rows aside); every token keeps its original position."""
    ids = _ids(vlm, text)
    n, c = prompt.length, len(ids)
    embeds = torch.cat([prompt.inputs_embeds, vlm.model.get_input_embeddings()(torch.tensor([ids]))], 1)
    pos = prompt.position_ids
    pos = torch.cat([pos, (pos.max() + 1 + torch.arange(c)).expand(*pos.shape[:-1], c)], -1)
    causal = torch.ones(n + c, n + c, dtype=torch.bool).tril()
    pruned = torch.ones(prompt.num_visual, dtype=torch.bool)
    pruned[keep] = False
    cols = prompt.visual_pos[pruned]
    hidden = causal.clone()
    hidden[:, cols] = False
    hidden[cols, cols] = True
    dtype = embeds.dtype

    def additive(allowed):
        return torch.zeros(1, 1, n + c, n + c, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    hooks = [block.register_forward_pre_hook(
        lambda m, a, kw, i=i: (a, {**kw, "attention_mask": additive(hidden if i >= layer else causal)}),
        with_kwargs=True) for i, block in enumerate(vlm.language_model.layers)]
    try:
        with torch.no_grad():
            logits = vlm.forward(embeds, pos, torch.ones(1, n + c).long(), prompt=prompt).logits[0]
    finally:
        for h in hooks:
            h.remove()
    rows = logits[n - 1: n - 1 + c].float()
    return float(torch.log_softmax(rows, -1).gather(1, torch.tensor(ids)[:, None]).sum())


IMAGE_METHODS = [m for m in available() if m != "evs"]  # evs prunes videos only


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_keep_all_equals_the_unpruned_model(deep, method):
    """At ratio 1 every method scores what the unchanged model gives, in a ragged batch of two prompts."""
    vlm = deep("qwen2_vl")[0]
    images = [random_image(0), [random_image(1), random_image(2, (84, 84))]]
    engine = PrunedEngine(vlm, method, None if method == "vanilla" else 1.0, warmup=False, **_options(vlm, method))
    requests = [Request(q, im, continuation=t) for q, im, t in zip(RAGGED, images, (CONT, "3"))]
    scored = engine.score(requests)
    for r, s in zip(requests, scored):
        prompt = vlm.prepare(images=r.visuals, question=r.context)
        assert s.logprob == pytest.approx(unpruned_logprob(vlm, prompt, r.continuation), abs=1e-4)
        assert s.tokens == len(_ids(vlm, r.continuation)) and s.loss == pytest.approx(-s.logprob / s.tokens)
    assert len(engine.records) == 2 and all(r.kept == r.n_visual for r in engine.records)


# one kept subset each (PyramidDrop: one per stage; VisionZip merges; downsample re-prepares smaller media)
MASKED = [m for m in IMAGE_METHODS if m not in ("vanilla", "pdrop", "visionzip", "downsample")]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("method", MASKED)
def test_pruned_equals_a_masked_reference(deep, family, method):
    """Pruned at 25%: the score equals one forward hiding the pruned tokens from the layers the method prunes
    at (FastV / DART: layers >= K; the others: every layer), and differs from the unpruned score."""
    vlm = deep(family)[0]
    image = random_image(3)
    options = _options(vlm, method)
    (scored,) = PrunedEngine(vlm, method, 0.25, warmup=False, **options).score([Request(Q, image, continuation=CONT)])
    prompt = vlm.prepare(images=image, question=Q)
    pruner = get_pruner(method, **options)
    keep = pruner.keep(vlm, prompt, 0.25)
    expected = masked_logprob(vlm, prompt, CONT, keep, int(getattr(pruner, "layer", 0)))
    assert scored.logprob == pytest.approx(expected, abs=1e-4)
    assert abs(scored.logprob - unpruned_logprob(vlm, prompt, CONT)) > 1e-3  # the pruning shows


@pytest.mark.parametrize("method", [m for m in IMAGE_METHODS if m != "vanilla"])
def test_score_of_the_own_generation(deep, method):
    """What a method generates greedily is greedy when scored, with the log-probability of its generation's
    own logits: scoring prunes as generation does (PyramidDrop's stages and VisionZip's merge included)."""
    vlm = deep("qwen2_vl")[0]
    image = random_image(4)
    options = _options(vlm, method)
    prompt = vlm.prepare(images=image, question=Q)
    out = get_pruner(method, **options).generate(vlm, prompt, 0.25, max_new_tokens=3, output_logits=True)
    ids = [t for t in out.token_ids if t not in vlm.eos_token_ids]
    text = vlm.tokenizer.decode(ids)
    assert _ids(vlm, text) == ids, "the tiny word tokenizer gives the ids back"
    (scored,) = PrunedEngine(vlm, method, 0.25, warmup=False, **options).score([Request(Q, image, continuation=text)])
    expected = torch.log_softmax(out.logits[: len(ids)].float(), -1).gather(1, torch.tensor(ids)[:, None]).sum()
    assert scored.greedy and scored.logprob == pytest.approx(float(expected), abs=1e-4)
    other = [i for i in range(10, 20) if i != ids[0]][0]
    (worse,) = PrunedEngine(vlm, method, 0.25, warmup=False, **options).score(
        [Request(Q, image, continuation=vlm.tokenizer.decode([other]))])
    assert not worse.greedy


def test_text_only_and_unscorable_continuations(load_tiny):
    vlm = load_tiny("qwen2_vl")
    engine = PrunedEngine(vlm, "fastv", 0.5, warmup=False, layer=1)
    (s,) = engine.score([Request(Q, None, continuation=CONT)])
    assert s.logprob == pytest.approx(unpruned_logprob(vlm, vlm.prepare(question=Q), CONT), abs=1e-4)
    assert engine.text_only == 1 and engine.records == []
    with pytest.raises(ValueError, match="has no tokens"):
        engine.score([Request(Q, None, continuation="")])
    with pytest.raises(ValueError, match="end-of-sequence token"):
        engine.score([Request(Q, None, continuation="<|im_end|> 7")])


def test_options_of_one_document_share_its_prefill(deep):
    """Single-token options of one document and context are read from one pruned prefill (one record), with
    the values scoring them one by one gives; a longer option gets its own row."""
    vlm = deep("qwen2_vl")[0]
    image = random_image(5)
    options = ["3", "7", "blue", "7 blue"]
    engine = PrunedEngine(vlm, "fastv", 0.25, warmup=False, layer=2)
    shared = engine.score([Request(Q, image, task="t", doc_id=0, continuation=c) for c in options])
    assert len(engine.records) == 1  # the 3 single-token options ride on the 2-token option's row
    alone = [PrunedEngine(vlm, "fastv", 0.25, warmup=False, layer=2).score([Request(Q, image, continuation=c)])[0]
             for c in options]
    assert [s.logprob for s in shared] == pytest.approx([a.logprob for a in alone], abs=1e-5)
    assert [s.greedy for s in shared] == [a.greedy for a in alone]
    engine.score([Request(Q, image, task="t", doc_id=1, continuation=c) for c in options[:3]])
    assert len(engine.records) == 2
