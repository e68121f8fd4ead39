"""Compressed storage of pruned linear layers: a bitmask or N:M indices, plus the non-zero values.

Two formats, both exact (the forward reconstructs the very weight that was stored):

* ``bitmask``: one bit per weight (row-major, least significant bit first) and the non-zero
  values in order; 50% unstructured in float16 takes ``1/8 + 1`` bytes per two weights, 0.5625
  of dense float16;
* ``nm``: for an N:M pattern, the N kept values of every group of M and their positions in the
  group, ``ceil(log2 M)`` bits each; 2:4 in float16 is also 0.5625 of dense float16, and its
  layout is what 2:4 sparse kernels take. Used when it is no larger than the bitmask
  (``N * ceil(log2 M) <= M``: 1:2, 2:4, 1:4, ...).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from ._mask import rows_view

__all__ = ["pack_bits", "unpack_bits", "pack_ints", "unpack_ints", "storage_bytes", "SparseLinear", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened) into ``uint8``, eight per byte, least significant bit first.

    Example:
        >>> pack_bits(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist()
        [13, 1]
    """
    flat = bits.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a boolean tensor.

    Example:
        >>> unpack_bits(torch.tensor([13, 1], dtype=torch.uint8), 9).int().tolist()
        [1, 0, 1, 1, 0, 0, 0, 0, 1]
    """
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.flatten()[:count].bool()


def pack_ints(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` into a bit stream of ``bits`` bits each.

    Example:
        >>> unpack_ints(pack_ints(torch.tensor([0, 3, 1, 2, 2]), 2), 5, 2).tolist()
        [0, 3, 1, 2, 2]
    """
    flat = values.flatten()
    if 8 % bits == 0:  # whole values per byte (1, 2, 4 bits): a few shifts, no bit stream
        per = 8 // bits
        small = flat.to(torch.uint8)
        pad = (-small.numel()) % per
        if pad:
            small = torch.cat([small, small.new_zeros(pad)])
        small = small.view(-1, per)
        out = small[:, 0].clone()
        for k in range(1, per):
            out |= small[:, k] << (k * bits)
        return out
    flat = flat.to(torch.int64)
    stream = (flat.unsqueeze(-1) >> torch.arange(bits, device=flat.device)) & 1
    return pack_bits(stream.bool())


def unpack_ints(packed: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_ints`: ``count`` integers as ``int64``."""
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten()[:count].to(torch.int64)
    stream = unpack_bits(packed, count * bits).view(count, bits).to(torch.int64)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1)


def _index_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _nm_fits(rows: torch.Tensor, n_m: tuple[int, int] | None) -> bool:
    # The N:M index format applies when every full row splits into groups of M holding at most
    # N non-zeros, and it is no larger than a bitmask.
    if n_m is None:
        return False
    n, m = n_m
    if rows.shape[1] % m or n * _index_bits(m) > m or rows.numel() == 0:
        return False
    groups = (rows != 0).reshape(rows.shape[0], -1, m).sum(dim=-1)
    return bool((groups <= n).all())


def storage_bytes(rows: torch.Tensor, value_dtype: torch.dtype | None = None, n_m: tuple[int, int] | None = None) -> dict[str, int]:
    """Weight bytes of ``rows`` (a pruned weight as ``[out, in]``) in each storage form.

    Keys: ``bytes_dense`` (as stored now), ``bytes_fp16`` (dense float16), ``bytes_bitmask``,
    and ``bytes_nm`` when the N:M index format applies. Values take ``value_dtype`` (default:
    the weight's dtype). These are the exact buffer sizes :class:`SparseLinear` allocates.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 4.0, 0.0]])
        >>> storage_bytes(w, torch.float16, (2, 4))
        {'bytes_dense': 32, 'bytes_fp16': 16, 'bytes_bitmask': 9, 'bytes_nm': 9}
    """
    vdt = value_dtype or rows.dtype
    vb = torch.empty((), dtype=vdt).element_size()
    numel, nnz = rows.numel(), int((rows != 0).sum())
    out = {
        "bytes_dense": numel * rows.element_size(),
        "bytes_fp16": numel * 2,
        "bytes_bitmask": math.ceil(numel / 8) + nnz * vb,
    }
    if _nm_fits(rows, n_m):
        n, m = n_m  # type: ignore[misc]
        kept = numel // m * n
        out["bytes_nm"] = kept * vb + math.ceil(kept * _index_bits(m) / 8)
    return out


class SparseLinear(nn.Module):
    """A linear layer storing its pruned weight compressed; the forward reconstructs it.

    On CUDA, a 2:4 layer with float16 or bfloat16 inputs runs through
    ``torch.sparse.to_sparse_semi_structured`` (the sparse tensor-core kernel) where the shape
    and hardware allow; everywhere else the dense weight is rebuilt and ``F.linear`` runs.

    Args:
        weight: The pruned weight as ``[out, in]`` (zeros are pruned).
        bias: The bias parameter (kept as is), or ``None``.
        value_dtype: dtype of the stored values (default: the weight's). The forward computes
            in the weight's original dtype.
        n_m: The N:M pattern, if any: the index format is used when it fits (see module docs).

    Attributes:
        format: ``"bitmask"`` or ``"nm"``.
        weight: The dense weight, rebuilt on each access (read-only).
        weight_bits, weight_sparsity, logical_params: What ``module_stats`` reports: stored
            weight bits per logical weight (values and metadata), the fraction of zeros, and
            the parameters the layer represents.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 4.0, 0.0]])
        >>> layer = SparseLinear(w, None, value_dtype=torch.float16, n_m=(2, 4))
        >>> layer.format, torch.equal(layer.weight, w), layer.weight_bits
        ('nm', True, 9.0)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, value_dtype: torch.dtype | None = None,
                 n_m: tuple[int, int] | None = None) -> None:
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ConfigError(f"SparseLinear: weight must be a 2-D floating tensor [out, in] (got {weight.dtype} {tuple(weight.shape)})")
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype
        vdt = value_dtype or weight.dtype
        if _nm_fits(weight, n_m):
            self.format = "nm"
            self.n, self.m = n_m  # type: ignore[misc]
            groups = weight.reshape(self.out_features, -1, self.m)
            # the N positions of each group: its non-zeros first, then (padding) the first zeros
            order = (groups == 0).to(torch.uint8).argsort(dim=-1, stable=True)[..., : self.n]
            index = order.sort(dim=-1).values
            self.register_buffer("values", groups.gather(-1, index).reshape(self.out_features, -1).to(vdt))
            self.register_buffer("indices", pack_ints(index, _index_bits(self.m)))
        else:
            self.format = "bitmask"
            self.n, self.m = 0, 0
            nonzero = weight != 0
            self.register_buffer("bitmask", pack_bits(nonzero))
            self.register_buffer("values", weight[nonzero].to(vdt))
        self.register_parameter("bias", bias if isinstance(bias, nn.Parameter) or bias is None else nn.Parameter(bias))
        numel = weight.numel()
        stored = sum(b.numel() * b.element_size() for b in self.buffers())
        self.weight_bits = stored * 8 / numel if numel else 0.0
        # every weight not among the values is zero, and so is a value that rounded to zero
        nonzero = int(torch.count_nonzero(self.values))
        self.weight_sparsity = (numel - nonzero) / numel if numel else 0.0
        self.logical_params = numel + (0 if self.bias is None else self.bias.numel())
        self._sparse_cache: tuple | None = None

    @classmethod
    def from_module(cls, module: nn.Module, *, value_dtype: torch.dtype | None = None, n_m: tuple[int, int] | None = None) -> SparseLinear:
        """A SparseLinear computing what ``module`` (``nn.Linear`` or Hugging Face ``Conv1D``) computes."""
        weight = rows_view(module, module.weight.detach())
        return cls(weight, getattr(module, "bias", None), value_dtype=value_dtype, n_m=n_m)

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this layer from (see :mod:`llmslim.io`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "compute_dtype": dtype_name(self.compute_dtype), "value_dtype": dtype_name(self.values.dtype), "format": self.format,
                "n": self.n, "m": self.m, "count": self.values.numel(), "weight_sparsity": self.weight_sparsity}

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> SparseLinear:
        """An empty layer (``meta`` tensors of the stored shapes) of :meth:`checkpoint_config`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        out, inp, count, fmt = cfg["out_features"], cfg["in_features"], cfg["count"], cfg["format"]
        if fmt not in ("nm", "bitmask"):
            raise ConfigError(f"SparseLinear: format must be 'nm' or 'bitmask' (got {fmt!r})")
        new.out_features, new.in_features, new.format, new.n, new.m = out, inp, fmt, cfg["n"], cfg["m"]
        new.compute_dtype = dtype_from_name(cfg["compute_dtype"])
        vdt = dtype_from_name(cfg["value_dtype"])
        if fmt == "nm":
            new.register_buffer("values", torch.empty(out, count // max(1, out), dtype=vdt, device="meta"))
            new.register_buffer("indices", torch.empty(math.ceil(count * _index_bits(new.m) / 8), dtype=torch.uint8, device="meta"))
        else:
            new.register_buffer("bitmask", torch.empty(math.ceil(out * inp / 8), dtype=torch.uint8, device="meta"))
            new.register_buffer("values", torch.empty(count, dtype=vdt, device="meta"))
        new.register_parameter("bias", nn.Parameter(torch.empty(out, dtype=new.compute_dtype, device="meta")) if cfg["bias"] else None)
        stored = sum(b.numel() * b.element_size() for b in new.buffers())
        new.weight_bits = stored * 8 / (out * inp) if out * inp else 0.0
        new.weight_sparsity, new.logical_params = float(cfg["weight_sparsity"]), out * inp + (out if cfg["bias"] else 0)
        new._sparse_cache = None
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight, rebuilt from the stored form."""
        out, inp, dt = self.out_features, self.in_features, self.compute_dtype
        values = self.values
        if self.format == "nm":
            count = values.numel()
            index = unpack_ints(self.indices, count, _index_bits(self.m)).view(out, -1, self.n)
            dense = torch.zeros(out, inp // self.m, self.m, dtype=dt, device=values.device)
            dense.scatter_(-1, index, values.view(out, -1, self.n).to(dt))
            return dense.view(out, inp)
        dense = torch.zeros(out * inp, dtype=dt, device=values.device)
        dense[unpack_bits(self.bitmask, out * inp)] = values.to(dt)
        return dense.view(out, inp)

    def _semi_structured(self, x: torch.Tensor) -> torch.Tensor | None:
        # The CUDA 2:4 kernel, built once per device and dtype; None where it cannot run.
        if not (x.is_cuda and self.format == "nm" and (self.n, self.m) == (2, 4) and x.dtype in (torch.float16, torch.bfloat16)):
            return None
        key = (x.device, x.dtype)
        if self._sparse_cache is None or self._sparse_cache[0] != key:
            try:
                from torch.sparse import to_sparse_semi_structured

                sparse = to_sparse_semi_structured(self.weight.to(device=x.device, dtype=x.dtype))
            except (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError):
                sparse = None  # a shape or GPU the kernel does not take: the dense path is correct
            self._sparse_cache = (key, sparse)
        return self._sparse_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = self._semi_structured(x)
        if sparse is not None:
            try:
                bias = None if self.bias is None else self.bias.to(x.dtype)
                flat = F.linear(x.reshape(-1, self.in_features), sparse, bias)
                return flat.view(*x.shape[:-1], self.out_features)
            except (RuntimeError, NotImplementedError):
                self._sparse_cache = (self._sparse_cache[0], None)  # type: ignore[index]
        weight = self.weight
        if x.is_floating_point() and weight.dtype != x.dtype:  # e.g. after model.half(): compute as the input
            weight = weight.to(x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        pattern = f", pattern={self.n}:{self.m}" if self.format == "nm" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.format}{pattern}, values={str(self.values.dtype).removeprefix('torch.')}, "
            f"sparsity={self.weight_sparsity:.3f}"
        )
