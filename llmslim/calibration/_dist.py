"""Data-parallel calibration over ``torch.distributed``: shard the batches, all-reduce the sums."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import CalibrationError
from ._stats import InputStats

__all__ = ["world", "shard", "all_reduce_", "global_sum"]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's share of the batches: every ``world_size``-th one, starting at ``rank``."""
    rank, size = world()
    mine = list(batches)[rank::size]
    if not mine:
        raise CalibrationError(f"rank {rank} of {size} gets no calibration batch ({len(batches)} batches for {size} ranks)")
    return mine


def global_sum(value: int) -> int:
    """``value`` summed over ranks (itself without ``torch.distributed``)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_(stats: dict[str, InputStats]) -> None:
    """Sum counts and sums, and take maxima, across ranks, so every rank solves the same problem."""
    if world()[1] == 1:
        return
    for name in sorted(stats):  # the same order on every rank
        s = stats[name]
        count = torch.tensor([s.n], dtype=torch.float64, device=_device(s))
        dist.all_reduce(count)
        s.n = int(count.item())
        for kind, tensor in s.tensors().items():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if kind == "absmax" else dist.ReduceOp.SUM)


def _device(s: InputStats) -> Any:
    tensors = list(s.tensors().values())
    return tensors[0].device if tensors else "cpu"
