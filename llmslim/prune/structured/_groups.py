"""What is coupled: dependency groups of parameter slices, with exact rules for LLaMA-family decoders.

A :class:`Group` is one prunable unit (an MLP channel, a query head, a key/value group with its
query heads, a whole block) as the slices of ``nn.Linear`` weights that must go together. The
rules here cover Hugging Face decoders whose blocks hold ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` (LLaMA, Qwen2, Mistral and their relatives).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn

from ...calibration import find_blocks
from ...errors import TargetError

__all__ = ["Slice", "Group", "Decoder", "decoder", "channel_groups", "head_groups", "kv_groups", "block_groups"]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Slice:
    """Rows (``dim=0``: outputs, with the bias) or columns (``dim=1``: inputs) ``[start, stop)`` of a Linear's weight."""

    module: str
    dim: int
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Group:
    """Coupled slices removed together.

    Attributes:
        kind: ``"channel"`` (MLP intermediate channel), ``"head"`` (query head), ``"kv"`` (a
            key/value head with the query heads that read it) or ``"block"`` (a whole block).
        layer: Index of the block in the model's block list.
        index: The unit within its block (channel, query head or kv group number; the block's
            own index for ``"block"``).
        slices: The coupled weight slices.
    """

    kind: Literal["channel", "head", "kv", "block"]
    layer: int
    index: int
    slices: tuple[Slice, ...]


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A supported decoder: its block list, and per block its attention and MLP geometry."""

    container: str  # qualified name of the block list, e.g. "model.layers"
    blocks: tuple[tuple[str, nn.Module], ...]

    def attn(self, i: int) -> tuple[str, nn.Module]:
        name, block = self.blocks[i]
        return f"{name}.self_attn", block.self_attn

    def mlp(self, i: int) -> tuple[str, nn.Module]:
        name, block = self.blocks[i]
        return f"{name}.mlp", block.mlp

    def heads(self, i: int) -> tuple[int, int, int]:
        """``(query heads, key/value heads, head_dim)`` of block ``i``."""
        attn = self.blocks[i][1].self_attn
        d = int(attn.head_dim)
        return attn.q_proj.out_features // d, attn.k_proj.out_features // d, d


def _why_not(block: nn.Module) -> str | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is None or mlp is None:
        return "its blocks have no self_attn and mlp"
    for owner, names, label in ((attn, _ATTN, "self_attn"), (mlp, _MLP, "mlp")):
        for n in names:
            m = getattr(owner, n, None)
            if type(m) is not nn.Linear:
                kind = "missing" if m is None else f"a {type(m).__name__}"
                return f"{label}.{n} is {kind}, not a plain nn.Linear (prune structure before quantizing or masking)"
    if not isinstance(getattr(attn, "head_dim", None), int) or not isinstance(getattr(attn, "num_key_value_groups", None), int):
        return "self_attn has no integer head_dim and num_key_value_groups"
    return None


def decoder(model: nn.Module) -> Decoder:
    """The model's decoder blocks, when the built-in rules cover it.

    Raises:
        TargetError: Not a LLaMA-family decoder (GPT-2, OPT, BERT and others are not supported
            yet), or its layers are already quantized or masked.

    Example:
        >>> from llmslim import models
        >>> d = decoder(models.tiny("llama"))
        >>> d.container, len(d.blocks), d.heads(0)
        ('model.layers', 2, (4, 2, 16))
    """
    blocks = find_blocks(model)
    if blocks and blocks[0][0]:
        why = _why_not(blocks[0][1]) if len(blocks) else "it has no blocks"
        if why is None:
            for _, b in blocks[1:]:
                why = why or _why_not(b)
        if why is None:
            container = blocks[0][0].rpartition(".")[0]
            return Decoder(container, tuple(blocks))
    else:
        why = "it has no list of repeated blocks"
    raise TargetError(
        f"structured pruning supports LLaMA-family decoders (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj), "
        f"not {type(model).__name__}: {why}"
    )


def channel_groups(dec: Decoder, i: int) -> list[Group]:
    """MLP channel ``j`` of block ``i``: row ``j`` of gate and up, column ``j`` of down."""
    name, mlp = dec.mlp(i)
    return [
        Group("channel", i, j, (Slice(f"{name}.gate_proj", 0, j, j + 1), Slice(f"{name}.up_proj", 0, j, j + 1),
                                Slice(f"{name}.down_proj", 1, j, j + 1)))
        for j in range(mlp.down_proj.in_features)
    ]


def _q(name: str, h: int, d: int) -> tuple[Slice, Slice]:
    return Slice(f"{name}.q_proj", 0, h * d, (h + 1) * d), Slice(f"{name}.o_proj", 1, h * d, (h + 1) * d)


def head_groups(dec: Decoder, i: int) -> list[Group]:
    """Query head ``h`` of block ``i``: its rows of q, its columns of o."""
    name, _ = dec.attn(i)
    nq, _, d = dec.heads(i)
    return [Group("head", i, h, _q(name, h, d)) for h in range(nq)]


def kv_groups(dec: Decoder, i: int) -> list[Group]:
    """Key/value group ``g`` of block ``i``: its rows of k and v, and its query heads (grouped-query attention)."""
    name, _ = dec.attn(i)
    nq, nkv, d = dec.heads(i)
    per = nq // nkv
    return [
        Group("kv", i, g, (Slice(f"{name}.k_proj", 0, g * d, (g + 1) * d), Slice(f"{name}.v_proj", 0, g * d, (g + 1) * d),
                           *(s for h in range(g * per, (g + 1) * per) for s in _q(name, h, d))))
        for g in range(nkv)
    ]


def block_groups(dec: Decoder) -> list[Group]:
    """Each whole block: every Linear weight in it."""
    groups = []
    for i, (name, block) in enumerate(dec.blocks):
        slices = tuple(Slice(f"{name}.{n}", 0, 0, m.out_features) for n, m in block.named_modules() if type(m) is nn.Linear)
        groups.append(Group("block", i, i, slices))
    return groups
