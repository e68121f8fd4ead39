"""The CPU int4 kernel's weight layout: plan, pack (torch's op), unpack (ours, verified).

``torch._weight_int4pack_mm_for_cpu`` reads 4-bit weights in the layout
``torch._convert_weight_to_int4pack_for_cpu`` writes, which depends on the CPU's vector width
(blocks of 64 output rows on AVX-512, 32 elsewhere) and is therefore a runtime format, never a
file format. A layer on this path holds *only* the kernel layout (no second copy); to read the
codes back (checkpoints, the many-token path, moving devices) this module unpacks the layout with
plain tensor views. The unpacking is a model of torch's layout, so it is checked on every weight
packed: the model that reproduces the codes exactly is used, and when none does the layer keeps
the portable format instead (:func:`pack_int4` returns ``None``).

The kernel takes group sizes 32, 64, 128 and 256 and output widths that are multiples of 16. A
:class:`Int4Plan` maps any layer onto it: output rows padded to a multiple of 16; the input
columns cut into a *main* segment (whole groups) and a *remainder* (the short last group, padded
with zero columns to a multiple of 32), each one kernel call.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["KERNEL_GROUPS", "Int4Plan", "int4_plan", "cpu_int4_available", "pack_int4", "unpack_int4", "unpack_rows"]

KERNEL_GROUPS: tuple[int, ...] = (256, 128, 64, 32)


_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def cpu_int4_available() -> bool:
    """Whether this torch has the CPU int4 weight-only kernel and its packing op."""
    return _INT4


def _kernel_group(cols: int) -> int | None:
    return next((g for g in KERNEL_GROUPS if cols % g == 0), None)


@dataclasses.dataclass(frozen=True)
class Int4Plan:
    """How an ``(out, in)`` int4 weight with ``groups`` portable groups maps onto kernel calls.

    Attributes:
        out_features / padded_out: Output rows, and rows the kernel holds (a multiple of 16).
        in_features: Input columns.
        main / main_group: Columns of the main segment (``0`` if none) and its kernel group size.
        rem / rem_padded / rem_group: Remainder columns, padded to a multiple of 32, and the
            kernel group size of the remainder call (``0`` when there is no remainder).
        source: For each kernel group (main ones, then remainder ones), the index of the
            portable group whose scale and zero point it uses.
    """

    out_features: int
    padded_out: int
    in_features: int
    main: int
    main_group: int
    rem: int
    rem_padded: int
    rem_group: int
    source: tuple[int, ...]

    @property
    def main_groups(self) -> int:
        return self.main // self.main_group if self.main else 0


def int4_plan(out_features: int, in_features: int, group_size: int | None) -> Int4Plan | None:
    """The kernel plan of a layer, or ``None`` when the CPU int4 kernel cannot run it.

    A group size that is not a multiple of 32 (and smaller than the row) has no kernel plan.

    Example:
        >>> p = int4_plan(576, 576, 128)
        >>> (p.main, p.main_group, p.rem, p.rem_padded, p.rem_group, p.source)
        (512, 128, 64, 64, 64, (0, 1, 2, 3, 4))
    """
    if out_features < 1 or in_features < 1:
        return None
    k = in_features
    per_channel = group_size is None or group_size >= k
    if per_channel:
        main = k // 32 * 32
        main_group = _kernel_group(main) if main else 0
        source_main = [0] * (main // main_group if main else 0)
        rem_source = 0
    else:
        main_group = _kernel_group(group_size)
        if main_group is None:
            return None
        main = k // group_size * group_size
        per = group_size // main_group
        source_main = [i // per for i in range(main // main_group)]
        rem_source = main // group_size
    rem = k - main
    rem_padded = math.ceil(rem / 32) * 32
    rem_group = _kernel_group(rem_padded) if rem else 0
    source = source_main + ([rem_source] * (rem_padded // rem_group) if rem else [])
    return Int4Plan(
        out_features=out_features,
        padded_out=math.ceil(out_features / 16) * 16,
        in_features=k,
        main=main,
        main_group=main_group or 0,
        rem=rem,
        rem_padded=rem_padded,
        rem_group=rem_group or 0,
        source=tuple(source),
    )


# -- the layout model ----------------------------------------------------------------------------
# torch packs output rows in blocks of ``block`` rows; per block and input column k it writes
# block/2 bytes, each holding two rows' nibbles: "halves" pairs row j with row j + block/2,
# "pairs" pairs rows 2j and 2j + 1. A short last block has its own scheme.
@dataclasses.dataclass(frozen=True)
class _Layout:
    block: int
    full: str
    tail: str


_CANDIDATES = tuple(_Layout(b, f, t) for b in (64, 32) for f in ("halves", "pairs") for t in ("pairs", "halves"))
_last_good: list[_Layout] = []  # the layout that matched last time is tried first


def _split(t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, signed: bool) -> None:
    # t: packed bytes (…, rows_half, cols) uint8, any strides; write the low and high nibbles into lo / hi
    if signed:
        # flipping each nibble's top bit turns offset binary into two's complement: u - 8 (and
        # this first op also makes the transposed bytes contiguous)
        x = torch.bitwise_xor(t, 0x88).view(torch.int8)
        torch.bitwise_left_shift(x, 4, out=lo)
        lo.bitwise_right_shift_(4)
        torch.bitwise_right_shift(x, 4, out=hi)
    else:
        torch.bitwise_and(t, 0x0F, out=lo)
        torch.bitwise_right_shift(t, 4, out=hi)


def _place(t: torch.Tensor, out: torch.Tensor, scheme: str, signed: bool) -> None:
    # t: (blocks, block/2, cols) bytes; out: (blocks * block, cols)
    blocks, half, cols = t.shape
    if scheme == "halves":
        view = out.view(blocks, 2, half, cols)
        _split(t, view[:, 0], view[:, 1], signed)
    else:
        view = out.view(blocks, half, 2, cols)
        _split(t, view[:, :, 0], view[:, :, 1], signed)


def unpack_rows(packed: torch.Tensor, rows: int, cols: int, layout: _Layout, out: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Write the nibbles of ``rows`` consecutive kernel rows into ``out`` ``(rows, cols)``.

    ``packed`` holds exactly those rows' bytes; the first row must start a kernel block (any
    multiple of the block size), so a range of whole blocks, with or without the short last
    block, unpacks on its own: the many-token path dequantizes a large weight in cache-sized
    pieces this way. ``out`` is uint8 ``u`` (``signed=False``) or int8 ``u - 8`` (``signed=True``).
    """
    flat = packed.reshape(-1)
    nfull = rows // layout.block
    split = nfull * layout.block * cols // 2
    # bytes are stored column-major inside a block: the first op reads them transposed
    if nfull:
        body = flat[:split].view(nfull, cols, layout.block // 2).transpose(1, 2)
        _place(body, out[: nfull * layout.block], layout.full, signed)
    tail = rows - nfull * layout.block
    if tail:
        body = flat[split:].view(1, cols, tail // 2).transpose(1, 2)
        _place(body, out[nfull * layout.block :], layout.tail, signed)
    return out


def pack_int4(u: torch.Tensor) -> tuple[torch.Tensor, _Layout] | None:
    """Pack offset-binary nibbles ``u`` ``(rows, cols)`` (rows a multiple of 16, cols even) with
    torch's op; return the packed tensor and the verified layout, or ``None`` if no layout
    model reproduces ``u`` from it."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)
    rows, cols = u.shape
    if packed.numel() * 2 != rows * cols:
        return None
    back = torch.empty(rows, cols, dtype=torch.uint8)
    for layout in [*_last_good, *_CANDIDATES]:
        if torch.equal(unpack_rows(packed, rows, cols, layout, back, signed=False), u.to(torch.uint8)):
            _last_good[:] = [layout]
            return packed, layout
    return None


def unpack_int4(packed: torch.Tensor, rows: int, cols: int, layout: _Layout) -> torch.Tensor:
    """The offset-binary nibbles ``(rows, cols)`` uint8 that :func:`pack_int4` packed."""
    return unpack_rows(packed, rows, cols, layout, torch.empty(rows, cols, dtype=torch.uint8, device=packed.device), signed=False)
