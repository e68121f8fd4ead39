"""The values the tracer attaches to graph nodes: channel sets along a dimension (:class:`Val`),
:data:`FIXED` tensors, :data:`CONST` non-tensors, sizes read off a tensor (:class:`Size`), and
the slices a channel occupies in a layer (:class:`Use`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

__all__ = ["FIXED", "CONST", "Use", "Val", "Size", "consts"]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FIXED = _Marker("FIXED")  # a tensor (or anything unknown) whose channels are not prunable
CONST = _Marker("CONST")  # a value known not to be a tensor: a number, a dtype


@dataclasses.dataclass(frozen=True)
class Use:
    """Logical rows (``dim=0``) or columns (``dim=1``) ``[(offset + c) * block, (offset + c + 1) * block)`` of ``module`` hold channel ``c``."""

    module: str
    dim: int
    offset: int
    block: int


@dataclasses.dataclass(frozen=True)
class Val:
    """Channel sets along one dimension of a tensor.

    Attributes:
        segs: ``(leaf, width)`` side by side along the channel dimension (several after a ``cat``).
        dim: The channel dimension, counted from the end.
        rank: The tensor's number of dimensions, when known.
        trail: Product of the sizes after the channel dimension, when known.
        block: Consecutive entries per channel along the channel dimension (more than one after
            a flatten merged later dimensions in; ``None``: known only from the reader's width).
    """

    segs: tuple[tuple[int, int], ...]
    dim: int
    rank: int | None
    trail: int | None
    block: int | None = 1

    @property
    def width(self) -> int:
        return sum(w for _, w in self.segs)

    @property
    def pos(self) -> int | None:
        return None if self.rank is None else self.rank + self.dim

    def leaves(self) -> tuple[int, ...]:
        return tuple(leaf for leaf, _ in self.segs)

    def offsets(self) -> list[tuple[int, int]]:
        out, at = [], 0
        for leaf, w in self.segs:
            out.append((leaf, at))
            at += w
        return out


@dataclasses.dataclass(frozen=True)
class Size:
    """``x.size(index)`` (``index=None``: the whole shape) of the tensor at graph node ``of``."""

    of: fx.Node
    index: int | None
    val: Val | None = None  # set for a whole shape of a channel tensor: reading it reads the channel count


def consts(info: Any) -> bool:
    """Whether ``info`` is a known non-tensor value (a number, or a size other than the channel count)."""
    return info is CONST or (isinstance(info, Size) and info.val is None)
