"""``SparseQuantLinear``: a pruned and quantized linear layer that stores only its non-zero codes.

A quantized weight is zero exactly where its code equals its group's zero point (0 on a
symmetric grid). A pruned model quantized by RTN or GPTQ (or by SparseGPT in the same sweep)
holds many such codes, and a dense packed layout spends ``bits`` on every one of them. This
layout keeps instead

* where the non-zero codes are: a bitmask (one bit per weight, row-major, least significant bit
  first; :func:`~llmslim.prune.pack_bits`), or for an N:M pattern the positions of the N stored
  codes of every group of M, ``ceil(log2 M)`` bits each (the layout 2:4 sparse kernels take);
* the non-zero codes themselves, packed ``bits`` bits each in offset binary (code ``q`` stored
  as ``q + 2**(bits-1)``), in row-major order (N per group for N:M, zero codes filling groups
  that hold fewer);
* the group scales and zero points, exactly as :class:`~llmslim.quant.QuantLinear` holds them.

50% unstructured int4 with groups of 64 and bfloat16 scales: ``1/8`` (mask) ``+ 1/4`` (codes of
half the weights) ``+ 3/64`` (scale and zero point per group) ``= 0.42`` bytes per weight, against
``0.56`` packed dense; 2:4 the same with 2-bit indices in place of the mask.

The forward rebuilds the codes, dequantizes them and runs one GEMM (bfloat16 on CPUs that
multiply it natively, as :class:`~llmslim.quant.QuantLinear` does for many tokens): the very
weight the dense codes stand for, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from ..prune._storage import pack_bits, pack_ints, unpack_bits, unpack_ints
from ._functional import BITS, code_range, dequantize, expand_groups, num_groups
from ._kernels import cpu_gemm_dtype
from ._linear import QuantLinear

__all__ = ["SparseQuantLinear", "quantized_layer", "sparse_note", "sparse_or_packed"]

_NM_CANDIDATES = (2, 4, 8)  # group lengths M tried for the index format (1:2, 2:4, 1:4, 2:8 ...)


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _zero_codes(zero: torch.Tensor | None, shape: tuple[int, int], group_size: int | None) -> torch.Tensor:
    # each weight's zero point (the code of 0.0) as int8 (out, in)
    if zero is None:
        return torch.zeros(shape, dtype=torch.int8)
    return expand_groups(zero.to(torch.int8), shape[1], group_size)


def _layout(nonzero: torch.Tensor, bits: int) -> tuple[int, int]:
    """``(N, M)`` of the index format for ``nonzero``, or ``(0, 0)`` for the bitmask.

    As for :class:`~llmslim.prune.SparseLinear`: the index format applies when every group of M
    holds at most N non-zeros and ``N * ceil(log2 M) <= M`` (then it is no larger than a bitmask
    at the pattern's density: 2:4, 1:4, 2:8 ...); of several, the smallest.
    """
    rows, cols = nonzero.shape
    best, best_bytes = (0, 0), math.inf
    for m in _NM_CANDIDATES:
        if cols % m or nonzero.numel() == 0:
            continue
        n = max(1, int(nonzero.view(rows, -1, m).sum(dim=-1).max()))
        if n >= m or n * _index_bits(m) > m:
            continue
        kept = nonzero.numel() // m * n
        size = math.ceil(kept * bits / 8) + math.ceil(kept * _index_bits(m) / 8)
        if size < best_bytes:
            best, best_bytes = (n, m), size
    return best


class SparseQuantLinear(nn.Module):
    """A linear layer whose quantized weight stores only its non-zero codes (see module docs).

    Args:
        codes: Integer codes ``(out, in)`` (int8 values of ``bits`` bits).
        scale: Scales ``(out, groups)`` (their dtype is kept).
        zero: Integer zero points ``(out, groups)``, or ``None`` for a symmetric grid.
        bits: 2, 3, 4 or 8.
        group_size: Columns per scale (a shorter last group where it does not divide the row),
            or ``None`` for one per output channel.
        bias: The bias (kept as a parameter), or ``None``.
        weight_dtype: Dtype of the original weight: what ``weight`` and ``dequantize`` return.

    Attributes:
        format: ``"bitmask"`` or ``"nm"`` (then ``n``, ``m`` give the pattern).
        weight_bits: Stored bits of codes and mask (or indices) per weight, scales excluded.
        bytes_per_weight: All stored bytes (codes, mask or indices, scales, zero points) per weight.
        weight_sparsity: The fraction of weights that are exactly zero.

    Raises:
        ConfigError: Shapes or settings that do not fit together.

    Example:
        >>> import torch
        >>> codes = torch.tensor([[0, 5, 0, -3], [0, 0, 7, 1]], dtype=torch.int8)
        >>> scale = torch.tensor([[0.5], [0.25]])
        >>> layer = SparseQuantLinear(codes, scale, None, bits=4, group_size=None)
        >>> layer.format, layer.weight_sparsity, layer.weight.tolist()
        ('nm', 0.5, [[0.0, 2.5, 0.0, -1.5], [0.0, 0.0, 1.75, 0.25]])
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
                 group_size: int | None, bias: torch.Tensor | None = None, weight_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if bits not in BITS:
            raise ConfigError(f"SparseQuantLinear: bits must be one of {', '.join(map(str, BITS))} (got {bits!r})")
        if codes.dim() != 2 or codes.is_floating_point():
            raise ConfigError(f"SparseQuantLinear: codes must be a 2-D integer tensor (got {codes.dtype} {tuple(codes.shape)})")
        out_features, in_features = codes.shape
        groups = num_groups(in_features, group_size)
        if tuple(scale.shape) != (out_features, groups) or (zero is not None and tuple(zero.shape) != (out_features, groups)):
            raise ConfigError(f"SparseQuantLinear: scale and zero must have shape {(out_features, groups)} (got {tuple(scale.shape)})")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = None if group_size is None or group_size >= in_features else group_size
        self.groups, self.symmetric, self.weight_dtype = groups, zero is None, weight_dtype
        device = codes.device
        codes = codes.to(torch.int8)
        nonzero = codes != _zero_codes(zero, (out_features, in_features), self.group_size).to(device)
        qmin, _ = code_range(bits)
        self.n, self.m = _layout(nonzero.cpu(), bits)
        if self.m:
            self.format = "nm"
            groups_nz = nonzero.view(out_features, -1, self.m)
            # the N positions of each group: its non-zero codes first, then (padding) its first zeros
            index = (~groups_nz).to(torch.uint8).argsort(dim=-1, stable=True)[..., : self.n].sort(dim=-1).values
            values = codes.view(out_features, -1, self.m).gather(-1, index)
            self.register_buffer("indices", pack_ints(index, _index_bits(self.m)))
        else:
            self.format = "bitmask"
            values = codes[nonzero]
            self.register_buffer("bitmask", pack_bits(nonzero))
        self.count = values.numel()
        self.register_buffer("qvalues", pack_ints((values.to(torch.int16) - qmin).flatten(), bits))
        self.register_buffer("scales", scale.detach().clone())
        if zero is not None:
            self.register_buffer("zeros", zero.detach().to(torch.int8).clone())
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", bias)
        numel = out_features * in_features
        self.weight_sparsity = (numel - int(nonzero.sum())) / numel
        meta = self.indices if self.m else self.bitmask
        self.weight_bits = (meta.numel() + self.qvalues.numel()) * 8 / numel
        self.logical_params = numel + (0 if bias is None else bias.numel())

    @classmethod
    def from_quant(cls, layer: QuantLinear) -> SparseQuantLinear:
        """The same weight as a :class:`~llmslim.quant.QuantLinear`, stored sparse.

        Example:
            >>> import torch
            >>> lin = torch.nn.Linear(64, 8)
            >>> with torch.no_grad():
            ...     _ = lin.weight.mul_(torch.rand(8, 64) > 0.5)
            >>> q = QuantLinear.from_float(lin, bits=4, group_size=32)
            >>> torch.equal(SparseQuantLinear.from_quant(q).dequantize(), q.dequantize())
            True
        """
        state = layer.packed_state()
        return cls(layer.codes(), state["scales"], state.get("zeros"), bits=layer.bits, group_size=layer.group_size,
                   bias=layer.bias, weight_dtype=layer.weight_dtype)

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this layer from (see :mod:`llmslim.io`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None, "scale_dtype": dtype_name(self.scales.dtype),
                "weight_dtype": dtype_name(self.weight_dtype), "format": self.format, "n": self.n, "m": self.m, "count": self.count,
                "weight_sparsity": self.weight_sparsity}

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> SparseQuantLinear:
        """An empty layer (``meta`` tensors of the stored shapes) of :meth:`checkpoint_config`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        out, inp, bits, count = cfg["out_features"], cfg["in_features"], cfg["bits"], cfg["count"]
        if bits not in BITS or cfg["format"] not in ("nm", "bitmask"):
            raise ConfigError(f"SparseQuantLinear: bits must be one of {BITS} and format 'nm' or 'bitmask' (got {bits!r}, {cfg['format']!r})")
        new.in_features, new.out_features, new.bits, new.count = inp, out, bits, count
        new.group_size = None if cfg["group_size"] is None or cfg["group_size"] >= inp else cfg["group_size"]
        new.groups, new.symmetric = num_groups(inp, cfg["group_size"]), cfg["symmetric"]
        new.weight_dtype, new.format, new.n, new.m = dtype_from_name(cfg["weight_dtype"]), cfg["format"], cfg["n"], cfg["m"]
        meta = dict(dtype=torch.uint8, device="meta")
        if new.format == "nm":
            new.register_buffer("indices", torch.empty(math.ceil(count * _index_bits(new.m) / 8), **meta))
        else:
            new.register_buffer("bitmask", torch.empty(math.ceil(out * inp / 8), **meta))
        new.register_buffer("qvalues", torch.empty(math.ceil(count * bits / 8), **meta))
        new.register_buffer("scales", torch.empty(out, new.groups, dtype=dtype_from_name(cfg["scale_dtype"]), device="meta"))
        if not new.symmetric:
            new.register_buffer("zeros", torch.empty(out, new.groups, dtype=torch.int8, device="meta"))
        bias = nn.Parameter(torch.empty(out, dtype=new.weight_dtype, device="meta"), requires_grad=False) if cfg["bias"] else None
        new.register_parameter("bias", bias)
        stored = (new.indices if new.m else new.bitmask).numel() + new.qvalues.numel()
        new.weight_sparsity, new.weight_bits = float(cfg["weight_sparsity"]), stored * 8 / (out * inp)
        new.logical_params = out * inp + (out if cfg["bias"] else 0)
        return new

    # -- the weight -----------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The integer codes ``(out, in)`` int8, zero points where the weight is zero."""
        out, inp = self.out_features, self.in_features
        qmin, _ = code_range(self.bits)
        values = (unpack_ints(self.qvalues, self.count, self.bits) + qmin).to(torch.int8)
        dense = _zero_codes(self._buffers.get("zeros"), (out, inp), self.group_size).to(values.device).contiguous()
        if self.m:
            index = unpack_ints(self.indices, self.count, _index_bits(self.m)).view(out, -1, self.n)
            return dense.view(out, -1, self.m).scatter_(-1, index, values.view(out, -1, self.n)).view(out, inp)
        flat = dense.flatten()
        flat[unpack_bits(self.bitmask, out * inp)] = values
        return flat.view(out, inp)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out, in)``: ``(q - z) * s``, exactly 0.0 where pruned, in ``dtype``
        (default: the original weight's)."""
        return dequantize(self.codes(), self.scales, self._buffers.get("zeros"), group_size=self.group_size,
                          dtype=dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight``."""
        return self.dequantize()

    @property
    def bytes_per_weight(self) -> float:
        """Bytes of codes, mask or indices, scales and zero points per weight."""
        held = sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)
        return held / (self.out_features * self.in_features)

    @property
    def kernel(self) -> str:
        """The forward's path: rebuild the codes, dequantize, one GEMM (no sparse low-bit kernel on CPU)."""
        return "dequant_gemm_bf16" if self.qvalues.device.type == "cpu" and cpu_gemm_dtype() == torch.bfloat16 else "dequant_gemm"

    @property
    def prefill_kernel(self) -> str:
        """The path of a many-token forward: the same as :attr:`kernel`."""
        return self.kernel

    # -- forward and devices ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseQuantLinear: input's last dimension must be {self.in_features} (got shape {tuple(x.shape)})")
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            gemm = cpu_gemm_dtype()  # as QuantLinear's many-token path: bfloat16 where the CPU has it
            y = F.linear(x2.to(gemm), self.dequantize(gemm)).to(x.dtype)
            if self.bias is not None:
                y.add_(self.bias.to(y.dtype))
        else:
            y = F.linear(x2, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> SparseQuantLinear:
        # Move the stored tensors, never cast them (the scale dtype is a choice, not the model's
        # dtype); a cast changes the dtype the weight is rebuilt in.
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qvalues.device))
        self.weight_dtype = probe.dtype
        held = {n: t.to(probe.device) for n, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        self._buffers.update(held)
        return self

    def extra_repr(self) -> str:
        pattern = f", pattern={self.n}:{self.m}" if self.m else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, format={self.format}{pattern}, "
            f"sparsity={self.weight_sparsity:.3f}, bias={self.bias is not None}"
        )


def sparse_or_packed(layer: QuantLinear) -> tuple[nn.Module, bool]:
    """``layer`` as a :class:`SparseQuantLinear` when its codes and mask take fewer bits than the
    dense codes (the scales are the same in both), else ``layer``.

    Returns:
        ``(module, stored_sparse)``.

    Example:
        >>> import torch
        >>> dense = QuantLinear.from_float(torch.nn.Linear(64, 8), bits=4, group_size=32)
        >>> sparse_or_packed(dense)[1]   # no zeros to drop: the packed layer is smaller
        False
    """
    sparse = SparseQuantLinear.from_quant(layer)
    return (sparse, True) if sparse.weight_bits < layer.bits else (layer, False)


def quantized_layer(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int, group_size: int | None,
                    bias: torch.Tensor | None, weight_dtype: torch.dtype, sparse: bool) -> tuple[nn.Module, str]:
    """The layer for codes a calibrated method chose: ``(module, storage)``.

    ``sparse=False``: a packed :class:`~llmslim.quant.QuantLinear` (``"packed"``). ``sparse=True``:
    a :class:`SparseQuantLinear` (``"bitmask"`` or ``"nm"``) when its codes and mask take fewer
    bits than the dense codes, else the packed layer (built only then: its CPU kernel layout costs
    a repacking).

    Example:
        >>> codes = torch.tensor([[0, 3, 0, 0], [0, 0, -2, 0]], dtype=torch.int8)
        >>> quantized_layer(codes, torch.ones(2, 1), None, bits=4, group_size=None, bias=None,
        ...                 weight_dtype=torch.float32, sparse=True)[1]
        'nm'
    """
    if sparse:
        layer = SparseQuantLinear(codes, scale, zero, bits=bits, group_size=group_size, bias=bias, weight_dtype=weight_dtype)
        if layer.weight_bits < bits:
            return layer, layer.format
    packed = QuantLinear.from_codes(codes, scale, zero, bits=bits, group_size=group_size, bias=bias, weight_dtype=weight_dtype)
    return packed, "packed"


def sparse_note(packed: list[str]) -> str:
    """The report note for ``storage="sparse"`` layers that stayed packed."""
    shown = ", ".join(packed[:4]) + (f" and {len(packed) - 4} more" if len(packed) > 4 else "")
    return f"storage='sparse': {len(packed)} layer(s) kept packed, too few zeros for sparse storage to be smaller: {shown}"
