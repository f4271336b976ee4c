"""The paper's evaluation (Section 4: Tables 1-3, 7-8) for your model, through lmms-eval, in one command.

For a checkpoint (Qwen2-VL-7B-Instruct, LLaVA-OneVision-7B; VILA-1.5 runs as a LLaVA-style model) and the
benchmark data lmms-eval reads (its hub datasets, cached), it runs every method the tables compare at their
retention ratios with the paper's settings, greedy, then renders the tables in the paper's shape with the
paper's reported number beside ours in every cell and the difference:

  Table 1  R_v itself (``oracle``, Eq. 1) at 50 / 25%: MME, MMStar, MMVet | Video-MME, MVBench, MMBench-Video
  Table 2  learned f_θ vs FastV at 50 / 25%: MME, MMStar, MMVet, SEED-Bench (images)
  Table 3  learned f_θ vs FastV at 50 / 25 / 10%: Video-MME, MVBench, MMBench-Video, NExT-QA (mc, oe),
           ActivityNetQA (videos)
  Table 7  MMStar at 25%: FLOPs (Appendix D's standard input: a 384 x 512 image) and performance preservation
  Table 8  MVBench at 25%: the same for videos (32 frames; 16 for VILA)

Settings (Section 4.1): Qwen2-VL images at half its default ``max_pixels`` (6,422,528 of 12,845,056), videos
at 384·28·28 pixels per frame and 32 frames; LLaVA-OneVision images as it processes them, 32 frames; VILA 16
frames. FastV "at the 4-th layer" is ``fastv:layer=3`` (layers 0-2 see every token): the K whose Eq. 4 FLOPs
reproduce the paper's (Qwen2-VL at 25%: 3.1 T of 9.6 T; LLaVA-OneVision: 4.2 T; its "2-nd layer" 3.5 T is
K=1); ``--fastv-layer`` overrides. Benchmarks judged by GPT (MMVet, ActivityNetQA) are skipped unless
``--judge`` (lmms-eval then reads OPENAI_API_KEY); MMBench-Video has no lmms-eval task (the paper used
VLMEvalKit: docs/paper.md) and is listed as not run. Every cell the run did not produce shows "-".

  python recipes/paper/evaluate.py --model Qwen/Qwen2-VL-7B-Instruct --gpus 8 --out runs/paper-eval \\
      --compressor-image runs/paper/f-image/compressor --compressor-video runs/paper/f-video/compressor
  python recipes/paper/evaluate.py ... --dry-run          # print every command, run nothing
  python recipes/paper/evaluate.py ... --render-only      # the tables from the runs already there

A run whose results file exists is not run again (rerun to resume). ``--model demo --benchmarks digits``
runs the same pipeline on the shipped demo model and the built-in digits tasks (``explainprune lmms-task``),
which is how the script is tested. This file is not part of the library; it composes commands.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# -- what the paper ran -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """One benchmark: its lmms-eval task(s), how its score is read, and whether a GPT judge scores it."""

    name: str
    modality: str                  # image | video
    tasks: tuple[str, ...]         # lmms-eval task names (empty: no lmms-eval task)
    metrics: tuple[str, ...]       # result keys summed for the score ("metric,filter")
    judge: bool = False
    percent: bool = True           # a fraction in [0, 1] is shown in percent, as the paper prints it


BENCHES = {b.name: b for b in (
    Bench("MME", "image", ("mme",), ("mme_perception_score,none", "mme_cognition_score,none"), percent=False),
    Bench("MMStar", "image", ("mmstar",), ("average,none",)),
    Bench("MMVet", "image", ("mmvet",), ("gpt_eval_score,none",), judge=True),
    Bench("SEED", "image", ("seedbench",), ("seed_image,none",)),
    Bench("Video-MME", "video", ("videomme",), ("videomme_perception_score,none",)),
    Bench("MVBench", "video", ("mvbench",), ("mvbench_accuracy,none",)),
    Bench("MMBench-Video", "video", (), (), judge=True, percent=False),
    Bench("NExT-QA mc", "video", ("nextqa_mc_test",), ("exact_match,none",)),
    Bench("NExT-QA oe", "video", ("nextqa_oe_test",), ("WUPS,none",)),
    Bench("ActivityNetQA", "video", ("activitynetqa",), ("gpt_eval_accuracy,none",), judge=True),
    # the built-in benchmark (the demo model): tested end to end
    Bench("digits image", "image", ("explainprune_digits_image",), ("exact_match,none",)),
    Bench("digits video", "video", ("explainprune_digits_video",), ("exact_match,none",)),
)}
TABLE_BENCHES = {
    1: ("MME", "MMStar", "MMVet", "Video-MME", "MVBench", "MMBench-Video"),
    2: ("MME", "MMStar", "MMVet", "SEED"),
    3: ("Video-MME", "MVBench", "MMBench-Video", "NExT-QA mc", "NExT-QA oe", "ActivityNetQA"),
    7: ("MMStar",),
    8: ("MVBench",),
}
DIGITS = {"image": "digits image", "video": "digits video"}

# The paper's reported numbers: (table, model, method, ratio) -> scores in TABLE_BENCHES order (None: not
# reported). Methods: vanilla, oracle (R_v, "GAE"), fastv, learned ("Ours"). Tables 7-8: (FLOPs T, pres. %).
PAPER: dict[tuple[int, str, str, float], tuple] = {
    (1, "llava_onevision", "vanilla", 1.0): (1997.7, 60.5, 48.7, 53.6, 41.2, 0.41),
    (1, "llava_onevision", "oracle", 0.5): (1974.2, 59.7, 47.2, 54.3, 41.1, 0.40),
    (1, "llava_onevision", "oracle", 0.25): (1977.3, 59.3, 47.0, 53.8, 40.9, 0.40),
    (1, "qwen2_vl", "vanilla", 1.0): (2295.1, 60.4, 54.0, 50.4, 51.0, 1.23),
    (1, "qwen2_vl", "oracle", 0.5): (2297.1, 60.3, 53.2, 51.0, 50.7, 1.19),
    (1, "qwen2_vl", "oracle", 0.25): (2299.1, 58.7, 51.7, 50.3, 49.7, 1.17),
    (1, "vila", "vanilla", 1.0): (1700.3, 38.7, 39.3, 47.3, 34.0, 1.29),
    (1, "vila", "oracle", 0.5): (1740.5, 37.2, 38.0, 47.9, 34.2, 1.26),
    (1, "vila", "oracle", 0.25): (1722.1, 35.7, 35.6, 47.1, 35.1, 1.28),
    (2, "llava_onevision", "vanilla", 1.0): (1997.7, 60.5, 48.7, 76.7),
    (2, "llava_onevision", "fastv", 0.5): (1974.0, 56.8, 46.1, 75.2),
    (2, "llava_onevision", "learned", 0.5): (1980.8, 57.5, 46.2, 75.3),
    (2, "llava_onevision", "fastv", 0.25): (1940.2, 51.7, 36.8, 71.1),
    (2, "llava_onevision", "learned", 0.25): (1965.9, 52.1, 41.8, 72.7),
    (2, "qwen2_vl", "vanilla", 1.0): (2295.1, 60.4, 54.0, 75.8),
    (2, "qwen2_vl", "fastv", 0.5): (2283.4, 55.5, 52.2, 73.2),
    (2, "qwen2_vl", "learned", 0.5): (2288.3, 55.9, 51.9, 73.2),
    (2, "qwen2_vl", "fastv", 0.25): (2276.5, 51.6, 45.5, 68.4),
    (2, "qwen2_vl", "learned", 0.25): (2280.9, 51.8, 47.3, 67.9),
    (3, "llava_onevision", "vanilla", 1.0): (53.6, 41.2, 0.41, 79.2, 49.0, 56.9),
    (3, "llava_onevision", "fastv", 0.5): (53.4, 39.5, 0.43, 78.6, 49.4, 56.5),
    (3, "llava_onevision", "learned", 0.5): (53.4, 40.5, 0.43, 78.6, 49.7, 56.5),
    (3, "llava_onevision", "fastv", 0.25): (51.1, 39.0, 0.40, 77.6, 48.6, 53.9),
    (3, "llava_onevision", "learned", 0.25): (51.3, 39.0, 0.42, 77.0, 49.0, 54.5),
    (3, "llava_onevision", "fastv", 0.1): (47.6, 37.9, 0.34, 75.0, 46.2, 49.5),
    (3, "llava_onevision", "learned", 0.1): (47.1, 37.4, 0.40, 76.5, 45.6, 51.6),
    (3, "qwen2_vl", "vanilla", 1.0): (50.4, 51.0, 1.23, 76.8, 45.5, 53.6),
    (3, "qwen2_vl", "fastv", 0.5): (49.7, 50.2, 1.17, 76.6, 45.9, 51.4),
    (3, "qwen2_vl", "learned", 0.5): (50.0, 49.8, 1.18, 75.6, 45.9, 52.4),
    (3, "qwen2_vl", "fastv", 0.25): (48.0, 48.3, 1.08, 75.4, 43.0, 45.5),
    (3, "qwen2_vl", "learned", 0.25): (48.1, 46.7, 1.11, 74.2, 44.3, 50.5),
    (3, "qwen2_vl", "fastv", 0.1): (45.9, 42.8, 0.97, 72.5, 42.9, 45.3),
    (3, "qwen2_vl", "learned", 0.1): (46.1, 42.5, 1.00, 72.0, 43.3, 47.5),
    (3, "vila", "vanilla", 1.0): (47.3, 34.0, 1.29, 69.9, 46.2, 55.6),
    (3, "vila", "fastv", 0.5): (46.4, 34.8, 1.28, 69.7, 45.7, 55.0),
    (3, "vila", "learned", 0.5): (47.6, 35.2, 1.25, 70.3, 46.4, 55.4),
    (3, "vila", "fastv", 0.25): (45.3, 34.7, 1.24, 68.8, 45.4, 54.2),
    (3, "vila", "learned", 0.25): (45.5, 35.6, 1.22, 69.4, 46.4, 54.8),
    (3, "vila", "fastv", 0.1): (43.9, 34.2, 1.13, 66.3, 43.6, 52.1),
    (3, "vila", "learned", 0.1): (43.6, 35.0, 1.14, 67.0, 44.7, 53.0),
    (7, "llava_onevision", "vanilla", 1.0): (12.9, 100.0),
    (7, "llava_onevision", "fastv", 0.25): (4.2, 83.9),
    (7, "llava_onevision", "learned", 0.25): (3.1, 84.8),
    (7, "qwen2_vl", "vanilla", 1.0): (9.6, 100.0),
    (7, "qwen2_vl", "fastv", 0.25): (3.1, 90.0),
    (7, "qwen2_vl", "learned", 0.25): (2.4, 91.3),
    (8, "llava_onevision", "vanilla", 1.0): (52.7, 100.0),
    (8, "llava_onevision", "fastv", 0.25): (16.1, 95.4),
    (8, "llava_onevision", "learned", 0.25): (11.7, 99.5),
    (8, "qwen2_vl", "vanilla", 1.0): (48.4, 100.0),
    (8, "qwen2_vl", "fastv", 0.25): (14.9, 94.1),
    (8, "qwen2_vl", "learned", 0.25): (10.9, 92.2),
    (8, "vila", "vanilla", 1.0): (27.0, 100.0),
    (8, "vila", "fastv", 0.25): (8.2, 100.3),
    (8, "vila", "learned", 0.25): (6.3, 110.4),
}
TABLE_METHODS = {1: ("oracle",), 2: ("fastv", "learned"), 3: ("fastv", "learned"), 7: ("fastv", "learned"),
                 8: ("fastv", "learned")}
TABLE_RATIOS = {1: (0.5, 0.25), 2: (0.5, 0.25), 3: (0.5, 0.25, 0.1), 7: (0.25,), 8: (0.25,)}
# Appendix D's standard inputs for the FLOPs of Tables 7-8: visual tokens n per family and modality, and the
# LLM's (d, m, layers) — Qwen2-VL-7B and LLaVA-OneVision-7B share Qwen2-7B's; VILA1.5-8B is Llama-3-8B.
FLOPS_INPUT = {("qwen2_vl", "image"): 1302, ("qwen2_vl", "video"): 5824, ("llava_onevision", "image"): 1728,
               ("llava_onevision", "video"): 6272, ("vila", "video"): 3136}
LLM = {"qwen2_vl": (3584, 18944, 28), "llava_onevision": (3584, 18944, 28), "vila": (4096, 14336, 32),
       "demo": (None, None, None)}
QWEN_MAX_PIXELS = 12845056  # Qwen2-VL-7B-Instruct's preprocessor_config max_pixels


def family_of(model: str, given: str | None) -> str:
    if given:
        return given
    low = model.lower()
    if low == "demo":
        return "demo"
    if "qwen2-vl" in low or "qwen2_vl" in low:
        return "qwen2_vl"
    if "onevision" in low:
        return "llava_onevision"
    if "vila" in low:
        return "vila"
    raise SystemExit(f"evaluate.py: error: cannot tell the family of {model!r}; give --family "
                     "qwen2_vl | llava_onevision | vila | demo")


def settings(family: str, modality: str) -> dict[str, object]:
    """The paper's loading / media settings (Section 4.1) as lmms-eval model_args."""
    if family == "qwen2_vl":
        return {"max_pixels": QWEN_MAX_PIXELS // 2} if modality == "image" else \
            {"max_pixels": 384 * 28 * 28, "max_frames": 32}
    if family == "llava_onevision":
        return {} if modality == "image" else {"max_frames": 32}
    if family == "vila":
        return {} if modality == "image" else {"max_frames": 16}
    return {}


def fastv_layer_for_paper(family: str) -> int:
    """The K (layers before FastV prunes) whose Eq. 4 FLOPs reproduce the paper's FastV at 25% (Table 7): 3 for
    Qwen2-VL and LLaVA-OneVision ("the 4-th layer"); VILA as they; the demo model: the registry's default."""
    if family == "demo":
        from explainprune.pruning import get_pruner

        return int(get_pruner("fastv").layer)
    if family not in ("qwen2_vl", "llava_onevision"):
        return 3
    from explainprune.cost import layer_flops

    d, m, layers = LLM[family]
    n = FLOPS_INPUT[(family, "image")]
    target = PAPER[(7, family, "fastv", 0.25)][0] * 1e12
    kept = -(-n // 4)
    cost = [k * layer_flops(n, d, m) + (layers - k) * layer_flops(kept, d, m) for k in range(1, layers)]
    return 1 + min(range(len(cost)), key=lambda i: abs(cost[i] - target))


# -- the runs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    method: str          # registry spec, e.g. "fastv:layer=3"
    ratio: float
    modality: str
    benches: tuple[str, ...]

    @property
    def name(self) -> str:
        tag = self.method.split(":")[0] if self.method.startswith("fastv") else self.method.replace(":", "-")
        return f"{self.modality}-{tag}-{self.ratio:g}"


def plan(args: argparse.Namespace, family: str) -> list[Run]:
    """The distinct (method, ratio, modality) runs the asked tables need, each over its benchmarks."""
    fastv = f"fastv:layer={args.fastv_layer}"
    wanted: dict[tuple[str, float, str], list[str]] = {}
    for table in args.tables:
        benches = [DIGITS[BENCHES[b].modality] if args.benchmarks == "digits" else b for b in TABLE_BENCHES[table]]
        benches = [b for b in dict.fromkeys(benches) if BENCHES[b].tasks and (args.judge or not BENCHES[b].judge)]
        for method in ("vanilla", *TABLE_METHODS[table]):
            for ratio in ((1.0,) if method == "vanilla" else [r for r in TABLE_RATIOS[table] if r in args.ratios]):
                spec = fastv if method == "fastv" else method
                for b in benches:
                    wanted.setdefault((spec, ratio, BENCHES[b].modality), [])
                    if b not in wanted[(spec, ratio, BENCHES[b].modality)]:
                        wanted[(spec, ratio, BENCHES[b].modality)].append(b)
    return [Run(m, r, mod, tuple(bs)) for (m, r, mod), bs in wanted.items()]


def command(args: argparse.Namespace, family: str, run: Run) -> list[str]:
    model_args: dict[str, object] = {"pretrained": args.model, "method": run.method.split(":")[0]}
    if ":" in run.method:
        for kv in run.method.split(":", 1)[1].split(","):
            key, value = kv.split("=", 1)
            model_args[key] = value
    if run.method != "vanilla":
        model_args["ratio"] = run.ratio
    if run.method == "learned":
        comp = args.compressor_image if run.modality == "image" else args.compressor_video
        if comp:
            model_args["compressor"] = comp
    if args.dtype:
        model_args["dtype"] = args.dtype
    model_args.update(settings(family, run.modality))
    tasks = ",".join(t for b in run.benches for t in BENCHES[b].tasks)
    launcher = [sys.executable, "-m", "lmms_eval"] if args.gpus <= 1 else \
        ["accelerate", "launch", "--num_processes", str(args.gpus), "-m", "lmms_eval"]
    cmd = [*launcher, "--model", "explainprune", "--model_args", ",".join(f"{k}={v}" for k, v in model_args.items()),
           "--tasks", tasks, "--batch_size", str(args.batch_size), "--output_path", str(Path(args.out) / run.name)]
    if args.device:
        cmd += ["--device", args.device]
    if args.include_path:
        cmd += ["--include_path", str(args.include_path)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd


def results_of(out: Path, run: Run) -> dict[str, float]:
    """bench -> score of one finished run (from lmms-eval's ``*_results.json``; empty when not there)."""
    files = sorted((out / run.name).glob("**/*_results.json"))
    if not files:
        return {}
    res = json.loads(files[-1].read_text())["results"]
    scores = {}
    for b in run.benches:
        bench = BENCHES[b]
        vals = [res.get(t, {}).get(m) for t in bench.tasks for m in bench.metrics]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            total = float(sum(vals))
            scores[b] = 100 * total if bench.percent and total <= 1.0 else total
    return scores


# -- the tables --------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if abs(x) >= 10 or digits == 1 else f"{x:.2f}"


def _cell(ours: float | None, paper: float | None) -> str:
    """"ours (paper, diff)" as every cell prints it."""
    if ours is None and paper is None:
        return "-"
    digits = 2 if paper is not None and abs(paper) < 10 else 1
    if paper is None:
        return f"{_fmt(ours, digits)} (paper -)"
    diff = "" if ours is None else f", {ours - paper:+.{digits}f}"
    return f"{_fmt(ours, digits)} (paper {paper:.{digits}f}{diff})"


def flops_t(family: str, modality: str, method: str, ratio: float, fastv_layer: int) -> float | None:
    """Appendix D FLOPs (T) at the paper's standard input for one cell of Tables 7-8."""
    if (family, modality) not in FLOPS_INPUT:
        return None
    from explainprune.cost import attention_flops, layer_flops

    d, m, layers = LLM[family]
    n = FLOPS_INPUT[(family, modality)]
    kept = max(1, math.ceil(n * ratio - 1e-9)) if method != "vanilla" else n
    if method == "fastv":
        per = [n] * fastv_layer + [kept] * (layers - fastv_layer)
    else:
        per = [kept] * layers
    overhead = attention_flops(n, d) if method == "learned" else 0  # Eq. 5 (Eq. 6, f_θ, is ~0.0003 T)
    return (sum(layer_flops(k, d, m) for k in per) + overhead) / 1e12


def render(args: argparse.Namespace, family: str, runs: list[Run]) -> tuple[str, dict]:
    out = Path(args.out)
    scores: dict[tuple[str, float, str], dict[str, float]] = {}
    for run in runs:
        scores[(run.method.split(":")[0], run.ratio, run.modality)] = results_of(out, run)
    key = "vila" if family == "vila" else family
    lines, data = [f"# The paper's tables on {args.model} (ours, with the paper's number and the difference)", ""], {}
    for table in args.tables:
        names = list(TABLE_BENCHES[table])
        shown = [DIGITS[BENCHES[b].modality] if args.benchmarks == "digits" else b for b in names]
        lines += [f"## Table {table}", ""]
        if table in (7, 8):
            modality = "image" if table == 7 else "video"
            bench = shown[0]
            lines += [f"{bench}, retention 25%: FLOPs (T, Appendix D's standard input) and performance "
                      "preservation (% of vanilla)", "", "| method | FLOPs (T) | preservation % |", "|---|---|---|"]
            van = scores.get(("vanilla", 1.0, modality), {}).get(bench)
            for method, ratio in (("vanilla", 1.0), ("fastv", 0.25), ("learned", 0.25)):
                got = scores.get((method, ratio, modality), {}).get(bench)
                pres = None if got is None or not van else 100 * got / van
                paper = PAPER.get((table, key, method, ratio), (None, None))
                fl = flops_t(family, modality, method, ratio, args.fastv_layer)
                lines.append(f"| {method} | {_cell(fl, paper[0])} | {_cell(pres, paper[1])} |")
                data[f"table{table}/{method}/{ratio:g}"] = {"flops_t": fl, "preservation": pres,
                                                            "paper": list(paper)}
            lines.append("")
            continue
        lines += ["| method | ratio | " + " | ".join(shown) + " | avg preservation % |",
                  "|---|---|" + "---|" * (len(shown) + 1)]
        for method in ("vanilla", *TABLE_METHODS[table]):
            for ratio in ((1.0,) if method == "vanilla" else TABLE_RATIOS[table]):
                if method != "vanilla" and ratio not in args.ratios:
                    continue
                paper = PAPER.get((table, key, method, ratio))
                cells, pres, paper_pres = [], [], []
                for i, b in enumerate(shown):
                    ours = scores.get((method, ratio, BENCHES[b].modality), {}).get(b)
                    van = scores.get(("vanilla", 1.0, BENCHES[b].modality), {}).get(b)
                    p = paper[i] if paper else None
                    pv = PAPER.get((table, key, "vanilla", 1.0))
                    if ours is not None and van:
                        pres.append(100 * ours / van)
                    if p is not None and pv:
                        paper_pres.append(100 * p / pv[i])
                    cells.append(_cell(ours, p))
                    data[f"table{table}/{method}/{ratio:g}/{b}"] = {"ours": ours, "paper": p}
                avg = _cell(sum(pres) / len(pres) if pres else None,
                            sum(paper_pres) / len(paper_pres) if paper_pres else None)
                lines.append(f"| {method} | {100 * ratio:g}% | " + " | ".join(cells) + f" | {avg} |")
        lines.append("")
    skipped = sorted({b for t in args.tables for b in TABLE_BENCHES[t] if args.benchmarks != "digits"
                      and (not BENCHES[b].tasks or (BENCHES[b].judge and not args.judge))})
    why = {True: "no lmms-eval task (VLMEvalKit: docs/paper.md)", False: "GPT judge: give --judge"}
    if skipped:
        lines.append("Not run: " + ", ".join(f"{b} ({why[not BENCHES[b].tasks]})" for b in skipped))
    return "\n".join(lines), data


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or 'demo'")
    p.add_argument("--family", choices=["qwen2_vl", "llava_onevision", "vila", "demo"],
                   help="the paper's settings to use (default: from the model name)")
    p.add_argument("--out", required=True, help="output folder: one lmms-eval output per run, tables.md / .json")
    p.add_argument("--compressor-image", help="f_θ trained on image labels (recipes/paper/recipe.py's f-image)")
    p.add_argument("--compressor-video", help="f_θ trained on video labels (f-video)")
    p.add_argument("--tables", type=int, nargs="+", default=[1, 2, 3, 7, 8], choices=[1, 2, 3, 7, 8])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--benchmarks", choices=["paper", "digits"], default="paper",
                   help="the paper's benchmarks (default) or the built-in digits tasks (the demo model)")
    p.add_argument("--fastv-layer", type=int, help="FastV's K (default: the K whose Eq. 4 FLOPs match the "
                   "paper's Table 7: 3)")
    p.add_argument("--judge", action="store_true", help="also run the GPT-judged benchmarks (OPENAI_API_KEY)")
    p.add_argument("--gpus", type=int, default=1, help="processes for `accelerate launch` (default 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="model dtype (default bfloat16; the demo: float32)")
    p.add_argument("--device", help="lmms-eval --device (e.g. cuda, cpu)")
    p.add_argument("--include-path", help="lmms-eval --include_path (the digits tasks of `explainprune lmms-task`)")
    p.add_argument("--limit", type=int, help="lmms-eval --limit: samples per task (a trial)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    p.add_argument("--render-only", action="store_true", help="only render the tables from finished runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    family = family_of(args.model, args.family)
    if args.fastv_layer is None:
        args.fastv_layer = fastv_layer_for_paper(family)
    runs = plan(args, family)
    out = Path(args.out)
    if not args.render_only:
        for run in runs:
            cmd = command(args, family, run)
            if args.dry_run:
                print(shlex.join(cmd))
                continue
            if results_of(out, run):
                print(f"# {run.name}: done already", flush=True)
                continue
            print(f"# {run.name}: {shlex.join(cmd)}", flush=True)
            done = subprocess.run(cmd)
            if done.returncode != 0 or not results_of(out, run):
                print(f"evaluate.py: error: run {run.name} wrote no results (exit {done.returncode}); see its "
                      f"output above", file=sys.stderr)
                return 1
    if args.dry_run:
        return 0
    text, data = render(args, family, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(text + "\n")
    (out / "tables.json").write_text(json.dumps(data, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
