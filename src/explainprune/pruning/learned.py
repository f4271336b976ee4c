"""The learned pruner (Section 3.3, Fig. 1 second row): A_v^0 -> f_θ -> select -> generate.

Before the LLM runs, only layer 0's instruction->visual attention is computed (``first_layer_attention``);
the compressor turns it into R̃_v (Eq. 2) and the shared ``select`` keeps the top tokens. Prefill and
decode are the unchanged model on the shorter sequence. f_θ is fully convolutional, so inputs longer than
any seen in training work (Section 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from explainprune.compressor import Compressor
from explainprune.compressor_path import compressor_dir
from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register


@register("learned")
@dataclass
class Learned(Pruner):
    """Keeps the visual tokens f_θ ranks highest. ``compressor``: a Compressor or a directory
    written by ``Compressor.save_pretrained`` / ``explainprune train`` (``OUT/compressor``)."""

    compressor: Compressor | str | Path | None = None

    def __post_init__(self) -> None:
        if self.compressor is None:
            raise ValueError("the learned pruner needs compressor=<Compressor or directory> "
                             "(train one with `explainprune label` then `explainprune train`)")
        if isinstance(self.compressor, (str, Path)):
            self.compressor = Compressor.from_pretrained(compressor_dir(self.compressor))  # a run folder too
        if not isinstance(self.compressor, Compressor):
            raise ValueError(f"compressor must be a Compressor or a directory; got {type(self.compressor).__name__}")
        self.compressor.eval()
        self._checked: int | None = None

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        """R̃_v = f_θ(A_v^0) (Eq. 2): Tensor[N_v] of probabilities (on CPU).

        A_v^0 stays on the device layer 0 runs on, and f_θ runs there too: the compressor is moved to
        that device on first use (``self.compressor`` is moved in place).
        """
        import torch

        from explainprune.attention import first_layer_attention

        if self._checked != id(vlm):
            self.compressor.check_compatible(vlm)
            self._checked = id(vlm)
        with torch.no_grad():
            a = first_layer_attention(vlm, prompt, keep_device=True)  # [H, N_v] on layer 0's device
            if next(self.compressor.parameters()).device != a.device:
                self.compressor.to(a.device)
            return self.compressor(a).float().cpu()
