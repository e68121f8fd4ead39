"""Fake quantization as a ``torch.nn.utils.parametrize`` parametrization, for training.

The weight a forward sees is ``dequantize(quantize(w))`` on a min/max grid recomputed from the
current ``w`` at every forward; the backward is the straight-through estimator (the gradient
reaches ``w`` unchanged). With a min/max grid every weight lies inside the grid's range (scales
are rounded up to their storage dtype), so "pass the gradient inside the clipping range" is the
identity. The codes, scales and zero points are those :func:`~llmslim.quant.quantize` gives, so
a :class:`~llmslim.quant.QuantLinear` built from :meth:`FakeQuant.grid` computes the very weight
the training forward saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ._functional import code_range, dequantize, num_groups, quant_params, quantize

__all__ = ["FakeQuant", "get_fake_quant", "pre_quant_weight"]


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized tensor, exactly; backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fq: torch.Tensor) -> torch.Tensor:
        return fq

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class FakeQuant(nn.Module):
    """Parametrization ``w -> dequantize(quantize(w))`` with a straight-through gradient.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: Input columns per scale, or ``None`` for one per output channel.
        symmetric: Symmetric grid, or asymmetric with integer zero points.
        scale_dtype: Storage dtype of the scales (they are rounded to it, as ``QuantLinear`` stores them).
        transposed: The weight is stored ``(in, out)`` (transformers ``Conv1D``).

    Raises:
        ConfigError: Bad bits or group size.

    Example:
        >>> layer = torch.nn.Linear(8, 1)
        >>> _ = parametrize.register_parametrization(layer, "weight", FakeQuant(bits=2, group_size=None, symmetric=True))
        >>> len(set(layer.weight.flatten().tolist())) <= 3   # -s, 0 and s
        True
    """

    def __init__(self, *, bits: int, group_size: int | None, symmetric: bool, scale_dtype: torch.dtype = torch.bfloat16,
                 transposed: bool = False) -> None:
        super().__init__()
        code_range(bits)
        num_groups(1, group_size)  # checks group_size
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_dtype, self.transposed = scale_dtype, transposed

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, scale, zero)`` of ``w`` (its rows ``(out, in)``): what ``finalize`` stores."""
        rows = (w.t() if self.transposed else w).detach()
        scale, zero = quant_params(rows, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                                   scale_dtype=self.scale_dtype)
        return quantize(rows, scale, zero, bits=self.bits, group_size=self.group_size), scale, zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q, scale, zero = self.grid(w)
            fq = dequantize(q, scale, zero, group_size=self.group_size, dtype=w.dtype)
            fq = fq.t() if self.transposed else fq
        return _StraightThrough.apply(w, fq)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, transposed={self.transposed}"


def get_fake_quant(module: nn.Module) -> FakeQuant | None:
    """The :class:`FakeQuant` on ``module.weight``, or ``None``.

    Example:
        >>> get_fake_quant(torch.nn.Linear(2, 2)) is None
        True
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations["weight"] if isinstance(p, FakeQuant)), None)


def pre_quant_weight(module: nn.Module, name: str = "") -> torch.Tensor:
    """The weight that reaches ``module``'s :class:`FakeQuant`: the original through every
    parametrization before it (a pruning mask first), detached.

    Raises:
        ConfigError: No fake quantization, or a parametrization after it (which the packed
            layer could not reproduce).

    Example:
        >>> layer = torch.nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", FakeQuant(bits=4, group_size=None, symmetric=True))
        >>> torch.equal(pre_quant_weight(layer), layer.parametrizations.weight.original.detach())
        True
    """
    chain = module.parametrizations["weight"] if parametrize.is_parametrized(module, "weight") else []
    kinds = [type(p).__name__ for p in chain]
    if "FakeQuant" not in kinds:
        raise ConfigError(f"module {name!r} has no fake quantization on its weight")
    if kinds[-1] != "FakeQuant":
        raise ConfigError(f"module {name!r}: fake quantization must be the weight's last parametrization (got {kinds})")
    value = chain.original
    with torch.no_grad():
        for p in list(chain)[:-1]:
            value = p(value)
    return value.detach()
