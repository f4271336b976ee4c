"""torchrun helpers of ``explainprune label``: this process's rank and world size, the device its model belongs
on, joining the process group (NCCL on CUDA, gloo otherwise) and barriers with a long timeout."""

from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any

import torch

DIST_TIMEOUT = timedelta(hours=12)  # barrier wait under torchrun; env EXPLAINPRUNE_DIST_TIMEOUT_HOURS overrides


def dist_info() -> tuple[int, int]:
    """(rank, world size) from the torchrun / accelerate environment (0, 1 when absent)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}")
    return rank, world


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(requested: str | torch.device | None = None) -> str | torch.device | None:
    """The device for this rank's model: under torchrun (WORLD_SIZE > 1) with CUDA available, ``None`` or
    ``"cuda"`` (no index) becomes ``cuda:LOCAL_RANK``; anything else (an explicit index, cpu) is kept."""
    _, world = dist_info()
    if world <= 1 or not torch.cuda.is_available():
        return requested
    if requested is None or torch.device(requested) == torch.device("cuda"):
        return torch.device("cuda", local_rank())
    return requested


def dist_timeout() -> timedelta:
    hours = os.environ.get("EXPLAINPRUNE_DIST_TIMEOUT_HOURS")
    if hours is None:
        return DIST_TIMEOUT
    try:
        value = float(hours)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"EXPLAINPRUNE_DIST_TIMEOUT_HOURS must be a positive number of hours; got {hours!r}")
    return timedelta(hours=value)


def init_dist(world: int, device: Any = None, timeout: timedelta = DIST_TIMEOUT) -> bool:
    """Join the torchrun process group when launched with several ranks; True if this created it.

    NCCL (rank r bound to ``cuda:LOCAL_RANK``) when the model is on CUDA, gloo otherwise; ``timeout``
    bounds every barrier.
    """
    if world <= 1 or "MASTER_ADDR" not in os.environ or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    if device is not None and torch.device(device).type == "cuda":
        local = local_rank()
        if torch.device(device).index not in (None, local):
            warnings.warn(f"rank {os.environ.get('RANK')}'s model is on {device} but LOCAL_RANK is {local}: "
                          "under torchrun each rank's model belongs on cuda:LOCAL_RANK "
                          "(explainprune.dist.rank_device)", stacklevel=3)
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
    else:
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return True


def barrier() -> None:
    """A barrier of the default group (on this rank's GPU under NCCL)."""
    if torch.distributed.get_backend() == "nccl":
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()
