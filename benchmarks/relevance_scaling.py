"""Time and peak memory of the relevance engine vs the literal Eq. 1 reference, by visual-token count.

    .venv/bin/python benchmarks/relevance_scaling.py                 # the table in docs/relevance.md
    .venv/bin/python benchmarks/relevance_scaling.py --sizes 1024 2048 --layer-sweep   # quicker
    .venv/bin/python benchmarks/relevance_scaling.py --heads 16 --hidden 256 --layers 2 --sizes 2048 4096 \
        --reference-max 0 --head-chunk 1 4 --threads 1     # default engine vs relevance(head_chunk=c)

Model: a random-weight Qwen2-VL built from config (``explainprune.testing.tiny_qwen2_vl``), 8 decoder
layers by default, 2 query heads / 1 KV head (GQA), hidden 128; one image whose side is chosen so the
prompt holds exactly N visual tokens; a fixed 4-token answer (teacher-forced, no generation).

Each measurement runs in a fresh child process: load the model, prepare the prompt (vision tower, not
measured), run the method once on a 64-token prompt (warm-up), reset the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``) and run ``relevance`` (engine) or ``literal_relevance``
(tests/test_relevance.py: full n x n R, every layer's attention and its gradient held); ``--head-chunk C``
adds rows ``engine-hC`` = ``relevance(..., head_chunk=C)`` (C heads' maps at a time). Peak = VmHWM
after the call minus VmRSS before it, i.e. the memory the call needed above the loaded model and
prompt (large tensors are mmapped by glibc and given back on free, so RSS follows live tensors). Wall
time and process CPU time are reported; the machine is shared, so CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANSWER = [5, 6, 7, 8]


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS")}


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:  # pragma: no cover - old kernels: the peak then includes loading
        return False


def _grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) of merged tokens with rows * cols == tokens, as square as powers of two allow."""
    rows = 2 ** (int(math.log2(tokens)) // 2)
    return rows, tokens // rows


def child(method: str, tokens: int, checkpoint: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import explainprune
    from explainprune.relevance import relevance
    from explainprune.testing import random_image

    vlm = explainprune.load(checkpoint)
    rows, cols = _grid(tokens)
    prompt = vlm.prepare(images=random_image(0, (rows * 28, cols * 28)), question="what is in the picture")
    assert prompt.num_visual == tokens, (prompt.num_visual, tokens)
    warm = vlm.prepare(images=random_image(1, (224, 224)), question="what is in the picture")
    if method == "reference":
        spec = importlib.util.spec_from_file_location("test_relevance", ROOT / "tests" / "test_relevance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)

        def run(p):
            return module.literal_relevance(vlm, p, ANSWER).mean(0)
    else:
        chunk = int(method.removeprefix("engine-h")) if method.startswith("engine-h") else None

        def run(p):
            return relevance(vlm, p, ANSWER, head_chunk=chunk).scores
    run(warm)  # first-call costs (kernel selection, lazy init) stay out of the measurement

    import gc

    gc.collect()
    exact = _reset_peak()
    before = _status()["VmRSS"]
    wall, cpu = time.perf_counter(), time.process_time()
    scores = run(prompt)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status()["VmHWM"] - before
    return {"method": method, "tokens": tokens, "n": prompt.length + len(ANSWER) - 1,
            "layers": vlm.text_config.num_hidden_layers, "heads": vlm.text_config.num_attention_heads,
            "wall_s": wall, "cpu_s": cpu,
            "peak_bytes": peak, "peak_exact": exact, "checksum": float(scores.double().sum())}


def measure(method: str, tokens: int, checkpoint: Path, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(tokens), str(checkpoint), "--threads", str(threads)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "tokens": tokens, "error": f"over {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "tokens": tokens, "error": f"exit {out.returncode}: {tail[:80]}"}
    return json.loads(lines[-1])


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| visual tokens | layers | heads | method | wall s | CPU s | peak GiB | /ref peak | /ref CPU "
            "| /engine peak | /engine CPU |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    base = {m: {(r["tokens"], r.get("layers")): r for r in rows if r["method"] == m and "error" not in r}
            for m in ("reference", "engine")}
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r.get('layers', '')} | | {r['method']} | {r['error']} | | | | | | |")
            continue
        ratios = []
        for m in ("reference", "engine"):
            b = base[m].get((r["tokens"], r["layers"]))
            if r["method"].startswith("engine") and r["method"] != m and b:
                ratios += [f"{r['peak_bytes'] / b['peak_bytes']:.2f}", f"{r['cpu_s'] / b['cpu_s']:.2f}"]
            else:
                ratios += ["", ""]
        lines.append(f"| {r['tokens']} | {r['layers']} | {r.get('heads', '')} | {r['method']} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f} | {_gib(r['peak_bytes'])} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--reference-max", type=int, default=4096, help="largest size the reference runs at")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-chunk", type=int, nargs="*", default=[],
                    help="also run relevance(..., head_chunk=C) for each C (rows 'engine-hC')")
    ap.add_argument("--layer-sweep", action="store_true",
                    help="also run both methods with 4 and 16 layers at 2048 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "TOKENS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.threads)))
        return 0

    from explainprune.testing import tiny_qwen2_vl

    work = Path(tempfile.mkdtemp(prefix="relevance_scaling_"))
    side = 28 * int(math.isqrt(max(args.sizes))) + 28

    def checkpoint(layers: int) -> Path:
        path = work / f"qwen2_vl_{layers}"
        if not path.exists():
            tiny_qwen2_vl(path, layers=layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                          max_pixels=side * side * 2)
        return path

    plan = []
    for n in args.sizes:
        if n <= args.reference_max:
            plan.append(("reference", n, args.layers))
        plan.append(("engine", n, args.layers))
        plan += [(f"engine-h{c}", n, args.layers) for c in args.head_chunk]
    if args.layer_sweep:
        for layers in (4, 16):
            plan += [("reference", 2048, layers), ("engine", 2048, layers)]
    rows = []
    for method, n, layers in plan:
        t0 = time.perf_counter()
        r = measure(method, n, checkpoint(layers), args.threads, args.timeout)
        rows.append(r)
        note = r.get("error") or f"peak {_gib(r['peak_bytes'])} GiB, cpu {r['cpu_s']:.1f} s"
        print(f"# {method:10s} {n:6d} tokens {layers:2d} layers: {note} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
