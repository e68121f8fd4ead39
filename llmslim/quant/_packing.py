"""Bit packing of integer codes into bytes: the portable storage format of quantized weights.

Codes are signed (``-2**(bits-1) <= q < 2**(bits-1)``), packed row by row along the input
dimension into ``uint8``; each row starts on a byte boundary, and a row that does not fill its
last byte is padded with code 0. Bytes per row: ``ceil(in * bits / 8)`` (3-bit: 3 bytes per 8
codes).

* 8-bit: each code's own byte, two's complement (``q.view(uint8)``): the int8 kernels read it
  without a copy.
* 4-bit: two codes per byte, offset binary (``q + 8``), the earlier column in the low nibble.
* 2-bit: four codes per byte, offset binary (``q + 2``), the earliest column in the lowest bits.
* 3-bit: eight codes per three bytes, offset binary (``q + 4``): code ``i`` of the eight takes
  bits ``3i .. 3i+2`` of the little-endian 24-bit word the three bytes form.

(GGUF stores its 8-bit and 4-bit codes the same way.)

Example:
    >>> import torch
    >>> q = torch.tensor([[-8, 7, 0]], dtype=torch.int8)
    >>> pack(q, 4)
    tensor([[240, 136]], dtype=torch.uint8)
    >>> unpack(pack(q, 4), 4, 3)
    tensor([[-8,  7,  0]], dtype=torch.int8)
"""

from __future__ import annotations

import torch

from ._functional import code_range

__all__ = ["pack", "unpack", "row_bytes", "CODES_PER_UNIT"]

# codes per packing unit, and bytes per unit
CODES_PER_UNIT: dict[int, tuple[int, int]] = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}


def row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of ``in_features`` codes takes.

    Example:
        >>> row_bytes(576, 4), row_bytes(10, 3)
        (288, 6)
    """
    codes, nbytes = CODES_PER_UNIT[bits]
    return -(-in_features // codes) * nbytes


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes ``(rows, cols)`` of ``bits`` bits into ``uint8`` ``(rows, row_bytes)``.

    Raises:
        ConfigError: ``bits`` is not a supported width.
    """
    qmin, _ = code_range(bits)
    if bits == 8:
        return q.to(torch.int8).contiguous().view(torch.uint8)
    rows, cols = q.shape
    per, nbytes = CODES_PER_UNIT[bits]
    units = -(-cols // per)
    dtype = torch.uint8 if nbytes == 1 else torch.int32  # a byte holds whole fields: no wider type needed
    u = torch.full((rows, units * per), -qmin, dtype=dtype, device=q.device)  # padding is code 0
    u[:, :cols] = (q.to(torch.int16) - qmin).to(dtype)  # offset binary
    u = u.view(rows, units, per)
    word = u[..., 0].clone()
    for i in range(1, per):
        word |= u[..., i] << (bits * i)
    if nbytes == 1:
        return word
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(nbytes)], dim=-1)
    return out.to(torch.uint8).view(rows, units * nbytes)


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The int8 codes ``(rows, cols)`` that :func:`pack` stored in ``packed``.

    Raises:
        ConfigError: ``bits`` is not a supported width.
    """
    qmin, _ = code_range(bits)
    if bits == 8:
        return packed.contiguous().view(torch.int8)[:, :cols]
    rows = packed.shape[0]
    per, nbytes = CODES_PER_UNIT[bits]
    if nbytes == 1:
        word = packed
    else:
        b = packed.to(torch.int32).view(rows, -1, nbytes)
        word = sum(b[..., i] << (8 * i) for i in range(nbytes))
    mask = (1 << bits) - 1
    fields = torch.stack([(word >> (bits * i)) & mask for i in range(per)], dim=-1).reshape(rows, -1)[:, :cols]
    if nbytes == 1:  # byte fields (< 128): read as int8 and shift in place, no int16 round trip (~20x faster)
        return fields.contiguous().view(torch.int8).add_(qmin)
    return (fields.to(torch.int16) + qmin).to(torch.int8)
