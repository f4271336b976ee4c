"""``center``: keeps the visual tokens nearest the centre of their image or video frame.

An example of a pruner living outside explainprune: a ``Pruner`` subclass with ``score(vlm, prompt)``
(higher = keep; explainprune's ``select`` keeps the top ``ceil(ratio * N_v)``), declared in this package's
``pyproject.toml`` under the entry-point group ``explainprune.pruners``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from explainprune.pruning import Pruner

__all__ = ["CenterPruner"]


@dataclass
class CenterPruner(Pruner):
    """Score = minus the squared distance of a token's (row, column) to its frame's centre, in units of the
    frame's half height / half width (so wide and tall grids are treated alike); off-grid tokens (row -1,
    e.g. LLaVA-OneVision's newline tokens) score lowest.

    ``aspect``: False measures rows and columns in token units instead (a circle, not an ellipse).
    """

    layer: ClassVar[int] = 0  # prunes before the LLM
    aspect: bool = True

    def score(self, vlm, prompt) -> Tensor:
        grid = prompt.visual_grid  # [N_v, 3]: frame, row, column
        scores = torch.full((prompt.num_visual,), float("-inf"))
        on = grid[:, 1] >= 0
        for f in torch.unique(grid[on, 0]).tolist():
            idx = torch.nonzero(on & (grid[:, 0] == f)).flatten()
            rows, cols = grid[idx, 1].double(), grid[idx, 2].double()
            r0, c0 = (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2
            hr, hc = ((rows.max() - rows.min()) / 2).clamp(min=0.5), ((cols.max() - cols.min()) / 2).clamp(min=0.5)
            if not self.aspect:
                hr = hc = torch.tensor(1.0, dtype=torch.float64)
            scores[idx] = (-(((rows - r0) / hr) ** 2 + ((cols - c0) / hc) ** 2)).float()
        return scores

    def overhead_flops(self, d: int, n_visual: int, tokens_per_layer: list[int]) -> int:
        """A handful of operations per token (distance and top-k); counted, as the protocol asks."""
        return 8 * n_visual
