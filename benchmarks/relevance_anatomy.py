"""Anatomy of R_v on digits: where Eq. 1's relevance comes from, and how much of its top quarter A_v^0 can see.

    .venv/bin/python benchmarks/relevance_anatomy.py --n 150             # docs/digits_grounding.md, phase 3
    .venv/bin/python benchmarks/relevance_anatomy.py --model runs/align/f1 --n 60 --split train

For each sample the model answers correctly (greedy, as the labeller keeps them), with R_v = Eq. 1 for that
answer (``relevance``, rule "grad", clamp):

* **direct terms** D_l = E_h((A^l ⊙ ∇A^l)^+)[p, visual]: the answer row's own gradient-weighted attention in
  layer l (from one full eager forward and one backward per answer token). Eq. 1's fold is e_p plus these
  direct terms plus relevance passed on through other rows, so the table gives the share of R_v's mass that
  is direct in layer 0, direct in layers >= 1 (T = sum_{l>=1} D_l), and the rest;
* **top-25% recalls** (k = ceil(N_v / 4), as ``select`` keeps): T vs R_v; A_v^0 (head mean, the compressor's
  input) vs R_v and vs T; "cell + A_v^0" (the answer cell's tokens first, then A_v^0: what an f_θ that
  found the cell perfectly could reach from A_v^0); and R_v of the same question on the image with extra
  Gaussian pixel noise (``--noise``) vs R_v (is R_v's top quarter stable or noise?);
* **concentration**: R_v's mass inside the answer cell, and how many of the cell's tokens are in its top 25%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict


def direct_terms(vlm, prompt, ids: list[int]):
    """D [L, N_v]: each layer's E_h((A^l ⊙ ∇A^l)^+) at the answer rows (mean over answer tokens)."""
    import torch

    from explainprune.attention import eager_attention
    from explainprune.relevance import teacher_forced

    embeds, pos, mask, rows = teacher_forced(vlm, prompt, ids)
    with eager_attention(vlm), torch.enable_grad():
        out = vlm.forward(embeds.detach(), pos, mask, output_attentions=True, use_cache=False)
        terms = []
        for row, y in zip(rows.tolist(), ids, strict=True):
            grads = torch.autograd.grad(out.logits[0, row, y], out.attentions, retain_graph=True)
            terms.append(torch.stack([(a.detach()[0, :, row] * g[0, :, row]).clamp(min=0).mean(0)
                                      for a, g in zip(out.attentions, grads, strict=True)]))
    return torch.stack(terms).mean(0)[:, prompt.visual_pos.to(terms[0].device)].cpu()


def jitter(images, sigma: float, rng):
    """The same PIL images with Gaussian pixel noise (std ``sigma`` on the [0, 1] scale) added."""
    import numpy as np
    from PIL import Image

    out = []
    for im in images:
        a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255 + rng.normal(0, sigma, (im.size[1], im.size[0], 3))
        out.append(Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8)))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' (the shipped model) or a checkpoint directory")
    p.add_argument("--n", type=int, default=150, help="samples of the split (kinds cycle, so ~n/3 per kind)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--seed", type=int, default=0, help="task seed (the pixel noise uses it too)")
    p.add_argument("--noise", type=float, default=0.01, help="pixel noise std for the stability check")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    p.add_argument("--json", action="store_true", help="print the per-kind means as JSON")
    a = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import explainprune
    from explainprune.attention import first_layer_attention
    from explainprune.labels import answers_match, region_indices
    from explainprune.relevance import relevance
    from explainprune.sources import DigitsSource
    from explainprune.train import topk_recall

    start = time.perf_counter()
    vlm = explainprune.load(a.model)
    source = DigitsSource(split=a.split, seed=a.seed, n=a.n)
    rng = np.random.default_rng(a.seed)
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    skipped = 0
    for i in range(len(source)):
        s = source[i]
        prompt = vlm.prepare(images=s.images, video=s.video, question=s.question)
        gen = vlm.generate(prompt, max_new_tokens=4)
        ids = [t for t in gen.token_ids if t not in vlm.eos_token_ids]
        if not ids or not answers_match(gen.text, s.answer):
            skipped += 1
            continue
        r = relevance(vlm, prompt, answer=ids).scores
        d = direct_terms(vlm, prompt, ids)
        t = d[1:].sum(0)
        a0 = first_layer_attention(vlm, prompt).mean(0).cpu()
        cell = region_indices(s.region, prompt.visual_grid)
        k = math.ceil(0.25 * r.numel())
        cell_first = a0 / a0.max().clamp_min(1e-30)
        cell_first[cell] += 2.0
        if s.images is not None:
            media = {"images": jitter(s.images if isinstance(s.images, list) else [s.images], a.noise, rng)}
        else:
            media = {"video": jitter(s.video, a.noise, rng)}
        r_noisy = relevance(vlm, vlm.prepare(question=s.question, **media), answer=ids).scores
        total = float(r.sum())
        row = rows[s.meta.get("kind", "?")]
        row["direct, layer 0"].append(float(d[0].sum()) / total)
        row["direct, layers >= 1 (T)"].append(float(t.sum()) / total)
        row["passed on (rest)"].append(1 - float(d.sum()) / total)
        row["recall T vs R_v"].append(topk_recall(t, r, 0.25))
        row["recall A_v^0 vs R_v"].append(topk_recall(a0, r, 0.25))
        row["recall A_v^0 vs T"].append(topk_recall(a0, t, 0.25))
        row["recall cell + A_v^0 vs R_v"].append(topk_recall(cell_first, r, 0.25))
        row[f"recall R_v (pixel noise {a.noise:g}) vs R_v"].append(topk_recall(r_noisy, r, 0.25))
        row["R_v mass in the cell"].append(float(r[cell].sum()) / total)
        row["cell tokens in R_v's top 25%"].append(len(set(cell) & set(r.topk(k).indices.tolist())) / len(cell))
    kinds = sorted(rows)
    means = {kd: {m: sum(v) / len(v) for m, v in rows[kd].items()} for kd in kinds}
    counts = {kd: len(next(iter(rows[kd].values()))) for kd in kinds}
    if a.json:
        print(json.dumps({"means": means, "used": counts, "skipped_wrong": skipped}, indent=1))
        return
    cmd = "benchmarks/relevance_anatomy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"model `{a.model}`, digits {a.split} split, first {a.n} samples; {sum(counts.values())} answered "
          f"correctly and used, {skipped} skipped; {time.perf_counter() - start:.0f} s; `{cmd}`\n")
    print("| | " + " | ".join(f"{kd} (n={counts[kd]})" for kd in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for m in means[kinds[0]]:
        print(f"| {m} | " + " | ".join(f"{means[kd][m]:.3f}" for kd in kinds) + " |")


if __name__ == "__main__":
    main()
