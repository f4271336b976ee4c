"""How much each baseline option changes the KEPT SET against the authors' default, on the same prompts:
mean share of the default's kept tokens that the option keeps too (1.0 = same set). Prints a table; not a test.

    .venv/bin/python benchmarks/baseline_options.py            # demo model, digits test split, 40 samples

Options measured: pdrop positions=original (on a 4-layer random-weight LLaVA: the demo model is Qwen2-VL,
whose M-RoPE positions always stay original), dart keys=raw / order=norm / budget=exact, visionzip
cls_slot=False (random-weight LLaVA: the only family with a CLS token). Accuracy effects: ``explainprune
eval`` (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import explainprune
from explainprune.tasks.digits import DigitsTask
from explainprune.testing import build_tiny, random_image


def shared(a, b) -> float:
    a, b = set(a.tolist()), set(b.tolist())
    return len(a & b) / max(len(a), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--ratio", type=float, default=0.25)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    demo = explainprune.load("demo")
    task = DigitsTask(split="test")
    prompts = [demo.prepare(**s.media(), question=s.question)
               for s in (task[i] for i in range(args.samples))]
    base = explainprune.get_pruner("dart")
    for label, options in [("dart keys=raw", {"keys": "raw"}), ("dart order=norm", {"order": "norm"}),
                           ("dart budget=exact", {"budget": "exact"})]:
        other = explainprune.get_pruner("dart", **options)
        rows.append((label, "demo", sum(shared(base.keep(demo, p, args.ratio), other.keep(demo, p, args.ratio))
                                        for p in prompts) / len(prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        llava = explainprune.load(build_tiny("llava", tmp, layers=4))
        lp = [llava.prepare(images=random_image(i), question="what digit is in row 2 column 3 ?")
              for i in range(args.samples)]
        for label, name, a, b in [("pdrop positions=original", "pdrop", {}, {"positions": "original"}),
                                  ("visionzip cls_slot=False", "visionzip", {}, {"cls_slot": False})]:
            pa, pb = explainprune.get_pruner(name, **a), explainprune.get_pruner(name, **b)
            rows.append((label, "tiny LLaVA", sum(shared(pa.keep(llava, p, args.ratio), pb.keep(llava, p, args.ratio))
                                                  for p in lp) / len(lp)))
    print(f"| option | model | kept tokens shared with the default at {args.ratio:.0%} |\n|---|---|---|")
    for label, model, value in rows:
        print(f"| {label} | {model} | {value:.3f} |")


if __name__ == "__main__":
    main()
