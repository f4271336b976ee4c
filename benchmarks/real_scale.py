"""Real-scale benchmark: random-weight models with the exact shapes of Qwen2-VL-2B / 7B, LLaVA-OneVision-7B
and Qwen3-VL-8B (benchmarks/configs/, nothing downloaded), at ~1.3K and ~5.8K visual tokens.

One run measures, per visual-token count:
  - prefill time and peak memory: vanilla, and pruned to 50 / 25 / 10% by the learned pruner (f_θ on
    A_v^0, then the shorter prefill) and by FastV (pruning inside the LLM at its layer K);
  - the learned pruner's scoring (A_v^0 + f_θ + select) as a share of the vanilla prefill;
  - the relevance engine (Eq. 1, ``explainprune.relevance``) per sample: time and peak memory;
  - label throughput: ``explainprune.labels.label`` end to end (greedy answer, R_v, A_v^0, shard writing),
    in samples per minute.

The vision tower is built (its weights are in memory) but not run: each prompt is a chat-shaped token
sequence whose visual block holds random embeddings, with the real M-RoPE positions of an image of that
many merged tokens (Qwen) or 1-D positions (LLaVA-OneVision, no newline tokens); Qwen3-VL prompts carry
random DeepStack rows too (added after the first layers, at the kept visual tokens). So label throughput
excludes media decoding and the vision tower. f_θ has random weights (its cost is what is measured, not
its choices). Weights are random (normal, std 0.02): speed and memory do not depend on their values.

    python benchmarks/real_scale.py --device cuda --shape 7b              # the GPU run (bfloat16)
    python benchmarks/real_scale.py --device cpu --shape 2b --layers 4    # CPU: fewer layers, same widths

Time on CUDA is measured with CUDA events around each call, after one untimed warm-up round of every job
(kernels chosen, the allocator's cache filled; the cache is never emptied between timed calls, as a server
never empties it); peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the
step. On CPU, time is the process's CPU time (stable on a shared
machine, equal to wall-clock on an idle one with one thread) and peak memory the growth of the resident
set, sampled every 5 ms after ``malloc_trim`` (an approximation). Prefill measurements are interleaved
rounds (vanilla, scoring, each method and ratio once per round); medians are reported.

``--layers`` keeps every width and builds fewer decoder layers: prefill and relevance time grow about
linearly with the layer count, the KV cache too; the relevance engine's peak (one layer's attention maps)
does not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import explainprune
from explainprune.compressor import Compressor
from explainprune.evaluation.runner import cache_bytes, output_cache
from explainprune.labels import LabelConfig, label
from explainprune.models.base import Prompt, pad_left
from explainprune.pruning.fastv import fastv_hooks
from explainprune.sources import LabelSample

CONFIGS = Path(__file__).resolve().parent / "configs"
SHAPES = {"2b": "qwen2_vl_2b.json", "7b": "qwen2_vl_7b.json", "ov7b": "llava_onevision_7b.json",
          "qwen3-8b": "qwen3_vl_8b.json", "tiny": "qwen2_vl_tiny.json"}  # tiny: the GPU check's CPU dry run
MODEL_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
                 "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
QWEN = ("qwen2_vl", "qwen3_vl")  # M-RoPE positions, vision start / end tokens
RATIOS = (0.5, 0.25, 0.1)


# -- the model -------------------------------------------------------------------------------------------
class IdTokenizer:
    """Decodes token ids as numbers: the benchmark never tokenizes text (prompts are built from ids)."""

    chat_template = "synthetic"

    def __init__(self, eos: int):
        self.eos_token_id = self.pad_token_id = eos

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids)


def build(shape: str, dtype: torch.dtype, device: str, layers: int | None, attn: str) -> Any:
    """A VLM (explainprune adapter) around a random-weight model with the real config of ``shape``."""
    from transformers import AutoConfig

    from explainprune.models import adapter_for

    raw = json.loads((CONFIGS / SHAPES[shape]).read_text())
    config = AutoConfig.for_model(**raw)
    if layers:
        config.get_text_config().num_hidden_layers = layers
    adapter = adapter_for(config.model_type)
    import transformers

    cls = getattr(transformers, MODEL_CLASSES[config.model_type])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn).eval()
    model.generation_config.eos_token_id = raw.get("eos_token_id", raw.get("text_config", {}).get("eos_token_id"))
    model.generation_config.do_sample = False
    return adapter(model, IdTokenizer(model.generation_config.eos_token_id), None)


def grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged visual tokens closest to ``tokens`` (near-square)."""
    rows = max(1, round(tokens**0.5))
    return rows, max(1, round(tokens / rows))


@torch.no_grad()
def synthetic_prompt(vlm: Any, tokens: int, seed: int = 0) -> Prompt:
    """A chat-shaped prompt: 15 system/user tokens, <vision_start>, rows x cols visual tokens with random
    embeddings, <vision_end>, a 16-token question, 5 assistant-header tokens. Real positions (M-RoPE)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = grid(tokens)
    n = rows * cols
    c = vlm.config
    qwen = c.model_type in QWEN
    image_id = c.image_token_id if qwen else c.image_token_index

    special = {getattr(c, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                             "vision_end_token_id", "image_token_index", "video_token_index")}

    def text(k: int) -> torch.Tensor:  # ordinary text ids (below Qwen's special tokens, never a visual id)
        t = torch.randint(0, min(vlm.text_config.vocab_size, 151643), (k,), generator=g)
        return t.masked_fill(torch.isin(t, torch.tensor([i for i in special if i is not None])), 1)

    start = [c.vision_start_token_id] if qwen else []
    end = [c.vision_end_token_id] if qwen else []
    head = torch.cat([text(15), torch.tensor(start, dtype=torch.long)])
    question = text(16)
    ids = torch.cat([head, torch.full((n,), image_id), torch.tensor(end, dtype=torch.long), question, text(5)])[None]
    visual_pos = torch.arange(len(head), len(head) + n)
    q0 = len(head) + n + len(end)
    dev = vlm.device
    embeds = vlm.model.get_input_embeddings()(ids.to(dev))
    features = torch.randn(n, embeds.shape[-1], generator=g) * float(embeds[0, :15].float().std())
    embeds[0, visual_pos] = features.to(dev, embeds.dtype)
    mask = torch.ones_like(ids)
    if qwen:
        types = (ids == image_id).long()
        thw = torch.tensor([[1, 2 * rows, 2 * cols]])  # patches before the 2x2 merge
        pos, _ = vlm.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw, attention_mask=mask)
    else:
        pos = torch.arange(ids.shape[1])[None]
    r, cc = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    visual_grid = torch.stack([torch.zeros(n, dtype=torch.long), r.flatten(), cc.flatten()], 1)
    levels = len(getattr(c.vision_config, "deepstack_visual_indexes", None) or [])  # Qwen3-VL DeepStack
    residuals = {lvl: (torch.randn(n, embeds.shape[-1], generator=g) * float(embeds[0, :15].float().std()))
                 .to(dev, embeds.dtype) for lvl in range(levels)}
    return Prompt(input_ids=ids, inputs_embeds=embeds, position_ids=pos.cpu(), attention_mask=mask,
                  visual_pos=visual_pos, visual_grid=visual_grid, instruction=(q0, q0 + len(question)),
                  question=f"synthetic {tokens} seed {seed}", visual_residuals=residuals)


# -- measuring -------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Clock:
    """Times one call on a device. CUDA: CUDA events around the call on the current stream (the allocator's
    cache is kept: a timed call never pays fresh ``cudaMalloc``s that a server would not pay); CPU: this
    process's CPU time (stable on a shared machine, equal to wall-clock on an idle one with one thread)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Any) -> tuple[float, Any]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1e3, out
        t0 = time.process_time()
        out = fn()
        return time.process_time() - t0, out


def measured(fn: Any, device: torch.device, clock: Clock | None = None) -> tuple[float, int, Any]:
    """(seconds, peak bytes above the start, result) of ``fn()`` on ``device`` (see ``Clock``). CUDA's peak is
    ``max_memory_allocated`` above what was allocated before (the cache is never emptied: emptying it before
    every timed call made each pruned prefill pay fresh allocations and understated the speedups)."""
    clock = clock or Clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds, out = clock(fn)
        return seconds, torch.cuda.max_memory_allocated(device) - base, out
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the growth is then measured from a less tidy heap
        pass
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss())

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        seconds, out = clock(fn)
    finally:
        stop.set()
        watcher.join()
    return seconds, max(0, max(peak[0], _rss()) - base), out


def interleaved(jobs: dict[str, Any], device: torch.device, n: int, warmup: int = 1,
                clock: Clock | None = None) -> dict[str, tuple[float, int, Any]]:
    """name -> (median seconds, largest peak, last result) over ``n`` timed rounds that run every job once
    each (interleaved, so drift on a shared machine hits every entry alike), after ``warmup`` untimed rounds
    (kernels chosen, allocator cache filled for every shape)."""
    for _ in range(warmup):
        for fn in jobs.values():
            fn()
    runs: dict[str, list] = {k: [] for k in jobs}
    for _ in range(n):
        for name, fn in jobs.items():
            runs[name].append(measured(fn, device, clock))
    return {k: (statistics.median(r[0] for r in v), max(r[1] for r in v), v[-1][2]) for k, v in runs.items()}


@torch.no_grad()
def prefill(vlm: Any, prompt: Prompt, keep: torch.Tensor | None = None) -> int:
    """One prefill forward (KV cache built, last-token logits) on the kept tokens; the KV cache's bytes."""
    embeds, mask, pos = pad_left([prompt], [keep])
    dev = vlm.device
    out = vlm.forward(embeds.to(dev), pos.to(dev), mask.to(dev), prompt=prompt, keep=keep, use_cache=True,
                      logits_to_keep=1)
    return cache_bytes(output_cache(out))


def fastv_prefill(vlm: Any, prompt: Prompt, ratio: float, layer: int) -> int:
    with fastv_hooks(vlm, prompt, ratio, layer):
        return prefill(vlm, prompt)


def ideal_speedup(vlm: Any, full: int, kept: int) -> float:
    """The prefill speedup that FLOPs alone predict for a prompt of ``full`` tokens cut to ``kept``: Eq. 4 summed
    over every prompt token (text included, so a 100% pruner could not beat it), per layer."""
    from explainprune.evaluation.flops import layer_flops

    t = vlm.text_config
    return layer_flops(full, t.hidden_size, t.intermediate_size) / layer_flops(kept, t.hidden_size,
                                                                               t.intermediate_size)


class Source:
    """``count`` label samples; the benchmark's VLM maps each question to its synthetic prompt."""

    def __init__(self, questions: list[str]):
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> LabelSample:
        return LabelSample(f"s{i}", self.questions[i], "no match")

    def describe(self) -> dict[str, Any]:
        return {"task": "real_scale", "n": len(self.questions)}


def label_throughput(vlm: Any, tokens: int, count: int, answer_tokens: int) -> tuple[float, float]:
    """(samples per minute, seconds) of ``labels.label`` over ``count`` samples (keep_wrong: every sample
    gets its greedy answer, R_v and A_v^0, as a correct one would). Seconds as ``measured`` counts them."""
    prompts = {p.question: p for p in (synthetic_prompt(vlm, tokens, seed=100 + i) for i in range(count))}
    original = vlm.prepare
    vlm.prepare = lambda images=None, video=None, question="", **kw: prompts[question]
    try:
        with tempfile.TemporaryDirectory() as out:
            config = LabelConfig(shard_size=count, max_new_tokens=answer_tokens, keep_wrong=True)
            seconds, _, report = measured(lambda: label(vlm, Source(list(prompts)), out, config, progress=False),
                                          vlm.device)
    finally:
        vlm.prepare = original
    assert report.labeled == count, report
    return 60 * count / seconds, seconds


def measure_tokens(vlm: Any, tokens: int, args: argparse.Namespace, learned: Any, fastv_layer: int,
                   answer: list[int]) -> dict[str, Any]:
    """Every measurement at one visual-token count (see the module docstring)."""
    device, n = vlm.device, args.repeats
    prompt = synthetic_prompt(vlm, tokens)
    row: dict[str, Any] = {"visual_tokens": prompt.num_visual, "prompt_tokens": prompt.length, "prefill": []}
    keeps = {r: learned.keep(vlm, prompt, r) for r in RATIOS}
    jobs = {"vanilla": lambda: prefill(vlm, prompt), "scoring": lambda: learned.keep(vlm, prompt, 0.5)}
    for r in RATIOS:
        jobs[f"learned {r}"] = lambda k=keeps[r]: prefill(vlm, prompt, k)
        jobs[f"fastv {r}"] = lambda r=r: fastv_prefill(vlm, prompt, r, fastv_layer)
    m = interleaved(jobs, device, n)
    van_s = m["vanilla"][0]
    row["prefill"].append({"method": "vanilla", "ratio": 1.0, "kept": prompt.num_visual, "s": van_s,
                           "peak_bytes": m["vanilla"][1], "kv_bytes": m["vanilla"][2]})
    score_s, score_b, _ = m["scoring"]
    row["learned_scoring"] = {"s": score_s, "peak_bytes": score_b, "share_of_prefill": score_s / van_s}
    for r in RATIOS:
        s, b, _ = m[f"learned {r}"]
        row["prefill"].append({"method": "learned", "ratio": r, "kept": len(keeps[r]), "s": s, "peak_bytes": b,
                               "with_scoring_s": s + score_s, "kv_bytes": m[f"learned {r}"][2],
                               "ideal_speedup": ideal_speedup(vlm, prompt.length, prompt.length - prompt.num_visual
                                                              + len(keeps[r]))})
        s, b, _ = m[f"fastv {r}"]
        row["prefill"].append({"method": f"fastv (K={fastv_layer})", "ratio": r, "kept": len(keeps[r]), "s": s,
                               "peak_bytes": b, "kv_bytes": m[f"fastv {r}"][2]})
    if args.relevance_repeats:
        explain = {"relevance": lambda: explainprune.relevance(vlm, prompt, answer=answer,
                                                               head_chunk=args.head_chunk)}
        rel_s, rel_b, rel = interleaved(explain, device, args.relevance_repeats)["relevance"]
        row["relevance"] = {"s": rel_s, "peak_bytes": rel_b, "answer_tokens": len(answer),
                            "finite": bool(torch.isfinite(rel.scores).all()),
                            "head_chunk": getattr(rel, "head_chunk", None)}
    if args.label_samples:
        per_min, secs = label_throughput(vlm, tokens, args.label_samples, args.answer_tokens)
        row["label"] = {"samples": args.label_samples, "seconds": secs, "samples_per_min": per_min}
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    t_build = time.perf_counter()
    vlm = build(args.shape, dtype, args.device, args.layers, args.attn)
    build_s = time.perf_counter() - t_build
    t = vlm.text_config
    heads = t.num_attention_heads
    learned = explainprune.get_pruner("learned", compressor=Compressor(in_channels=heads).to(device))
    fastv_layer = args.fastv_layer or explainprune.get_pruner("fastv").layer
    answer = list(range(1000, 1000 + args.answer_tokens))
    weights = sum(p.numel() * p.element_size() for p in vlm.model.parameters())
    small = synthetic_prompt(vlm, 64)  # warm-up of every path on a short prompt
    prefill(vlm, small), fastv_prefill(vlm, small, 0.5, fastv_layer), learned.keep(vlm, small, 0.5)
    explainprune.relevance(vlm, small, answer=answer)
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    results = []
    for tokens in args.tokens:
        results.append(measure_tokens(vlm, tokens, args, learned, fastv_layer, answer))
        print(f"# {results[-1]['visual_tokens']} visual tokens done", flush=True)
    load += [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": load}
    return {"setting": {"shape": args.shape, "config": SHAPES[args.shape], "dtype": args.dtype,
                        "device": args.device, "layers": t.num_hidden_layers, "hidden": t.hidden_size,
                        "heads": heads, "kv_heads": t.num_key_value_heads, "intermediate": t.intermediate_size,
                        "attn": args.attn, "repeats": args.repeats, "fastv_layer": fastv_layer,
                        "weights_bytes": weights, "build_s": build_s},
            "environment": env, "results": results}


def table(r: dict[str, Any]) -> str:
    s = r["setting"]
    mib = 2**20
    lines = [f"{s['shape']} shape ({s['config']}): {s['layers']} layers, d={s['hidden']}, {s['heads']} heads / "
             f"{s['kv_heads']} KV, FFN {s['intermediate']}; {s['dtype']} on {s['device']} "
             f"({r['environment']['device']}, {r['environment']['threads']} threads), {s['attn']}; weights "
             f"{s['weights_bytes'] / mib:.0f} MiB; median of {s['repeats']} interleaved rounds; "
             f"{'wall-clock' if s['device'].startswith('cuda') else 'CPU'} time", ""]
    for row in r["results"]:
        van = row["prefill"][0]["s"]
        lines += [f"### {row['visual_tokens']} visual tokens ({row['prompt_tokens']} prompt tokens)", "",
                  "| method | retained | kept | prefill (ms) | speedup | FLOPs-ideal | + scoring (ms) | "
                  "peak memory (MiB) | KV cache (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in row["prefill"]:
            extra = f"{1e3 * p['with_scoring_s']:.0f}" if "with_scoring_s" in p else ""
            ideal = f"{p['ideal_speedup']:.2f}x" if "ideal_speedup" in p else ""
            kv = f"{p['kv_bytes'] / mib:.1f}" if p.get("kv_bytes") is not None else ""
            lines.append(f"| {p['method']} | {100 * p['ratio']:g}% | {p['kept']} | {1e3 * p['s']:.0f} | "
                         f"{van / p['s']:.2f}x | {ideal} | {extra} | {p['peak_bytes'] / mib:.0f} | {kv} |")
        sc, rel = row["learned_scoring"], row.get("relevance")
        lines += ["", f"- learned scoring (A_v^0 + f_θ + select): {1e3 * sc['s']:.1f} ms = "
                      f"{100 * sc['share_of_prefill']:.2f}% of the vanilla prefill"]
        if rel:
            chunk = f", head_chunk {rel['head_chunk']}" if rel.get("head_chunk") else ""
            lines.append(f"- relevance (Eq. 1, {rel['answer_tokens']} answer tokens{chunk}): {rel['s']:.2f} s, "
                         f"peak {rel['peak_bytes'] / mib:.0f} MiB")
        if "label" in row:
            lab = row["label"]
            lines.append(f"- label throughput: {lab['samples_per_min']:.2f} samples/min ({lab['samples']} samples in "
                         f"{lab['seconds']:.1f} s; greedy answer + R_v + A_v^0 + shard)")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="2b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, nargs="+", default=[1296, 5776],
                   help="visual token counts (each made a near-square grid; default 36x36 and 76x76)")
    p.add_argument("--layers", type=int, help="decoder layers to build (default: the real count)")
    p.add_argument("--attn", default="sdpa", help="attention implementation for prefill (default sdpa)")
    p.add_argument("--repeats", type=int, help="runs per prefill measurement (default 3 on cuda, 1 on cpu)")
    p.add_argument("--relevance-repeats", type=int, default=1, help="relevance runs (0: skip it)")
    p.add_argument("--answer-tokens", type=int, default=4, help="answer length explained / generated (default 4)")
    p.add_argument("--label-samples", type=int, help="samples labelled for throughput (default 8 cuda, 2 cpu; 0: skip)")
    p.add_argument("--fastv-layer", type=int, help="FastV's K (default: the pruner's, 2)")
    p.add_argument("--head-chunk", type=int, help="relevance head_chunk (default: the library's choice from "
                   "free memory)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="also write the raw numbers to this file")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (3 if cuda else 1)
    args.label_samples = (8 if cuda else 2) if args.label_samples is None else args.label_samples
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
