"""Training-free reference pruners: vanilla (keep all), random (seeded) and uniform (evenly spread)."""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from explainprune.models.base import VLM, Prompt
from explainprune.pruning.base import Pruner, register, select


@register("vanilla")
@dataclass
class Vanilla(Pruner):
    """Keeps every visual token whatever the ratio: the unpruned model."""

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        return torch.ones(prompt.num_visual)

    def keep(self, vlm: VLM, prompt: Prompt, ratio: float) -> Tensor:
        select(torch.ones(max(prompt.num_visual, 1)), ratio)  # validates the ratio
        return torch.arange(prompt.num_visual)

    def tokens_per_layer(self, n_visual: int, ratio: float, num_layers: int) -> list[int]:
        return [n_visual] * num_layers


@register("random")
@dataclass
class Random(Pruner):
    """Uniformly random scores, seeded by ``seed`` and the sample's identity (same sample, same choice).

    The identity is the token ids, N_v and the raw media (the PIL pixels the prompt was prepared from),
    never the features: the draw is the same on every device and dtype (fp32 and bf16 keep the same
    tokens), and two images asked the same question still get different draws. A prompt built without
    media is identified by its token ids and N_v alone.
    """

    seed: int = 0

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        digest = zlib.crc32(prompt.input_ids.cpu().numpy().astype("int64").tobytes())
        digest = zlib.crc32(str(prompt.num_visual).encode(), digest)
        for item in _media_items(prompt.media):
            digest = zlib.crc32(item, digest)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + digest) % (2**63))
        return torch.rand(prompt.num_visual, generator=gen)


def _media_items(media: list) -> list[bytes]:
    """Raw bytes of every image / frame in a prompt's media (nested lists for videos), in order."""
    import numpy as np

    out: list[bytes] = []
    for m in media:
        if isinstance(m, (list, tuple)):
            out += _media_items(list(m))
        elif hasattr(m, "tobytes") and hasattr(m, "size") and hasattr(m, "mode"):  # PIL
            out.append(f"{m.mode}{m.size}".encode() + m.tobytes())
        else:
            out.append(np.ascontiguousarray(np.asarray(m)).tobytes())
    return out


def spread_order(rows: Tensor, cols: Tensor) -> Tensor:
    """Rank of each grid point in farthest-point order (from the centre): any prefix is evenly spread.

    rows, cols: LongTensor[n] -> LongTensor[n] (0 = first picked). The order depends only on the points, so
    it is computed once per grid layout and reused (a video's frames, every prompt of one resolution).
    """
    key = torch.stack([rows, cols], 1).to("cpu", torch.int64).contiguous().numpy().tobytes()
    return _spread_order(key).clone()


@functools.lru_cache(maxsize=64)
def _spread_order(key: bytes) -> Tensor:
    pts = torch.frombuffer(bytearray(key), dtype=torch.int64).view(-1, 2).float()
    n = len(pts)
    rank = torch.empty(n, dtype=torch.long)
    centre = pts.mean(0)
    dist = ((pts - centre) ** 2).sum(1)
    current = int(torch.argmin(dist))
    best = torch.full((n,), float("inf"))
    for r in range(n):
        rank[current] = r
        best = torch.minimum(best, ((pts - pts[current]) ** 2).sum(1))
        best[current] = -1.0
        current = int(torch.argmax(best))
    return rank


@register("uniform")
@dataclass
class Uniform(Pruner):
    """Evenly spread over each frame's token grid; frames share the budget in proportion to their size."""

    def score(self, vlm: VLM, prompt: Prompt) -> Tensor:
        grid = prompt.visual_grid
        scores = torch.zeros(prompt.num_visual)
        for f in torch.unique(grid[:, 0]).tolist():
            idx = torch.nonzero(grid[:, 0] == f).flatten()
            rank = spread_order(grid[idx, 1].clamp(min=0), grid[idx, 2].clamp(min=0))
            # normalised rank so frames of any size interleave; the frame index breaks ties
            scores[idx] = -(rank.float() + 0.5) / len(idx) - f * 1e-6
        return scores
