"""Grounding fine-tune of the digits demo model: layer-0 instruction -> visual attention onto the region.

The stage-2 recipe (``digits_llm``) supervises layer 0 to attend to the question's key WORDS, so the
first layer's attention from the instruction tokens to the visual tokens (A_v^0, Section 3.3) is flat
with respect to the answer's region. Real MLLMs' first-layer attention is informative; this fine-tune
trains that property into the demo model. Vision frozen (the stage-2 feature banks are reused); the LLM
keeps the stage-2 answer loss (with its auxiliary attention supervision) and adds

    L_ground = -log( sum_region A / sum_visual A ),  A = layer-0 attention, mean over heads and over the
                                                     instruction rows (the question's tokens),

i.e. exactly the region mass of A_v^0 as ``first_layer_attention(...).mean(0)`` computes it.

    python -m explainprune.tasks.digits_ground --init src/explainprune/assets/demo --out runs/ground/out \
        --steps 300 --threads 1
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

from explainprune.tasks import digits_llm as dl


def instruction_spans(tok: Any, questions: list[str], sink: int, n_vis: int) -> list[tuple[int, int]]:
    """Token span of each question in the sequences ``digits_llm.encode`` builds (right after the visual
    block: ``<|vision_start|>`` at ``sink``, ``n_vis`` pads, ``<|vision_end|>``)."""
    start = sink + n_vis + 2
    return [(start, start + len(tok(q, add_special_tokens=False)["input_ids"])) for q in questions]


def ground_loss(attn0: torch.Tensor, batch: dict[str, torch.Tensor], spans: list[tuple[int, int]],
                n_vis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-log region share of the visual mass of layer-0 attention (mean over heads and instruction rows).

    ``attn0``: [B, H, L, L]. Returns (loss, region share [B])."""
    sink = batch["sink"]
    vis = slice(sink + 1, sink + 1 + n_vis)
    rows = []
    for b, (s, e) in enumerate(spans):
        rows.append(attn0[b, :, s:e, vis].mean((0, 1)))  # [N_v]
    a = torch.stack(rows)
    region = batch["region"][:, vis].float()
    share = (a * region).sum(-1) / a.sum(-1).clamp_min(1e-12)
    return -torch.log(share + 1e-6).mean(), share.detach()


def step_kind(model: Any, tok: Any, kind: str, banks: list[dl.Bank], n: int, rng: np.random.Generator,
              side: int, attn_weight: float, ground_weight: float, scale: float = 1.0) -> dict[str, float]:
    """One kind's forward and backward; returns its losses, answer accuracy and region share."""
    q, a, f, reg = dl.draw_questions(kind, banks, n, rng)
    batch = dl.encode(model, tok, kind, q, a, f, side, reg)
    out = model.model.language_model(inputs_embeds=batch["embeds"], position_ids=batch["pos"],
                                     attention_mask=batch["mask"], output_attentions=True)
    logits = model.lm_head(out.last_hidden_state[:, -3:-1])
    ans = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    aux = _aux(out.attentions, batch) if attn_weight > 0 else torch.zeros(())
    g, share = ground_loss(out.attentions[0], batch, instruction_spans(tok, q, batch["sink"], f.shape[1]),
                           f.shape[1])
    loss = ans + attn_weight * aux + ground_weight * g
    (scale * loss).backward()
    ok = logits[:, 0].argmax(-1) == batch["targets"][:, 0]
    return {"ans": float(ans), "ground": float(g), "acc": float(ok.float().mean()),
            "share": float(share.mean())}


def _aux(attentions: tuple[torch.Tensor, ...], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stage-2 auxiliary attention term of ``digits_llm.answer_loss`` (answer query row only)."""
    region = batch["region"][:, None, :].float()
    terms = [-torch.log((a[:, : a.shape[1] // 2, -3, :] * region).sum(-1) + 1e-4).mean()
             for a in attentions[1:]]
    a0 = attentions[0][:, :3, -3, :]
    terms.append(-torch.log(a0.gather(-1, batch["keys"][:, :, None]).squeeze(-1) + 1e-4).mean())
    return torch.stack(terms).mean()


@torch.no_grad()
def measure(model: Any, tok: Any, banks: list[dl.Bank], kinds: tuple[str, ...], side: int,
            n: int = 96) -> dict[str, tuple[float, float]]:
    """(teacher-forced accuracy, A_v^0 region share) per kind on a fixed draw from ``banks``."""
    res = {}
    for kind in kinds:
        rng = np.random.default_rng(99)
        q, a, f, reg = dl.draw_questions(kind, banks, n, rng)
        batch = dl.encode(model, tok, kind, q, a, f, side, reg)
        out = model.model.language_model(inputs_embeds=batch["embeds"], position_ids=batch["pos"],
                                         attention_mask=batch["mask"], output_attentions=True)
        ok = model.lm_head(out.last_hidden_state[:, -3]).argmax(-1) == batch["targets"][:, 0]
        _, share = ground_loss(out.attentions[0], batch, instruction_spans(tok, q, batch["sink"], f.shape[1]),
                               f.shape[1])
        res[kind] = (round(float(ok.float().mean()), 3), round(float(share.mean()), 3))
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="src/explainprune/assets/demo", help="checkpoint to fine-tune")
    p.add_argument("--out", default="runs/ground/out")
    p.add_argument("--banks", default="runs/main", help="dir with stage-2 banks_train.pt / banks_test.pt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--qk-lr", type=float, default=None, help="lr of layer 0's q/k projections (default --lr)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--video-batch", type=int, default=6)
    p.add_argument("--kinds", nargs="+", default=["rowcol", "colour", "video", "count"])
    p.add_argument("--attn-weight", type=float, default=0.5, help="stage-2 auxiliary attention term")
    p.add_argument("--ground-weight", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    t0 = time.time()
    model = Qwen2VLForConditionalGeneration.from_pretrained(a.init, attn_implementation="eager")
    model.model.language_model.config._attn_implementation = "eager"
    tok = AutoTokenizer.from_pretrained(a.init)
    banks_dir = Path(a.banks)
    train = torch.load(banks_dir / "banks_train.pt", weights_only=False)
    test = torch.load(banks_dir / "banks_test.pt", weights_only=False)
    side = int(round(train[0].feats.shape[1] ** 0.5))
    model.model.visual.requires_grad_(False)
    params = [p_ for n, p_ in model.named_parameters() if not n.startswith("model.visual")]
    qk = [p_ for n, p_ in model.named_parameters()
          if ".layers.0.self_attn." in n and (".q_proj" in n or ".k_proj" in n)]
    rest = [p_ for p_ in params if all(p_ is not x for x in qk)]
    groups = [{"params": rest, "peak": a.lr}, {"params": qk, "peak": a.qk_lr or a.lr}]
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=0.0)
    kinds = tuple(a.kinds)
    model.eval()
    print(f"{time.time() - t0:.0f}s before {measure(model, tok, test, kinds, side)}", flush=True)
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
            r = step_kind(model, tok, kind, train, n, rng, side, a.attn_weight, a.ground_weight,
                          1.0 / len(kinds))
            for k, v in r.items():
                log.setdefault(f"{kind}.{k}", []).append(v)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.log_every == 0 or step == a.steps:
            summary = {k: round(float(np.mean(v)), 3) for k, v in log.items() if k.endswith(("acc", "share"))}
            log = {}
            model.eval()
            test_m = measure(model, tok, test, kinds, side) if step % (4 * a.log_every) == 0 else {}
            print(f"{time.time() - t0:.0f}s step {step} train {summary} test {test_m}", flush=True)
    model.eval()
    print(f"{time.time() - t0:.0f}s after {measure(model, tok, test, kinds, side)}", flush=True)
    out = Path(a.out)
    shutil.copytree(a.init, out, dirs_exist_ok=True)  # config, tokenizer, processor unchanged
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", out / "model.safetensors")
    print(f"saved {out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
