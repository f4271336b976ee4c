"""VisionZip's scoring in the vision encoder: the attention each patch receives, computed in query blocks so
that its largest allocation grows linearly with the patches (the whole [heads, S, S] map grew with S²:
~68 GB at 5,776 merged tokens, ~460 GB at 15K)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from explainprune.pruning.visionzip import received_attention


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def full(q, k, scaling):
    logits = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scaling
    return torch.softmax(logits, -1).mean(0).mean(0)


def test_equals_the_whole_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(70, 4, 8, generator=g) * 3, torch.randn(70, 4, 8, generator=g) * 3  # peaked rows
    ref = full(q, k, 0.35)
    for block in (1, 4 * 4 * 70 * 3, 1 << 30):  # one row, three rows, everything at once
        torch.testing.assert_close(received_attention(q, k, 0.35, block_bytes=block), ref, atol=1e-6, rtol=1e-5)
    assert abs(float(ref.sum()) - 1.0) < 1e-5  # each softmax row sums to 1: the mean over keys sums to 1


def test_largest_allocation_grows_linearly():
    heads, d, budget = 4, 8, 4 * 4 * 64 * 16  # 16 query rows of 64 keys per block at S = 64
    sizes = {}
    for s in (64, 256):
        q, k = torch.randn(s, heads, d), torch.randn(s, heads, d)
        with LargestTensor() as meter:
            received_attention(q, k, 0.35, block_bytes=budget)
        sizes[s] = meter.largest
    assert sizes[256] <= 4 * sizes[64] + 4 * 256  # 4x the patches: at most ~4x the largest tensor (S² gives 16x)
    with LargestTensor() as meter:
        full(torch.randn(256, heads, d), torch.randn(256, heads, d), 0.35)
    assert meter.largest == heads * 256 * 256 > 3 * sizes[256]
