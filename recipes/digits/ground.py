"""Grounding fine-tune of the digits demo model: layer-0 instruction -> visual attention onto the region.

The stage-2 recipe (``questions.aux_attention_loss``) supervises layer 0 to attend to the question's key WORDS, so the
first layer's attention from the instruction tokens to the visual tokens (A_v^0, Section 3.3) is flat
with respect to the answer's region. Real MLLMs' first-layer attention is informative; this fine-tune
trains that property into the demo model. Vision frozen (the stage-2 feature banks are reused); the LLM
keeps the stage-2 answer loss (with its auxiliary attention supervision) and adds

    L_ground = -log( sum_region A / sum_visual A ),  A = layer-0 attention, mean over heads and over the
                                                     instruction rows (the question's tokens),

i.e. exactly the region mass of A_v^0 as ``first_layer_attention(...).mean(0)`` computes it, and
optionally (``--align-weight``) a ranking term that orders A_v^0 like the tokens the later layers actually
use: on this model R_v (Eq. 1) is almost entirely (>= 94% of its mass, top-25% recall 0.90-0.98) the
answer row's gradient-weighted attention in layers 1..L-1, T = sum_l E_h(A^l * dlogit/dA^l)^+, which
``answer_cam`` computes in the same step, and

    L_align = mean over (i in top-25% of T, j not) of softplus(log A_j - log A_i)    (A = A_v^0 as above)

is a pairwise ranking loss on A_v^0; ``--follow-weight`` adds the reverse (``follow_loss``: the later
layers' answer-row relevance ranks A_v^0's top tokens first). Both are off by default: they were measured
and not shipped (docs/digits_grounding.md, "Phase 3 experiments": the follow term makes R_v's top quarter
predictable but the model then depends on more tokens and every pruning method loses accuracy).

    python -m recipes.digits.ground --init src/explainprune/assets/demo --banks runs/digits \
        --out runs/ground/out --steps 300 --threads 1

(the banks are stage 2's ``banks_train.safetensors`` / ``banks_test.safetensors``, computed with the same
vision tower; stage 2 itself uses ``step_kind`` when ``--s2-ground`` > 0).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recipes.digits import questions as dq
from recipes.digits.common import llm_param_groups


def instruction_spans(tok: Any, questions: list[str], sink: int, n_vis: int) -> list[tuple[int, int]]:
    """Token span of each question in the sequences ``questions.encode`` builds (right after the visual
    block: ``<|vision_start|>`` at ``sink``, ``n_vis`` pads, ``<|vision_end|>``)."""
    start = sink + n_vis + 2
    return [(start, start + len(tok(q, add_special_tokens=False)["input_ids"])) for q in questions]


def visual_slice(sink: int, n_vis: int) -> slice:
    """Positions of the visual tokens in the sequences ``questions.encode`` builds."""
    return slice(sink + 1, sink + 1 + n_vis)


def visual_attention0(attn0: torch.Tensor, sink: int, spans: list[tuple[int, int]], n_vis: int) -> torch.Tensor:
    """A_v^0 [B, N_v]: layer-0 attention from the instruction rows to the visual tokens, mean over heads
    and rows (``first_layer_attention(...).mean(0)``)."""
    vis = visual_slice(sink, n_vis)
    return torch.stack([attn0[b, :, s:e, vis].mean((0, 1)) for b, (s, e) in enumerate(spans)])


def ground_loss(a0: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log region share of A_v^0's visual mass. ``a0`` [B, N_v] (``visual_attention0``), ``region``
    [B, N_v] (1 inside the answer's region). Returns (loss, region share [B])."""
    share = (a0 * region).sum(-1) / a0.sum(-1).clamp_min(1e-12)
    return -torch.log(share + 1e-6).mean(), share.detach()


def answer_cam(attentions: tuple[torch.Tensor, ...], logit: torch.Tensor, sink: int, n_vis: int,
               row: int = -3, graph: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T [B, N_v] = sum over layers 1.. of E_h((A^l * d logit / d A^l)^+) at the answer row, visual columns:
    the part of Eq. 1 that carries nearly all of R_v on the demo model, detached (a training target).
    With ``graph`` also the same sum without the positive part, differentiable (second order), else None."""
    grads = torch.autograd.grad(logit.sum(), attentions[1:], retain_graph=True, create_graph=graph)
    vis = visual_slice(sink, n_vis)
    cams = [a[:, :, row, vis] * g[:, :, row, vis] for a, g in zip(attentions[1:], grads, strict=True)]
    t = sum(c.detach().clamp(min=0).mean(1) for c in cams)
    return t.detach(), (sum(c.mean(1) for c in cams) if graph else None)


def _top_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean [B, N]: the top ``ceil(ratio * N)`` entries of each row of ``x``."""
    k = max(1, int(np.ceil(ratio * x.shape[-1])))
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, x.detach().topk(k, -1).indices, True)


def _pair_loss(s: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean over pairs (i in ``top``, j not) of softplus(s_j - s_i); s, top [B, N]."""
    diff = s[:, None, :] - s[:, :, None]  # [B, i, j] = s_j - s_i
    pair = top[:, :, None] & ~top[:, None, :]
    return ((F.softplus(diff) * pair).sum((1, 2)) / pair.sum((1, 2))).mean()


def follow_loss(raw: torch.Tensor, a0: torch.Tensor, ratio: float = 0.25) -> torch.Tensor:
    """The other direction of ``align_loss``: the later layers' (unclamped, differentiable) answer-row
    relevance ``raw`` [B, N] should rank the top ``ratio`` of A_v^0 ``a0`` [B, N] (detached) above the rest.
    Pairwise softplus on differences scaled by each sample's mean |raw| (a detached scale)."""
    z = raw / raw.detach().abs().mean(-1, keepdim=True).clamp_min(1e-12)
    return _pair_loss(z, _top_mask(a0, ratio))


def align_loss(a0: torch.Tensor, target: torch.Tensor, ratio: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise ranking loss: every token in the top ``ratio`` of ``target`` [B, N] should have more A_v^0
    ``a0`` [B, N] than every token outside it. Returns (loss, top-k recall of a0 against target [B])."""
    top = _top_mask(target, ratio)
    hit = _top_mask(a0, ratio)
    return _pair_loss(a0.clamp_min(1e-12).log(), top), (hit & top).sum(-1).float() / top.sum(-1)


def step_kind(model: Any, tok: Any, kind: str, drawn: tuple, attn_weight: float, ground_weight: float,
              scale: float = 1.0, align_weight: float = 0.0, follow_weight: float = 0.0,
              count_weight: float = 0.0, count_cells: bool = False) -> dict[str, float]:
    """One kind's forward and backward on ``drawn`` (``questions.draw_questions``' result); returns its
    losses, answer accuracy, region share and, when a ranking term is on, A_v^0's top-25% recall against
    the answer row's gradient-weighted attention. ``count_weight`` weighs ``questions.count_ratio_loss`` on
    count questions (``count_cells``: its cells-only variant)."""
    q, a, f, reg, side = drawn
    batch = dq.encode(model, tok, kind, q, a, f, side, reg)
    out = model.model.language_model(inputs_embeds=batch["embeds"], position_ids=batch["pos"],
                                     attention_mask=batch["mask"], output_attentions=True)
    logits = model.lm_head(out.last_hidden_state[:, -3:-1])
    ans = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    aux = dq.aux_attention_loss(out.attentions, batch) if attn_weight > 0 else torch.zeros(())
    n_vis = f.shape[1]
    a0 = visual_attention0(out.attentions[0], batch["sink"], instruction_spans(tok, q, batch["sink"], n_vis), n_vis)
    g, share = ground_loss(a0, batch["region"][:, visual_slice(batch["sink"], n_vis)].float())
    loss = ans + attn_weight * aux + ground_weight * g
    stats = {"ans": float(ans.detach()), "ground": float(g.detach()), "share": float(share.mean())}
    if kind == "count" and count_weight > 0:
        heads = dq.COUNT_HEADS_CELLS if count_cells else dq.COUNT_HEADS
        c = dq.count_ratio_loss(out.attentions, batch, heads, cells=count_cells)
        loss = loss + count_weight * c
        stats["count"] = float(c.detach())
    if align_weight > 0 or follow_weight > 0:  # answer_cam costs a backward through layers 1..L-1
        target, raw = answer_cam(out.attentions, logits[:, 0].gather(-1, batch["targets"][:, :1]),
                                 batch["sink"], n_vis, graph=follow_weight > 0)
        al, recall = align_loss(a0, target)
        loss = loss + align_weight * al
        if raw is not None:
            loss = loss + follow_weight * follow_loss(raw, a0.detach())
        stats.update(align=float(al.detach()), recall=float(recall.mean()))
    (scale * loss).backward()
    ok = logits[:, 0].argmax(-1) == batch["targets"][:, 0]
    return {**stats, "acc": float(ok.float().mean())}


def measure(model: Any, tok: Any, banks: dq.Banks, kinds: tuple[str, ...], grid: int = 4, frames: int = 4,
            n: int = 96) -> dict[str, tuple[float, float, float]]:
    """(teacher-forced accuracy, A_v^0 region share, A_v^0 top-25% recall against ``answer_cam``) per kind
    on a fixed draw from ``banks`` (still boards of ``grid``, videos of ``frames``). Parameters get no
    gradients (only the attention maps do)."""
    res = {}
    for kind in kinds:
        rng = np.random.default_rng(99)
        q, a, f, reg, side = dq.draw_questions(kind, banks, n, rng, frames if kind == "video" else grid)
        batch = dq.encode(model, tok, kind, q, a, f, side, reg)
        with torch.enable_grad():
            out = model.model.language_model(inputs_embeds=batch["embeds"].detach(), position_ids=batch["pos"],
                                             attention_mask=batch["mask"], output_attentions=True)
            logits = model.lm_head(out.last_hidden_state[:, -3])
            target, _ = answer_cam(out.attentions, logits.gather(-1, batch["targets"][:, :1]), batch["sink"],
                                   f.shape[1])
        ok = logits.argmax(-1) == batch["targets"][:, 0]
        n_vis = f.shape[1]
        a0 = visual_attention0(out.attentions[0].detach(), batch["sink"],
                               instruction_spans(tok, q, batch["sink"], n_vis), n_vis)
        _, share = ground_loss(a0, batch["region"][:, visual_slice(batch["sink"], n_vis)].float())
        _, recall = align_loss(a0, target)
        res[kind] = tuple(round(float(x), 3) for x in (ok.float().mean(), share.mean(), recall.mean()))
        model.zero_grad(set_to_none=True)
    return res


def load_for_finetune(init: str, banks: Path) -> tuple[Any, Any, dq.Banks, dq.Banks]:
    """A checkpoint to fine-tune (eager attention: the losses read attention weights; vision frozen), its
    tokenizer and stage 2's train / test banks from ``banks`` (``banks_{train,test}.safetensors``)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(init, attn_implementation="eager")
    model.model.language_model.config._attn_implementation = "eager"
    model.model.visual.eval().requires_grad_(False)
    train, test = (dq.Banks.load(Path(banks) / f"banks_{s}.safetensors") for s in ("train", "test"))
    return model, AutoTokenizer.from_pretrained(init), train, test


def export_finetuned(model: Any, init: str, out: Path) -> Path:
    """``init``'s directory (config, tokenizer, processor) with ``model``'s weights: a loadable checkpoint."""
    out = Path(out)
    shutil.copytree(init, out, dirs_exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", out / "model.safetensors")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="src/explainprune/assets/demo", help="checkpoint to fine-tune")
    p.add_argument("--out", default="runs/ground/out")
    p.add_argument("--banks", default="runs/digits",
                   help="dir with stage 2's banks_train.safetensors / banks_test.safetensors")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--qk-lr", type=float, default=None, help="lr of layer 0's q/k projections (default --lr)")
    p.add_argument("--grid", type=int, default=4, help="board size of the questions (still images)")
    p.add_argument("--frames", type=int, default=4, help="video length of the video questions")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--video-batch", type=int, default=6)
    p.add_argument("--kinds", nargs="+", default=["rowcol", "colour", "video", "count"])
    p.add_argument("--attn-weight", type=float, default=0.5, help="stage-2 auxiliary attention term")
    p.add_argument("--ground-weight", type=float, default=1.0)
    p.add_argument("--align-weight", type=float, default=0.0,
                   help="pairwise ranking term ordering A_v^0 like the answer row's gradient-weighted attention")
    p.add_argument("--follow-weight", type=float, default=0.0,
                   help="the reverse term: later layers' answer-row relevance ranks A_v^0's top tokens first "
                        "(second-order gradients)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok, train, test = load_for_finetune(a.init, Path(a.banks))
    params, groups = llm_param_groups(model, a.lr, a.qk_lr)
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    kinds = tuple(a.kinds)
    model.eval()
    print(f"{time.time() - t0:.0f}s before {measure(model, tok, test, kinds, a.grid, a.frames)}", flush=True)
    rng = np.random.default_rng([a.seed, 7])
    log: dict[str, list[float]] = {}
    for step in range(1, a.steps + 1):
        factor = min(1.0, step / 20) * (0.5 + 0.5 * np.cos(np.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = g["peak"] * factor
        opt.zero_grad(set_to_none=True)
        model.train()
        for kind in kinds:
            n = a.video_batch if kind == "video" else a.batch
            size = a.frames if kind == "video" else a.grid
            r = step_kind(model, tok, kind, dq.draw_questions(kind, train, n, rng, size), a.attn_weight,
                          a.ground_weight,
                          1.0 / len(kinds), a.align_weight, a.follow_weight)
            for k, v in r.items():
                log.setdefault(f"{kind}.{k}", []).append(v)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.log_every == 0 or step == a.steps:
            summary = {k: round(float(np.mean(v)), 3) for k, v in log.items() if k.endswith(("acc", "share", "recall"))}
            log = {}
            model.eval()
            test_m = measure(model, tok, test, kinds, a.grid, a.frames) if step % (4 * a.log_every) == 0 else {}
            print(f"{time.time() - t0:.0f}s step {step} train {summary} test {test_m}", flush=True)
    model.eval()
    print(f"{time.time() - t0:.0f}s after {measure(model, tok, test, kinds, a.grid, a.frames)}", flush=True)
    out = export_finetuned(model, a.init, Path(a.out))
    print(f"saved {out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
