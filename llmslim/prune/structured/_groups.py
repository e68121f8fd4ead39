"""What is coupled: dependency groups of weight slices, with exact rules for Hugging Face blocks.

A :class:`Group` is one prunable unit (an MLP channel, a query head, a key/value group with its
query heads, a whole block, or a channel the generic tracer found) as the slices of layer weights
that must go together. Slices index the layer's *logical* ``[out, in]`` matrix (see
:mod:`._slicing`), so a GPT-2 ``Conv1D`` (stored ``[in, out]``) or a convolution reads the same.
:func:`decoder` finds a model's blocks and the :class:`~._layouts.Layout` that describes them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from torch import nn

from ...calibration import find_blocks
from ...errors import TargetError
from ._layouts import LLAMA, Layout, layouts
from ._slicing import sliceable

__all__ = ["Slice", "Group", "Decoder", "decoder", "channel_groups", "head_groups", "kv_groups", "block_groups"]


@dataclasses.dataclass(frozen=True)
class Slice:
    """Logical rows (``dim=0``: outputs, with the bias) or columns (``dim=1``: inputs) ``[start, stop)`` of a layer."""

    module: str
    dim: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Group:
    """Coupled slices removed together.

    Attributes:
        kind: ``"channel"`` (an MLP intermediate channel, or a channel of a traced graph),
            ``"head"`` (query head), ``"kv"`` (a key/value head with the query heads that read
            it) or ``"block"`` (a whole block).
        layer: Index of the block in the model's block list (for traced channels: the index of
            the coupled channel set, see :func:`~llmslim.prune.structured.trace`).
        index: The unit within its block (channel, query head or kv group number; the block's
            own index for ``"block"``).
        slices: The coupled weight slices.
    """

    kind: Literal["channel", "head", "kv", "block"]
    layer: int
    index: int
    slices: tuple[Slice, ...]


def _attr(module: nn.Module, path: str) -> object:
    return functools.reduce(getattr, path.split("."), module)


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A supported stack of transformer blocks: the block list and the layout of each block."""

    container: str  # qualified name of the block list, e.g. "model.layers"
    blocks: tuple[tuple[str, nn.Module], ...]
    layout: Layout = LLAMA

    def name(self, i: int, rel: str) -> str:
        """Qualified name of the module at ``rel`` (relative to block ``i``; ``""``: the block)."""
        block = self.blocks[i][0]
        return f"{block}.{rel}" if rel else block

    def module(self, i: int, rel: str) -> nn.Module:
        """The module at ``rel`` in block ``i``."""
        return self.blocks[i][1].get_submodule(rel)

    def attn(self, i: int) -> tuple[str, nn.Module]:
        """Name and module of block ``i``'s attention.

        Raises:
            TargetError: The layout has no attention rules.
        """
        if self.layout.attn is None:
            raise TargetError(f"layout {self.layout.name!r} has no attention rules: heads cannot be pruned")
        return self.name(i, self.layout.attn), self.module(i, self.layout.attn)

    def mlp(self, i: int) -> tuple[str, nn.Module]:
        """Name and module reported as block ``i``'s MLP (for OPT and BERT: the block)."""
        return self.name(i, self.layout.mlp), self.module(i, self.layout.mlp)

    def mlp_width(self, i: int) -> int:
        """Intermediate channels of block ``i``'s MLP."""
        down = self.module(i, self.layout.mlp_out[0])
        return sliceable(down).width(down, 1)  # type: ignore[union-attr]

    def heads(self, i: int) -> tuple[int, int, int]:
        """``(query heads, key/value heads, head_dim)`` of block ``i``."""
        _, attn = self.attn(i)
        d = int(_attr(attn, self.layout.head_dim))  # type: ignore[call-overload]
        q, k = self.module(i, self.layout.q), self.module(i, self.layout.k)
        wq, wk = sliceable(q).width(q, 0), sliceable(k).width(k, 0)  # type: ignore[union-attr]
        if self.layout.fused:
            wq = wk = wq // 3
        return wq // d, wk // d, d

    def offsets(self, i: int) -> tuple[int, int, int]:
        """First logical row of the query, key and value outputs in their layers (fused: q | k | v)."""
        if not self.layout.fused:
            return 0, 0, 0
        nq, nkv, d = self.heads(i)
        return 0, nq * d, (nq + nkv) * d


def _why_not(block: nn.Module, layout: Layout) -> str | None:
    for rel in layout.names():
        m = block.get_submodule(rel)
        spec = sliceable(m)
        if spec is None or spec.kind_of(m) != "matrix":
            return f"{rel} is a {type(m).__name__}, not a plain nn.Linear or Conv1D (prune structure before quantizing or masking)"
    if layout.attn is not None:
        try:
            d = _attr(block.get_submodule(layout.attn), layout.head_dim)
        except AttributeError:
            d = None
        if not isinstance(d, int):
            return f"{layout.attn} has no integer {layout.head_dim}"
    return layout.check(block)


def _matches(block: nn.Module, layout: Layout) -> bool:
    try:
        for rel in (*layout.names(), *([layout.attn] if layout.attn else []), layout.mlp):
            block.get_submodule(rel)
    except AttributeError:
        return False
    return True


def find_layout(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], Layout | None]:
    """The model's blocks and the first registered layout whose names they all have (or ``None``)."""
    blocks = find_blocks(model)
    if not blocks or not blocks[0][0]:
        return [], None
    for layout in layouts():
        if all(_matches(b, layout) for _, b in blocks):
            return blocks, layout
    return blocks, None


def decoder(model: nn.Module) -> Decoder:
    """The model's transformer blocks, when a registered layout covers them.

    Raises:
        TargetError: No layout matches (not LLaMA/Qwen2/Mistral, OPT, GPT-2, BERT or a layout
            you registered), or its layers are already quantized or masked.

    Example:
        >>> from llmslim import models
        >>> d = decoder(models.tiny("llama"))
        >>> d.container, len(d.blocks), d.heads(0), d.layout.name
        ('model.layers', 2, (4, 2, 16), 'llama')
        >>> g = decoder(models.tiny("gpt2"))
        >>> g.container, g.heads(0), g.offsets(0), g.mlp_width(0)
        ('transformer.h', (4, 4, 16), (0, 64, 128), 128)
    """
    blocks, layout = find_layout(model)
    why = None
    if layout is not None:
        for _, b in blocks:
            why = why or _why_not(b, layout)
        if why is None:
            return Decoder(blocks[0][0].rpartition(".")[0], tuple(blocks), layout)
    else:
        why = "it has no list of repeated blocks" if not blocks else "no layout matches its blocks"
    known = ", ".join(layout.name for layout in layouts())
    raise TargetError(f"structured pruning of heads and blocks covers the layouts {known} (see register_layout), "
                      f"not {type(model).__name__}: {why}")


def channel_groups(dec: Decoder, i: int) -> list[Group]:
    """MLP channel ``j`` of block ``i``: row ``j`` of each ``mlp_in`` layer, column ``j`` of each ``mlp_out`` layer."""
    ins = [dec.name(i, r) for r in dec.layout.mlp_in]
    outs = [dec.name(i, r) for r in dec.layout.mlp_out]
    return [
        Group("channel", i, j, (*(Slice(n, 0, j, j + 1) for n in ins), *(Slice(n, 1, j, j + 1) for n in outs)))
        for j in range(dec.mlp_width(i))
    ]


def _q(dec: Decoder, i: int, h: int) -> tuple[Slice, Slice]:
    d = dec.heads(i)[2]
    return (Slice(dec.name(i, dec.layout.q), 0, h * d, (h + 1) * d),
            Slice(dec.name(i, dec.layout.o), 1, h * d, (h + 1) * d))


def head_groups(dec: Decoder, i: int) -> list[Group]:
    """Query head ``h`` of block ``i``: its rows of q, its columns of o."""
    nq = dec.heads(i)[0]
    return [Group("head", i, h, _q(dec, i, h)) for h in range(nq)]


def kv_groups(dec: Decoder, i: int) -> list[Group]:
    """Key/value group ``g`` of block ``i``: its rows of k and v, and its query heads (grouped-query
    attention; with plain multi-head attention each group is one head with its key and value)."""
    nq, nkv, d = dec.heads(i)
    _, ko, vo = dec.offsets(i)
    k, v = dec.name(i, dec.layout.k), dec.name(i, dec.layout.v)
    per = nq // nkv
    return [
        Group("kv", i, g, (Slice(k, 0, ko + g * d, ko + (g + 1) * d), Slice(v, 0, vo + g * d, vo + (g + 1) * d),
                           *(s for h in range(g * per, (g + 1) * per) for s in _q(dec, i, h))))
        for g in range(nkv)
    ]


def block_groups(dec: Decoder) -> list[Group]:
    """Each whole block: every output row of every matrix layer in it."""
    groups = []
    for i, (name, block) in enumerate(dec.blocks):
        slices = []
        for n, m in block.named_modules():
            spec = sliceable(m)
            if spec is not None and spec.kind_of(m) == "matrix":
                slices.append(Slice(f"{name}.{n}", 0, 0, spec.width(m, 0)))
        groups.append(Group("block", i, i, tuple(slices)))
    return groups
