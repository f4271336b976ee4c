"""Memory and time of building a ``ConversationSource`` over an Infinity-MM-style parquet (images embedded).

    python benchmarks/dataset_reading.py --rows 20000 --image-kb 20 --dir /tmp/dsbench

writes ``rows`` LLaVA-format rows with a ~``image-kb`` KB PNG each (random pixels, so PNG cannot shrink them)
into one parquet file, twice: ``plain.parquet`` (images as ``{"bytes", "path"}`` structs, as pyarrow writes
them) and ``hf.parquet`` (the same with the ``datasets`` ``Image`` feature in its metadata, as
``push_to_hub`` writes it: the ``datasets`` library decodes such columns into PIL images). Then, in a fresh
process per file, it builds the source with ``--target`` samples, reads them all (``source[i]``), and prints
the wall time of each step and the process's peak RSS (``resource.getrusage``). Run it with another
``PYTHONPATH`` to compare another version of ``explainprune``. Results: docs/datasets.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _png(seed: int, kb: int) -> bytes:
    import numpy as np
    from PIL import Image

    side = int((kb * 1024 / 3) ** 0.5)  # random RGB pixels: PNG size ~ 3 bytes per pixel
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _conversation(k: int) -> list[dict[str, str]]:
    question = f"<image>\nWhat is in picture {k}?" + ("\nA. a\nB. b" if k % 2 else "")
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "A" if k % 2 else "something"}]


def write(folder: Path, rows: int, kb: int) -> None:
    """``plain.parquet`` and ``hf.parquet`` (see the module docstring), 1000 rows per row group, every image
    distinct (parquet would store repeated ones once)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": datasets.List({"from": datasets.Value("string"),
                                                                  "value": datasets.Value("string")})})
    folder.mkdir(parents=True, exist_ok=True)
    plain = hf = None
    for start in range(0, rows, 1000):
        ks = range(start, min(rows, start + 1000))
        table = pa.table({"id": [f"r{k}" for k in ks], "image": [{"bytes": _png(k, kb), "path": None} for k in ks],
                          "conversations": [_conversation(k) for k in ks]})
        typed = table.cast(features.arrow_schema)
        plain = plain or pq.ParquetWriter(folder / "plain.parquet", table.schema)
        hf = hf or pq.ParquetWriter(folder / "hf.parquet", typed.schema)
        plain.write_table(table)
        hf.write_table(typed)
    plain.close()
    hf.close()


def measure(path: str, target: int) -> dict[str, float]:
    """Build the source over ``path`` (``target`` samples balanced over task type) and read every sample."""
    from explainprune.conversations import ConversationSource, DatasetConfig

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    source = ConversationSource(DatasetConfig(path, target=target, strata=("task",)))
    built = time.perf_counter() - t0
    peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    for i in range(len(source)):
        source[i]
    return {"rss_before_mb": round(before), "build_s": round(built, 2), "peak_after_build_mb": round(peak_build),
            "read_samples_s": round(time.perf_counter() - t0, 2),
            "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "samples": len(source)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--image-kb", type=int, default=20)
    ap.add_argument("--target", type=int, default=100)
    ap.add_argument("--dir", default="/tmp/explainprune-dsbench")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.target)))
        return
    folder = Path(args.dir)
    if not (folder / "hf.parquet").is_file():
        write(folder, args.rows, args.image_kb)
    for name in ("plain.parquet", "hf.parquet"):
        size = (folder / name).stat().st_size / 2**20
        with tempfile.TemporaryDirectory() as cache:  # where ``datasets`` would convert the file to arrow
            env = {**os.environ, "HF_DATASETS_CACHE": cache}
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder / name), "--target",
                                  str(args.target)], capture_output=True, text=True, check=True, env=env).stdout
        print(f"{name} ({size:.0f} MB): {out.strip()}")


if __name__ == "__main__":
    main()
