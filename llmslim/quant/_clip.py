"""Better grids than min/max: per-group clipping searched by MSE, or refined HQQ-style.

Min/max grids spend codes on rare outliers; a slightly narrower range (clipping them) often
lowers the error of every other weight in the group. Both searches keep the grid's structure
(integer zero points, so 0.0 stays exact) and only choose each group's scale:

* ``"mse"``: try shrinking each group's range by factors from 1.0 down to 0.5 and keep, per
  group, the one with the lowest squared error;
* ``"hqq"``: half-quadratic refinement after HQQ (Badri & Shaji, 2023): alternate between a
  sparse error estimate (a generalized soft threshold of the residual, the proximal step of an
  ``lp`` norm with ``p < 1``, which lets outliers stay unfit) and the least-squares scale for the
  remaining target; each group keeps the iterate with its lowest ``lp`` error, min/max included.

Example:
    >>> import torch
    >>> w = torch.randn(8, 64)
    >>> w[0, 0] = 20.0  # an outlier
    >>> s, z = search_params(w, bits=4, group_size=32, symmetric=False, method="mse")
    >>> s.shape
    torch.Size([8, 2])
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._functional import dequantize, expand_groups, group_sum, num_groups, quant_params, quantize

__all__ = ["CLIP_METHODS", "search_params"]

CLIP_METHODS: tuple[str, ...] = ("minmax", "mse", "hqq")
_SHRINKS = torch.linspace(1.0, 0.5, 21).tolist()
_HQQ_ITERS, _HQQ_P, _HQQ_BETA, _HQQ_KAPPA = 20, 0.7, 10.0, 1.01


def _group_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int | None, p: float) -> torch.Tensor:
    approx = dequantize(quantize(w, scale, zero, bits=bits, group_size=group_size), scale, zero, group_size=group_size)
    return group_sum((approx - w).abs().pow(p), group_size)


def _mse(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    out, groups = w.shape[0], num_groups(w.shape[1], group_size)
    best_s, best_z, best_err = None, None, None
    for f in _SHRINKS:
        shrink = torch.full((out, groups), f)
        s, z = quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype, shrink=shrink)
        err = _group_error(w, s, z, bits, group_size, 2.0)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z  # type: ignore[return-value]


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    # proximal operator of |x|^p / beta (generalized soft thresholding)
    mag = x.abs()
    return torch.sign(x) * torch.relu(mag - mag.clamp(min=1e-12).pow(p - 1) / beta)


def _hqq(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    s, z = quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    best_s, best_err = s, _group_error(w, s, z, bits, group_size, _HQQ_P)
    cols, beta = w.shape[1], _HQQ_BETA
    zc = None if z is None else expand_groups(z.float(), cols, group_size)
    for _ in range(_HQQ_ITERS):
        q = quantize(w, s, z, bits=bits, group_size=group_size).float()
        if zc is not None:
            q -= zc
        residual = w - q * expand_groups(s.float(), cols, group_size)
        target = w - _shrink_lp(residual, beta, _HQQ_P)
        num, den = group_sum(q * target, group_size), group_sum(q * q, group_size)
        fitted = torch.where((den > 0) & (num > 0), num / den.clamp(min=1e-30), s.float())
        s = fitted.to(scale_dtype).clamp(min=torch.finfo(scale_dtype).tiny)
        err = _group_error(w, s, z, bits, group_size, _HQQ_P)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
        beta *= _HQQ_KAPPA
    return best_s, z


def search_params(
    w: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool, method: str = "minmax", scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group ``(scale, zero)`` of ``w`` chosen by ``method`` (one of :data:`CLIP_METHODS`).

    Same contract as :func:`~llmslim.quant.quant_params` (which ``"minmax"`` is); the searches
    only ever narrow a group's range, so zero points stay integers and 0.0 stays exact.

    Raises:
        ConfigError: Unknown method, bits or group size.
    """
    if method not in CLIP_METHODS:
        raise ConfigError(f"clip must be one of {', '.join(map(repr, CLIP_METHODS))} (got {method!r})")
    w = w.detach().float()
    if method == "mse":
        return _mse(w, bits, group_size, symmetric, scale_dtype)
    if method == "hqq":
        return _hqq(w, bits, group_size, symmetric, scale_dtype)
    return quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
