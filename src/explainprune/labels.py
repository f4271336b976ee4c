"""Label datasets for f_θ: per correctly answered sample, A_v^0 [H, N_v], R_v [N_v] and metadata.

Section 3.3 / Appendix B: the model answers each sample; wrong answers are counted and skipped, and for
the rest the relevance R_v (Eq. 1) and the first-layer attention A_v^0 are stored.

Layout of ``out/`` (readable with pyarrow / pandas / ``datasets``):
  run.json                 what is being labelled (source, model fingerprint and identity, labeler options)
  shards/NNNNN.parquet     samples [N*shard_size, (N+1)*shard_size) of the source; list columns for
                           variable N_v; the shard's skipped ids in its schema metadata
  index.json               written when every shard exists: shards, counts, run record

Resumable and parallel by construction: a shard is written atomically (temp file + rename) and depends
only on the source, the model and the shard number. A rerun skips the shards that exist; under torchrun
(RANK / WORLD_SIZE) rank r takes shards r, r+K, r+2K, ... so K ranks write exactly the files one process
would. Killing at any moment loses at most the shard in progress, which the rerun redoes. On GPUs each
rank's model belongs on ``cuda:LOCAL_RANK`` (``rank_device``); the process group is then NCCL (gloo on
CPU), and its barriers wait ``dist_timeout`` (default 12 hours: ranks finish their shares at different
times of an hours-long run).

The sample sources (``LabelSample``, ``DigitsSource``, ``ManifestSource``) are in ``explainprune.sources``,
the shard files (schema, page checksums, SHA-256 checks) in ``explainprune.shards``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from explainprune.answers import display, normalize_answers
from explainprune.answers import is_correct as answers_match  # noqa: F401 (old import path)
from explainprune.dist import DIST_TIMEOUT, barrier, dist_info, init_dist, local_rank, rank_device  # noqa: F401
from explainprune.dist import dist_timeout as env_dist_timeout
from explainprune.errors import InputError
from explainprune.files import write_json_atomic
from explainprune.identity import vlm_identity
from explainprune.label_run import FORMAT, _check_run, _run_record, check_resumable  # noqa: F401
from explainprune.prefetch import prepared
from explainprune.shards import (  # noqa: F401  (SCHEMA, write_shard, index_digest: also imported from here)
    SCHEMA,
    check_index,
    file_sha256,
    index_digest,
    media_stamp,
    revisable,
    samples_digest,
    shard_done,
    shard_meta,
    shard_path,
    verify_index,
    write_shard,
)

# DigitsSource, ManifestSource, read_video live in explainprune.sources; re-exported here for old imports
from explainprune.sources import DigitsSource, LabelSample, ManifestSource, SampleSource, read_video  # noqa: F401


@dataclass
class LabelOutput:
    """What a labeler returns for one sample: the model's answer, and A_v^0 / R_v when it is correct."""

    answer: str
    answer_ids: list[int]
    correct: bool
    attention: Tensor | None = None  # [H, N_v]
    relevance: Tensor | None = None  # [N_v]
    rule: str = "exact"  # the answer matcher that judged it (explainprune.matchers)


Labeler = Callable[[Any, Any, LabelSample], LabelOutput]  # (vlm, prompt, sample) -> LabelOutput


@dataclass(frozen=True)
class LabelConfig:
    """Options of a labelling run. ``shard_size`` samples per file (the unit of resumption)."""

    shard_size: int = 64
    rule: str = "grad"
    clamp: bool = True
    max_new_tokens: int = 8
    keep_wrong: bool = False  # also store wrongly answered samples (R_v of the model's own answer)
    head_chunk: int | None = None  # R_v computed this many heads at a time (less memory; same numbers)
    match: str = "exact"  # answer matcher for samples whose source names none (explainprune.matchers)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["head_chunk"] is None:  # runs recorded before the option existed stay resumable
            del out["head_chunk"]
        if out["match"] == "exact":
            del out["match"]
        return out


@dataclass
class LabelReport:
    """Outcome of one (rank's) labelling run; ``labeled`` / ``skipped_wrong`` count this run's shards."""

    out: str
    samples: int
    labeled: int
    skipped_wrong: int
    shards_written: int
    shards_reused: int
    seconds: float
    complete: bool
    rank: int = 0
    world_size: int = 1
    totals: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # samples skipped (--on-error skip), whole run

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- labelling one sample --------------------------------------------------------------------------------
def default_labeler(rule: str = "grad", clamp: bool = True, max_new_tokens: int = 8,
                    keep_wrong: bool = False, head_chunk: int | None = None, match: str = "exact") -> Labeler:
    """Greedy answer; if it matches the reference (or ``keep_wrong``), R_v (Eq. 1, for the answer tokens)
    and A_v^0. ``head_chunk``: passed to ``relevance`` (attention maps built that many heads at a time).
    The answer is judged by the sample's own matcher (``sample.meta["match"]``, set by dataset sources and
    manifest lines), else by ``match`` (``explainprune.matchers``)."""
    from explainprune.attention import first_layer_attention
    from explainprune.matchers import judge
    from explainprune.relevance import relevance

    def labeler(vlm: Any, prompt: Any, sample: LabelSample) -> LabelOutput:
        gen = vlm.generate(prompt, max_new_tokens=max_new_tokens)
        ids = [t for t in gen.token_ids if t not in vlm.eos_token_ids]
        verdict = judge(gen.text, normalize_answers(sample.answer), rule=sample.meta.get("match", match),
                        question=sample.question)
        correct = bool(ids) and verdict.correct
        if not ids or not (correct or keep_wrong):
            return LabelOutput(gen.text, ids, False, rule=verdict.rule)
        rel = relevance(vlm, prompt, answer=ids, rule=rule, clamp=clamp, head_chunk=head_chunk)
        att = first_layer_attention(vlm, prompt)
        return LabelOutput(gen.text, ids, correct, att.detach().float().cpu(), rel.scores.detach().float().cpu(),
                           rule=verdict.rule)

    return labeler


def region_indices(region: Sequence[Sequence[int]] | None, visual_grid: Tensor) -> list[int] | None:
    """Visual-token indices whose (frame, row, col) in ``visual_grid`` [N_v, 3] is a ``region`` cell."""
    if region is None:
        return None
    cells = {tuple(int(v) for v in cell) for cell in region}
    return [i for i, cell in enumerate(visual_grid.tolist()) if tuple(cell) in cells]


# -- storage (shard files: explainprune.shards) ------------------------------------------------------------
ON_ERROR = ("stop", "skip")


def read_table(out: str | Path) -> pa.Table:
    """All labelled rows, in source order (requires a complete dataset: ``index.json``)."""
    index = read_index(out)
    verify_index(out, index)
    tables = [pq.read_table(Path(out) / s["file"]) for s in index["shards"]]
    if not tables:
        return SCHEMA.empty_table()
    # promote: shards written before the references column existed read with it null
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)


def read_index(out: str | Path) -> dict[str, Any]:
    path = Path(out) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no complete label set at {out} (index.json missing: rerun `explainprune "
                                "label` with the same arguments to finish it)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=path, hint="delete it and rerun `explainprune label` "
                         "with the same arguments to rebuild it") from None
    check_index(out, index)
    return index


def _old_index(out: Path) -> dict[str, Any] | None:
    """index.json of an earlier run in ``out`` for the resume's SHA-256 checks (None if absent or unusable:
    it is rebuilt at the end)."""
    try:
        return read_index(out)
    except (OSError, InputError):
        return None


@dataclass
class LabelRecord:
    """One stored sample, as tensors: attention [H, N_v], relevance [N_v], region (indices) or None."""

    id: str
    kind: str
    attention: Tensor
    relevance: Tensor
    visual_grid: Tensor
    region: list[int] | None


def _flat(column: pa.ChunkedArray, depth: int) -> Any:
    """Values of a (nested) list column as one numpy array (no Python lists: fast for large sets)."""
    arr = column.combine_chunks()
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).copy()


def load_records(out: str | Path) -> list[LabelRecord]:
    """Every stored sample as tensors, in source order."""
    import numpy as np

    t = read_table(out)
    heads, nv = t.column("num_heads").to_numpy(), t.column("num_visual").to_numpy()
    att = torch.from_numpy(np.ascontiguousarray(_flat(t.column("attention"), 2), dtype=np.float32))
    rel = torch.from_numpy(np.ascontiguousarray(_flat(t.column("relevance"), 1), dtype=np.float32))
    grid = torch.from_numpy(np.ascontiguousarray(_flat(t.column("visual_grid"), 2), dtype=np.int64))
    att_parts = att.split((heads * nv).tolist())
    rel_parts, grid_parts = rel.split(nv.tolist()), grid.split((3 * nv).tolist())
    ids, kinds, regions = (t.column(c).to_pylist() for c in ("id", "kind", "region"))
    return [LabelRecord(ids[i], kinds[i], att_parts[i].reshape(int(heads[i]), int(nv[i])), rel_parts[i],
                        grid_parts[i].reshape(-1, 3), regions[i]) for i in range(t.num_rows)]


# -- the run ---------------------------------------------------------------------------------------------
def _row(index: int, sample: LabelSample, prompt: Any, res: LabelOutput, task: str, model: str) -> dict:
    att, rel = res.attention, res.relevance
    answers = normalize_answers(sample.answer, f"sample {sample.id}: answer")
    n = int(prompt.num_visual)
    if att is None or rel is None or tuple(att.shape)[-1] != n or tuple(rel.shape) != (n,):
        shapes = [None if t is None else tuple(t.shape) for t in (att, rel)]
        raise ValueError(f"sample {sample.id}: the labeler returned attention {shapes[0]} and relevance "
                         f"{shapes[1]} for {n} visual tokens")
    return {"id": sample.id, "index": index, "task": task, "kind": str(sample.meta.get("kind", "")),
            "question": sample.question, "reference": display(answers), "references": list(answers),
            "answer": res.answer, "correct": res.correct,
            "answer_ids": [int(t) for t in res.answer_ids], "num_heads": int(att.shape[0]), "num_visual": n,
            "grid_shape": list(prompt.grid_shape), "visual_grid": prompt.visual_grid.tolist(),
            "attention": att.float().tolist(), "relevance": rel.float().tolist(),
            "region": region_indices(sample.region, prompt.visual_grid), "model": model,
            "meta": json.dumps(sample.meta, sort_keys=True, default=str)}


def finalize(out: str | Path) -> dict[str, Any] | None:
    """Write ``index.json`` if every shard exists; returns the index (None while shards are missing)."""
    out = Path(out)
    record = json.loads((out / "run.json").read_text())
    n_shards = -(-record["samples"] // record["config"]["shard_size"])
    paths = [shard_path(out, s) for s in range(n_shards)]
    if not all(p.is_file() for p in paths):
        return None
    shards, labeled, skipped, wrong, errors = [], 0, 0, 0, []
    by_rule: dict[str, dict[str, int]] = {}
    for p in paths:
        m = shard_meta(p)
        shards.append({"file": str(p.relative_to(out)), "rows": m["labeled"], "skipped": len(m["skipped"]),
                       "start": m["start"], "stop": m["stop"], "sha256": file_sha256(p)})
        labeled, skipped, wrong = labeled + m["labeled"], skipped + len(m["skipped"]), wrong + m["wrong"]
        errors += m.get("errors", [])
        for name, c in m.get("by_rule", {}).items():  # shards written before matchers existed have none
            agg = by_rule.setdefault(name, {"judged": 0, "correct": 0})
            agg["judged"], agg["correct"] = agg["judged"] + c["judged"], agg["correct"] + c["correct"]
    counts: dict[str, Any] = {"samples": record["samples"], "labeled": labeled, "skipped_wrong": skipped,
                              "wrong": wrong, "skipped_error": len(errors)}
    if by_rule:
        counts["by_rule"] = dict(sorted(by_rule.items()))
    index = {**record, "shards": shards, "errors": errors, "counts": counts}
    write_json_atomic(out / "index.json", index)
    return index


def label(vlm: Any, source: SampleSource, out: str | Path, config: LabelConfig = LabelConfig(),
          labeler: Labeler | None = None, progress: bool = True,
          dist_timeout: timedelta | None = None, on_error: str = "stop", prefetch: int = 2,
          identity: dict[str, Any] | None = None) -> LabelReport:
    """Label ``source`` with ``vlm`` into ``out`` (resumable; this rank's share under torchrun).

    ``labeler(vlm, prompt, sample) -> LabelOutput`` defaults to ``default_labeler`` (greedy answer,
    Eq. 1 relevance, first-layer attention). Returns this rank's report; rank 0's carries the totals.
    Under torchrun the process group (NCCL when ``vlm`` is on CUDA, else gloo) waits ``dist_timeout`` at
    its barriers (default ``DIST_TIMEOUT``, or ``EXPLAINPRUNE_DIST_TIMEOUT_HOURS``).
    A sample whose media cannot be read (``InputError`` from the source) stops the run (``on_error="stop"``:
    finished shards are kept) or is skipped and listed in its shard, ``index.json`` and the report ("skip").
    ``prefetch``: samples read and prepared (media decoding, resizing, vision tower) this many ahead in a
    background thread while the model labels the current one (0: in line); errors surface at their turn.
    ``identity``: the model as loaded (``explainprune.identity``; default ``vlm_identity(vlm)``), recorded in
    ``out/run.json``: a resume with other weights, dtype, processor settings or attention is refused.
    """
    from tqdm.auto import tqdm

    if config.shard_size < 1:
        raise ValueError(f"shard_size must be >= 1; got {config.shard_size}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    out = Path(out)
    rank, world = dist_info()
    created = init_dist(world, getattr(vlm, "device", None), dist_timeout or env_dist_timeout())
    group = created or (world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized())
    fingerprint = vlm.fingerprint()
    record = _run_record(source, config, fingerprint, identity if identity is not None else vlm_identity(vlm))
    revised = _check_run(out, record)
    source_id = hashlib.sha256(json.dumps(record["source"], sort_keys=True).encode()).hexdigest()[:16]
    old_index = _old_index(out)
    if labeler is None:
        labeler = default_labeler(config.rule, config.clamp, config.max_new_tokens, config.keep_wrong,
                                  config.head_chunk, config.match)
    task = str(source.describe().get("task", "custom"))
    model = json.dumps(fingerprint, sort_keys=True)
    n, size = len(source), config.shard_size
    mine = list(range(rank, -(-n // size), world))
    todo = [s for s in mine if not shard_done(shard_path(out, s), source, s * size, min(n, (s + 1) * size),
                                               revised, old_index, source_id)]
    stamps = {s: media_stamp(source, s * size, min(n, (s + 1) * size)) for s in todo}  # before any media is read
    total_mine = sum(min(n, (s + 1) * size) - s * size for s in todo)
    started, labeled, skipped = time.perf_counter(), 0, 0
    bar = tqdm(total=total_mine, unit="sample", disable=not progress or rank != 0,
               desc=f"label {out.name}" + (f" (rank 0 of {world})" if world > 1 else ""))
    # on an accelerator the loader's vision tower and the labeler's relevance never hold device memory at once
    busy = threading.Lock() if prefetch and getattr(vlm, "device", torch.device("cpu")).type != "cpu" else None
    ahead = prepared(vlm, source, [i for s in todo for i in range(s * size, min(n, (s + 1) * size))], prefetch,
                     device_lock=busy)
    try:
        for s in todo:
            for stale in shard_path(out, s).parent.glob(f".{shard_path(out, s).name}.tmp-*"):
                stale.unlink(missing_ok=True)  # a temp file left by a killed run (this shard is ours)
            rows, wrong, n_wrong, errors, by_rule = [], [], 0, [], {}
            start, stop = s * size, min(n, (s + 1) * size)
            for i in range(start, stop):
                try:
                    sample, prompt = next(ahead).result()  # source[i] and its Prompt, loaded ahead
                except InputError as err:
                    if on_error == "stop":
                        raise
                    errors.append({"index": i, "line": err.line, "id": err.sample, "error": err.message})
                    bar.update(1)
                    continue
                with busy or contextlib.nullcontext():
                    res = labeler(vlm, prompt, sample)
                if res.correct or (config.keep_wrong and res.attention is not None):
                    rows.append(_row(i, sample, prompt, res, task, model))
                else:
                    wrong.append(sample.id)
                n_wrong += not res.correct
                judged = by_rule.setdefault(res.rule, {"judged": 0, "correct": 0})
                judged["judged"], judged["correct"] = judged["judged"] + 1, judged["correct"] + bool(res.correct)
                bar.update(1)
                bar.set_postfix(skipped=skipped + len(wrong), refresh=False)
            write_shard(shard_path(out, s), rows, {"shard": s, "start": start, "stop": stop, "labeled": len(rows),
                                                   "skipped": wrong, "wrong": n_wrong, "errors": errors,
                                                   "by_rule": by_rule,
                                                   "digest": samples_digest(source, start, stop),
                                                   "media_stamp": stamps[s],
                                                   "source": source_id})
            labeled, skipped = labeled + len(rows), skipped + len(wrong)
    finally:
        ahead.close()  # stops the loader thread, also when labelling fails
    bar.close()
    if group:
        barrier()
    index = finalize(out) if (rank == 0 or not group) else None
    if group:
        barrier()
    if created:
        torch.distributed.destroy_process_group()
    return LabelReport(str(out), n, labeled, skipped, len(todo), len(mine) - len(todo),
                       round(time.perf_counter() - started, 3), (out / "index.json").is_file(), rank, world,
                       dict(index["counts"]) if index else {},
                       index["errors"] if index else [e for s in mine for e in _errors_of(shard_path(out, s))])


def _errors_of(path: Path) -> list[dict[str, Any]]:
    return shard_meta(path).get("errors", []) if path.is_file() else []
