"""The environment after `pip install explainprune[lmms-eval]`: lmms-eval pulls a torchvision built for a
CUDA torch, which breaks transformers' model classes; `make test` removes it. Runs with or without lmms-eval."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

CHECK = """
import explainprune
from transformers import (LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration)
import importlib.util
if importlib.util.find_spec("lmms_eval"):
    from lmms_eval.models import get_model
    assert get_model("explainprune").__name__ == "ExplainPrune"
    print("lmms_eval ok")
print("ok")
"""


def test_model_classes_import_in_a_fresh_interpreter():
    """A fresh interpreter (nothing imported yet, as a user's) imports explainprune, the model classes of the
    four families and, when installed, lmms-eval with the explainprune model registered."""
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
    if importlib.util.find_spec("lmms_eval"):
        assert "lmms_eval ok" in res.stdout


def test_no_broken_torchvision():
    """Where torchvision is installed, it must import (the CUDA-built one that lmms-eval pulls does not)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    res = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, "torchvision is installed but does not import; run `pip uninstall -y torchvision`"
