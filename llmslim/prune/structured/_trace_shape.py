"""The tracer's shape-changing operations: pooling, flatten, reductions, concatenation, sizes, reshapes.

Mixed into :class:`~._trace_graph.Walker`; each method takes the graph node and its inputs' infos
and returns the output's info, or records why the node blocks the channels it touches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import fx

from ._trace_values import FIXED, Size, Val

__all__ = ["Shaping"]


class Shaping:
    """Shape-changing operations of the walk (needs ``_info``, ``_block``, ``_union`` and ``_pin`` from the walker)."""

    _info: Any
    _block: Any
    _union: Any
    _pin: Any
    _where: Any

    def _pool(self, node: fx.Node, x: Any, k: int, output_size: Any) -> Any:
        if not isinstance(x, Val):
            return FIXED
        if x.dim > -(k + 1):
            return self._block(node, "pools over the channel dimension", x)
        trail = None
        if output_size is not None and x.dim == -(k + 1):
            sizes = (output_size,) * k if isinstance(output_size, int) else tuple(output_size)
            trail = math.prod(sizes) if all(isinstance(s, int) for s in sizes) else None
        return dataclasses.replace(x, trail=trail)

    def _flatten(self, node: fx.Node, x: Any, s: Any, e: Any) -> Any:
        if not isinstance(x, Val):
            return FIXED
        if x.rank is None or not isinstance(s, int) or not isinstance(e, int):
            return self._block(node, "flattens a tensor of unknown rank", x)
        r, p = x.rank, x.rank + x.dim
        s, e = s % r, e % r
        new_rank = r - (e - s)
        if p < s:
            return dataclasses.replace(x, dim=p - new_rank, rank=new_rank)
        if p > e:
            return dataclasses.replace(x, rank=new_rank)
        if p > s:
            return self._block(node, "flattens dimensions before the channels into them (channels would be strided)", x)
        if e == r - 1:
            factor, trail = x.trail, 1
        elif x.trail == 1:
            factor, trail = 1, 1
        else:
            return self._block(node, "flattens the channels with dimensions of unknown size", x)
        block = None if factor is None or x.block is None else x.block * factor
        return Val(x.segs, s - new_rank, new_rank, trail, block)

    def _reduce(self, node: fx.Node, x: Any, dims: Any, keepdim: Any) -> Any:
        if not isinstance(x, Val):
            return FIXED
        if dims is None or not isinstance(keepdim, bool):
            return self._block(node, "reduces over every dimension, channels included", x)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(not isinstance(d, int) for d in dims) or (x.rank is None and any(d >= 0 for d in dims)):
            return self._block(node, "reduces over dimensions the tracer cannot place", x)
        nd = {d if d < 0 else d - x.rank for d in dims}  # type: ignore[operator]
        if x.dim in nd:
            return self._block(node, "reduces over the channels", x)
        after = {d for d in nd if d > x.dim}
        trail = 1 if after == set(range(x.dim + 1, 0)) else (x.trail if not after else None)
        if keepdim:
            return dataclasses.replace(x, trail=trail)
        return Val(x.segs, x.dim + len(after), None if x.rank is None else x.rank - len(nd), trail, x.block)

    def _cat(self, node: fx.Node, tensors: Any, dim: Any) -> Any:
        infos = [self._info(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [FIXED]
        vals = [v for v in infos if isinstance(v, Val)]
        if not vals:
            return FIXED
        if len(vals) != len(infos):
            for v in vals:
                self._pin(v, f"{self._where(node)} joins them with a tensor the tracer cannot slice")
            return FIXED
        first = vals[0]
        if not isinstance(dim, int) or (dim >= 0 and first.rank is None):
            return self._block(node, "concatenates along a dimension the tracer cannot place", *vals)
        d = dim if dim < 0 else dim - first.rank  # type: ignore[operator]
        if any(v.dim != first.dim or v.block != 1 for v in vals):
            return self._block(node, "concatenates tensors whose channels lie in different dimensions", *vals)
        if d != first.dim:  # along another dimension: the same channels on both sides
            for v in vals[1:]:
                if not self._union(first, v):
                    return self._block(node, "concatenates tensors whose channels do not line up", *vals)
            return dataclasses.replace(first, trail=None)
        trails = {v.trail for v in vals}
        return Val(tuple(s for v in vals for s in v.segs), d, first.rank, trails.pop() if len(trails) == 1 else None)

    def _size(self, node: fx.Node, of: Any, index: Any) -> Any:
        x = self._info(of)
        if not isinstance(x, Val):
            return Size(of, index if isinstance(index, int) else None)
        if index is None:
            return Size(of, None, x)
        if not isinstance(index, int) or (index >= 0 and x.rank is None) or (index if index < 0 else index - x.rank) == x.dim:  # type: ignore[operator]
            self._block(node, "reads the number of channels (or a dimension the tracer cannot place)", x)
        return Size(of, index)

    def _reshape(self, node: fx.Node, shape: tuple[Any, ...]) -> Any:
        x = self._info(node.args[0])
        if not isinstance(x, Val):
            return FIXED
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        first = self._info(shape[0]) if shape else None
        if len(shape) == 2 and shape[1] == -1 and isinstance(first, Size) and first.of is node.args[0] and first.index == 0:
            return self._flatten(node, x, 1, -1)  # view(x.size(0), -1): flatten(1)
        return self._block(node, "reshapes the channels (only view/reshape(x.size(0), -1) is understood)", x)
