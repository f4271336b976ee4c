"""Peak memory of the device-hungry steps at the Qwen2-VL-7B shape, by arithmetic from the shapes (checked
against measurements at small sizes: tests/test_visionzip_memory.py, tests/test_memory.py and the 13.1 B per
head·n² that docs/relevance.md measured), at ~1.3K / 5.8K / 15K visual tokens.

    python benchmarks/memory_peaks.py [--device-gib 80]

Rows: the vision tower's attention maps under eager (what ``--attn-implementation eager`` gave the vision
tower before it was kept on sdpa) and under sdpa; VisionZip's received-attention scoring before (the whole
float32 [heads, S, S] map and its softmax) and now (query blocks of ``BLOCK_BYTES``); relevance's peak with
all heads at once and with the head chunk ``auto_head_chunk`` picks for the free memory given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from explainprune.memory import BYTES_PER_HEAD, FLOOR_BYTES, auto_head_chunk
from explainprune.pruning.visionzip import BLOCK_BYTES

CONFIG = Path(__file__).resolve().parent / "configs" / "qwen2_vl_7b.json"
GIB = 2**30


def peaks(tokens: int, device_bytes: float, prompt_text: int = 60, answer: int = 4) -> dict[str, float]:
    c = json.loads(CONFIG.read_text())
    v = c["vision_config"]
    merge = v["spatial_merge_size"] ** 2
    s = tokens * merge                       # patches in the vision tower (one image)
    hv = v["num_heads"]
    n = tokens + prompt_text + answer        # text decoder tokens (prompt + answer)
    h = c["num_attention_heads"]
    chunk = auto_head_chunk(n, h, torch.bfloat16, device_bytes)
    rel_chunked = (BYTES_PER_HEAD * (chunk or h) + (FLOOR_BYTES if chunk else 0)) * n * n
    return {
        "tokens": tokens, "patches": s, "text_tokens": n,
        "vision_eager": 2 * hv * s * s * 2,            # bf16 weights + softmax output of one block
        "vision_sdpa": 2 * s * v["embed_dim"] * 2 * 4,  # O(S d): q, k, v, out in bf16 (flash / efficient kernel)
        "visionzip_before": 2 * hv * s * s * 4,        # float32 logits + softmax of the whole map
        "visionzip_now": min(2 * BLOCK_BYTES, 2 * hv * s * s * 4) + 8 * s,
        "relevance_all_heads": BYTES_PER_HEAD * h * n * n,
        "relevance_chunk": chunk or h, "relevance_auto": rel_chunked,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device-gib", type=float, default=80.0, help="free device memory for the head chunk (80)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1296, 5776, 14884])
    args = p.parse_args()
    rows = [peaks(t, args.device_gib * GIB) for t in args.tokens]
    print("| visual tokens (patches) | vision tower eager / sdpa | VisionZip scoring before / now | "
          f"relevance all heads / auto chunk ({args.device_gib:g} GiB free) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:,} ({r['patches']:,}) | {r['vision_eager'] / GIB:,.1f} GiB / "
              f"{r['vision_sdpa'] / GIB:.2f} GiB | "
              f"{r['visionzip_before'] / GIB:,.1f} GiB / {r['visionzip_now'] / GIB:.2f} GiB | "
              f"{r['relevance_all_heads'] / GIB:,.1f} GiB / {r['relevance_auto'] / GIB:,.1f} GiB "
              f"(head_chunk {r['relevance_chunk']}) |")


if __name__ == "__main__":
    main()
