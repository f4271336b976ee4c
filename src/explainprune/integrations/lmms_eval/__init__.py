"""lmms-eval plug-in: ``python -m lmms_eval --model explainprune --model_args pretrained=...,method=...,ratio=...``.

lmms-eval (0.6+) finds the model through the ``lmms_eval.models`` entry point of this package, which names
``manifest`` below (a ``ModelManifest``). The parts:
  engine.py      request handling without lmms-eval: visuals -> Prompt, generation kwargs, ragged batches,
                 per-sample efficiency records (importable and testable without lmms-eval)
  efficiency.py  the per-run efficiency summary written next to lmms-eval's results
  model.py       ``ExplainPrune``, the ``lmms`` subclass lmms-eval instantiates (imports lmms_eval)
  task.py        the digits benchmark as lmms-eval tasks (``explainprune lmms-task --out DIR``)
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "explainprune"
MODEL_CLASS = "explainprune.integrations.lmms_eval.model.ExplainPrune"


def manifest() -> Any:
    """The lmms-eval ``ModelManifest`` registering ``--model explainprune`` (entry point ``lmms_eval.models``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
