"""The per-sample records file of an evaluation (``OUT/records.jsonl`` under ``explainprune eval``).

Line 1 is a header: what is evaluated (model name and identity as loaded, task, samples, methods, ratios,
options); every further line one finished sample's records (or its media error), appended, flushed and
fsynced as the sample finishes. A rerun with the same header resumes from them; a torn last line (killed
while writing) is dropped; another header is refused, naming what differs, unless the caller overwrites.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from explainprune.errors import InputError

RECORDS_FORMAT = "explainprune-eval-records"


def _records_header(model_name: str, task_info: dict[str, Any], config: Any, n: int,
                    identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header line of ``config`` (an ``EvalConfig``) on ``n`` samples of ``task_info``, as read back."""
    conf = {k: v for k, v in config.to_json().items() if k not in ("progress", "warmup")}
    header = {"format": RECORDS_FORMAT, "version": 1, "model": model_name, "task": task_info, "samples": n,
              "config": conf, "identity": identity or {}}
    return json.loads(json.dumps(header, default=str))  # as read back (tuples become lists)


def _header_of(path: Path) -> dict[str, Any] | None:
    """The header line of a records file; None when there is none yet (empty, or torn while written)."""
    with path.open("rb") as fh:
        raw = fh.readline()
    if not raw.endswith(b"\n"):
        return None
    try:
        head = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        head = None
    if not isinstance(head, dict) or head.get("format") != RECORDS_FORMAT:
        raise InputError("line 1 is not the header of explainprune eval records", file=path,
                         hint="choose another --out, or pass --overwrite to replace it")
    return head


def check_records(path: Path, header: dict[str, Any], overwrite: bool = False) -> bool:
    """Whether ``path`` holds records of the evaluation ``header`` (to resume); False when it holds none or
    (``overwrite``) another evaluation's. Without ``overwrite`` another evaluation's records are refused with
    an InputError naming what differs (model, its weights or loading options, task, methods, ratios, ...)."""
    try:
        old = _header_of(path) if path.is_file() else None
    except InputError:
        if overwrite:  # not records at all: replaced too
            return False
        raise
    if old is None or old == header:
        return old is not None
    if overwrite:
        return False
    from explainprune.identity import differences

    raise InputError(f"holds the records of another evaluation (differs in {'; '.join(differences(old, header))})",
                     file=path.parent, hint="rerun the command that wrote it to resume it, choose another --out, "
                     "or pass --overwrite to replace it")


def _read_records(path: Path, header: dict[str, Any], overwrite: bool = False) -> dict[int, dict[str, Any]]:
    """Finished samples of an earlier run with the same header (index -> line); {} when none, or another run
    with ``overwrite`` (refused without). A torn last line (killed while writing) is dropped; the file is cut
    back to the good lines. A whole line that is no sample's record is refused, naming the line."""
    if not check_records(path, header, overwrite):
        return {}
    done: dict[int, dict[str, Any]] = {}
    good = 0
    with path.open("rb") as fh:
        for k, raw in enumerate(fh):
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if not raw.endswith(b"\n"):
                    break  # torn while written
                line = None
            if k > 0 and not raw.endswith(b"\n"):
                break
            if k > 0:
                sample = line.get("sample") if isinstance(line, dict) else None
                if isinstance(sample, bool) or not isinstance(sample, int) or not 0 <= sample < header["samples"] \
                        or not ("records" in line or "error" in line):
                    raise InputError(f"line {k + 1} is not a finished sample's record (no 'sample' number in "
                                     f"0..{header['samples'] - 1} with its 'records')", file=path,
                                     hint="the file was edited or damaged: delete that line (its sample is redone), "
                                     "or pass --overwrite to start over")
                done[sample] = line
            good += len(raw)
    with path.open("r+b") as fh:
        fh.truncate(good)
    return done


def _append(fh: Any, line: dict[str, Any]) -> None:
    try:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    except OSError as err:
        from explainprune.files import disk_full, is_disk_full

        if is_disk_full(err):  # the torn line is dropped by the resume
            raise disk_full(fh.name) from err
        raise
