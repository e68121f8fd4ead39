"""What a module really stores: parameters, bytes, zeros, bits.

Bytes are true storage bytes of every parameter and buffer (``numel * element_size``, so packed
integer tensors count what they hold); a tensor shared by two modules (tied weights) counts once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["Stats", "module_stats", "model_bytes", "count_params"]


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    # Parameters and buffers, each tensor once (tied weights are one tensor).
    seen: set[int] = set()
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def model_bytes(model: nn.Module) -> int:
    """True storage bytes of every parameter and buffer of ``model``, shared tensors once.

    Example:
        >>> from torch import nn
        >>> model_bytes(nn.Linear(4, 2))  # 8 weights + 2 biases, float32
        40
    """
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def count_params(model: nn.Module) -> int:
    """Logical parameter count: weights a module represents, packed ones included.

    A module that stores its weights packed (in buffers) says how many it represents through a
    ``logical_params`` attribute, which then replaces the count of its own direct parameters.

    Example:
        >>> from torch import nn
        >>> count_params(nn.Linear(4, 2))
        10
    """
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        own = getattr(m, "logical_params", None)
        if own is not None:
            total += int(own)
            seen.update(id(p) for p in m.parameters(recurse=False))
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@dataclasses.dataclass(frozen=True)
class Stats:
    """A measurement of one module: parameter count, storage bytes, weight sparsity and bits."""

    params: int
    bytes: int
    sparsity: float | None
    bits: float | None


def _logical_weight(module: nn.Module) -> torch.Tensor | None:
    # ``module.weight`` is what the forward sees (masks applied by a parametrization); packed
    # modules expose their own figures through ``sparsity``/``bits`` attributes instead.
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None


def module_stats(module: nn.Module) -> Stats:
    """Measure ``module`` and its children (parameters as :func:`count_params` counts them).

    Sparsity is the fraction of exact zeros in the weight the forward sees, bits its element
    width; a module with a packed format reports its own through ``weight_bits`` and
    ``weight_sparsity`` attributes.

    Example:
        >>> from torch import nn
        >>> module_stats(nn.Linear(4, 2, bias=False))
        Stats(params=8, bytes=32, sparsity=0.0, bits=32.0)
    """
    params = count_params(module)
    nbytes = model_bytes(module)
    bits = getattr(module, "weight_bits", None)
    sparsity = getattr(module, "weight_sparsity", None)
    # A packed module that reports both figures is not asked to rebuild its dense weight.
    w = None if (bits is not None and sparsity is not None) else _logical_weight(module)
    if w is not None:
        with torch.no_grad():
            if sparsity is None and w.device.type != "meta" and w.numel():
                sparsity = float((w == 0).sum().item()) / w.numel()
            if bits is None:
                bits = float(w.element_size() * 8)
    return Stats(params=params, bytes=nbytes, sparsity=sparsity, bits=None if bits is None else float(bits))
