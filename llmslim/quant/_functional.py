"""Pure quantization functions on 2-D weights: grid parameters, quantize, dequantize.

A weight ``w`` of shape ``(out, in)`` is cut along the input dimension into groups of
``group_size`` columns (``None``: the whole row, one group per output channel). When
``group_size`` does not divide ``in`` the last group is shorter (SmolLM2's 576 columns with
``group_size=128`` are 4 groups of 128 and one of 64). Each group has a scale ``s`` and, on an
asymmetric grid, an integer zero point ``z``; a code ``q`` (a signed integer of ``bits`` bits,
``-2**(bits-1) <= q < 2**(bits-1)``) stands for ``(q - z) * s``.

* symmetric: ``z = 0``, ``s = max|w| / (2**(bits-1) - 1)``;
* asymmetric: the range ``[min(w, 0), max(w, 0)]`` spread over all ``2**bits`` codes, ``z`` the
  integer code of 0.0. Both grids hold 0.0 exactly, so a pruned (zero) weight stays zero.

Scales are rounded to their storage dtype *before* the codes are chosen, so the codes are the
best ones for the scale that is really stored.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 0.5, -1.0, 2.0]])
    >>> scale, zero = quant_params(w, bits=4, group_size=None, symmetric=False)
    >>> q = quantize(w, scale, zero, bits=4)
    >>> dequantize(q, scale, zero)
    tensor([[ 0.0000,  0.4000, -1.0000,  2.0000]])
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

__all__ = [
    "BITS",
    "code_range",
    "num_groups",
    "expand_groups",
    "group_sum",
    "quant_params",
    "quantize",
    "dequantize",
    "fake_quantize",
    "relative_error",
    "zero_fraction",
]

BITS: tuple[int, ...] = (2, 3, 4, 8)


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest signed code of ``bits`` bits.

    Example:
        >>> code_range(4)
        (-8, 7)
    """
    if bits not in BITS:
        raise ConfigError(f"bits must be one of {', '.join(map(str, BITS))} (got {bits!r})")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _group(in_features: int, group_size: int | None) -> int:
    if group_size is None:
        return max(1, in_features)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size must be a positive integer or None (got {group_size!r})")
    return group_size


def num_groups(in_features: int, group_size: int | None) -> int:
    """How many groups a row of ``in_features`` has (the last one may be shorter).

    Example:
        >>> num_groups(576, 128), num_groups(576, None)
        (5, 1)
    """
    return max(1, math.ceil(in_features / _group(in_features, group_size)))


def expand_groups(t: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Repeat per-group values ``(out, groups)`` to per-column values ``(out, in_features)``.

    Example:
        >>> expand_groups(torch.tensor([[1.0, 2.0]]), 3, 2)
        tensor([[1., 1., 2.]])
    """
    g = _group(in_features, group_size)
    return t.repeat_interleave(g, dim=1)[:, :in_features]


def _split(w: torch.Tensor, group_size: int | None) -> list[torch.Tensor]:
    # Full groups as one (out, n, g) view plus the short last group as (out, 1, r): every
    # statistic is then one vectorised reduction over the last dimension.
    out, cols = w.shape
    g = _group(cols, group_size)
    full = cols // g * g
    parts = []
    if full:
        parts.append(w[:, :full].reshape(out, full // g, g))
    if full < cols:
        parts.append(w[:, full:].reshape(out, 1, cols - full))
    return parts


def group_sum(t: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Sum per-column values ``(out, in)`` over each group: ``(out, groups)``.

    Example:
        >>> group_sum(torch.ones(1, 5), 2)
        tensor([[2., 2., 1.]])
    """
    return torch.cat([p.sum(dim=-1) for p in _split(t, group_size)], dim=1)


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"weight must be a 2-D floating-point tensor (got {getattr(w, 'shape', type(w).__name__)})")


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Cast to the storage dtype rounding *up*, so the stored grid still spans the group's range
    # and every weight lies within half a step of a code (never clamped further than that).
    stored = scale.to(dtype)
    if dtype != scale.dtype:
        up = torch.nextafter(stored, torch.full_like(stored, math.inf))
        stored = torch.where(stored.to(scale.dtype) < scale, up, stored)
    smallest = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    return stored.clamp(min=smallest)  # a scale that underflowed to 0 would zero its group


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    qmin, qmax = code_range(bits)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
    else:
        scale = (hi - lo) / (qmax - qmin)
    # An all-zero group has no range: any scale represents it, 1 keeps the arithmetic finite.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_up(scale, scale_dtype)
    if symmetric:
        return scale, None
    zero = (qmin - torch.round(lo / scale.float())).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def quant_params(
    w: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    shrink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max grid parameters of ``w`` per group: ``(scale, zero)``.

    Args:
        w: Weight ``(out, in)``.
        bits: Code width, one of :data:`BITS`.
        group_size: Columns per group, or ``None`` for one group per output channel.
        symmetric: Symmetric grid (``zero`` is ``None``) or asymmetric (integer zero points).
        scale_dtype: Storage dtype of the scales.
        shrink: Optional ``(out, groups)`` factors in ``(0, 1]`` narrowing each group's range
            (clipping); ``None`` keeps the full range.

    Returns:
        ``scale`` ``(out, groups)`` in ``scale_dtype`` (always > 0) and ``zero`` ``(out, groups)``
        int8 codes (``None`` when symmetric).

    Raises:
        ConfigError: Bad bits, group size or weight.

    Example:
        >>> s, z = quant_params(torch.tensor([[-1.0, 1.0]]), bits=8, group_size=None, symmetric=True)
        >>> round(s.item() * 127, 6), z
        (1.0, None)
    """
    _check_weight(w)
    code_range(bits)
    lo = torch.cat([p.amin(dim=-1) for p in _split(w.float(), group_size)], dim=1).clamp(max=0)
    hi = torch.cat([p.amax(dim=-1) for p in _split(w.float(), group_size)], dim=1).clamp(min=0)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    return _grid(lo, hi, bits, symmetric, scale_dtype)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int, group_size: int | None = None
) -> torch.Tensor:
    """Round ``w`` to the nearest code of its group's grid: int8 codes ``(out, in)``.

    ``group_size`` must be the one ``scale`` was computed with (``None`` when ``scale`` has one
    column). Values outside the grid clamp to its ends.

    Example:
        >>> quantize(torch.tensor([[0.26, -3.0]]), torch.tensor([[0.5]]), None, bits=2)
        tensor([[ 1, -2]], dtype=torch.int8)
    """
    _check_weight(w)
    qmin, qmax = code_range(bits)
    out, first = [], 0
    for part in _split(w.float(), group_size):  # (out, n, g) views: scales broadcast, never expanded
        n = part.shape[1]
        q = torch.round(part / scale[:, first : first + n, None].float())
        if zero is not None:
            q += zero[:, first : first + n, None]
        out.append(q.clamp_(qmin, qmax).to(torch.int8).flatten(1))
        first += n
    return torch.cat(out, dim=1)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight codes ``q`` stand for: ``(q - zero) * scale``, computed in float32.

    A code equal to its zero point gives exactly 0.0.

    Example:
        >>> dequantize(torch.tensor([[3, 5]], dtype=torch.int8), torch.tensor([[0.5]]), torch.tensor([[3]], dtype=torch.int8))
        tensor([[0., 1.]])
    """
    out, first = [], 0
    for part in _split(q, group_size):
        n = part.shape[1]
        w = part.float()
        if zero is not None:
            w -= zero[:, first : first + n, None]
        out.append((w * scale[:, first : first + n, None].float()).to(dtype).flatten(1))
        first += n
    return torch.cat(out, dim=1)


def fake_quantize(w: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize(quantize(w))`` on the min/max grid: what the quantized weight computes.

    Example:
        >>> fake_quantize(torch.tensor([[0.0, 0.1, 1.0]]), bits=2, group_size=None, symmetric=True)
        tensor([[0., 0., 1.]])
    """
    scale, zero = quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    return dequantize(quantize(w, scale, zero, bits=bits, group_size=group_size), scale, zero, group_size=group_size, dtype=w.dtype)


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """``||w - approx|| / ||w||`` (Frobenius), 0.0 for an all-zero ``w`` approximated exactly.

    Example:
        >>> relative_error(torch.ones(4), torch.full((4,), 0.5))
        0.5
    """
    diff = torch.linalg.vector_norm((w.float() - approx.float()).flatten())
    norm = torch.linalg.vector_norm(w.float().flatten())
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)


def zero_fraction(q: torch.Tensor, zeros: torch.Tensor | None, in_features: int, group_size: int | None) -> float:
    """Fraction of codes ``q`` ``(out, in)`` equal to their zero point: the weights that are exactly 0.0."""
    zero = 0 if zeros is None else expand_groups(zeros, in_features, group_size)
    return float((q == zero).sum()) / max(1, q.numel())
