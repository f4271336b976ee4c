"""The run record of a label folder (``OUT/run.json``): what is labelled (source, samples, options), for
which architecture (``fingerprint``) and by which model as loaded (``model``: ``explainprune.identity``).

``check_resumable`` decides, writing nothing, whether a folder may take a run: the same run resumes, a
revision of the same manifest or dataset keeps its unchanged shards (``shards.revisable``), anything else
is refused naming what differs (another model, weights, dtype, processor settings, options, source).
The CLI calls it before the model loads; ``labels.label`` records the run through ``_check_run``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from explainprune.errors import InputError
from explainprune.files import write_json_atomic
from explainprune.identity import differences
from explainprune.shards import revisable

FORMAT = "explainprune-labels"


def _run_record(source: Any, config: Any, fingerprint: dict[str, Any],
                identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a label run is: its source, options, the model's architecture (``fingerprint``) and the model
    as loaded (``identity``: weights, config, dtype, processor, attention; ``explainprune.identity``)."""
    return {"format": FORMAT, "version": 1, "source": source.describe(), "samples": len(source),
            "config": config.to_json(), "fingerprint": fingerprint, "model": identity or {}}


def _recorded_run(out: Path) -> dict[str, Any] | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=path, hint="choose another --out") from None
    if not isinstance(old, dict):
        raise InputError("is not a label run record", file=path, hint="choose another --out")
    return old


def check_resumable(out: str | Path, record: dict[str, Any]) -> bool | None:
    """Whether ``out`` may take the run ``record`` (nothing is written): None when it holds no run, False when
    it holds the same run, True when it holds a revision of the same manifest or dataset; InputError naming
    what differs otherwise (another source, options, model, weights, dtype, processor settings, ...)."""
    out = Path(out)
    old = _recorded_run(out)
    if old is None:
        return None
    if old == record:
        return False
    if not revisable(old, record):
        diff = differences(old, record)
        raise InputError(f"holds labels of a different run (differs in {'; '.join(diff)})", file=out,
                         hint="rerun the command that wrote it to resume it, or choose another --out")
    return True


def _check_run(out: Path, record: dict[str, Any]) -> bool:
    """Record the run in ``out/run.json``, or check it is the one recorded; True when the recorded one was a
    revision of the same manifest (its shards must then be checked sample by sample)."""
    state = check_resumable(out, record)
    if state is True:
        (out / "index.json").unlink(missing_ok=True)
    if state is not False:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "run.json", record)
    return bool(state)
