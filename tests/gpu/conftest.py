"""Shared set-up of the CUDA tests (tests/gpu, `make test-gpu`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    """float32 on the GPU as on CPU: no TF32 in matmuls or convolutions (f_θ is convolutional)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
