"""The GPTQ tensor layout the wider ecosystem loads (AutoGPTQ, GPTQModel, transformers, vLLM ...).

One quantized linear layer ``(out, in)`` with ``bits`` in {2, 4, 8}, ``pf = 32 // bits`` codes
per 32-bit word and ``G`` groups is four tensors:

* ``qweight`` int32 ``(in / pf, out)``: the unsigned codes ``u`` (``0 <= u < 2**bits``) packed
  along the *input* dimension, word ``r`` of column ``n`` holding inputs ``r*pf .. r*pf+pf-1``,
  input ``r*pf + j`` in bits ``bits*j .. bits*j+bits-1`` (the lowest bits first);
* ``qzeros`` int32 ``(G, out / pf)``: the unsigned zero points ``uz`` packed the same way along
  the *output* dimension. Format ``"v1"`` (AutoGPTQ, ``checkpoint_format: "gptq"``) stores
  ``uz - 1``, format ``"v2"`` (GPTQModel's ``"gptq_v2"``) stores ``uz`` itself. A symmetric grid
  has ``uz = 2**(bits-1)`` everywhere (8 at 4 bits, so v1 words read ``0x77777777``);
* ``scales`` ``(G, out)``, float16 in the ecosystem;
* ``g_idx`` int32 ``(in,)``: the group of every input column.

The weight is ``W[n, k] = (u[n, k] - uz[g, n]) * scales[g, n]`` with ``g = g_idx[k]``. Our
signed codes map one to one: ``u = q + 2**(bits-1)``, ``uz = z + 2**(bits-1)`` (``z = 0`` when
symmetric), so the conversion is exact both ways, except that

* v1 cannot store a zero point ``uz = 0`` (``-1`` does not fit the field; loaders that add
  ``0x11111111`` to convert v1 to v2 would carry into the next field): :func:`to_gptq_tensors`
  refuses such a layer in v1, use ``format="v2"`` (or a symmetric grid);
* scales are converted to ``dtype`` (float16 by default): bfloat16 scales above ``2**-17`` and
  below 65504 are float16 numbers, so the usual ones convert exactly; float32 scales round;
* 3-bit layers (whose GPTQ packing spans word boundaries) are refused.

A last group shorter than the others (``in % group_size != 0``) is expressed by ``g_idx``; most
loaders assume ``in % group_size == 0`` and will not load such layers. Act-order checkpoints
whose ``g_idx`` scatters a group's columns over the row (``desc_act`` without static groups)
cannot be expressed by our contiguous groups and are refused by :func:`from_gptq_tensors`.

Example:
    >>> import torch
    >>> from llmslim.quant import QuantLinear, to_gptq_tensors, from_gptq_tensors
    >>> layer = QuantLinear.from_float(torch.nn.Linear(64, 32, bias=False), bits=4, group_size=32)
    >>> t = to_gptq_tensors(layer)
    >>> {k: tuple(v.shape) for k, v in t.items()}
    {'qweight': (8, 32), 'qzeros': (2, 4), 'scales': (2, 32), 'g_idx': (64,)}
    >>> back = from_gptq_tensors(t, bits=4, group_size=32, sym=False, in_features=64, out_features=32)
    >>> torch.equal(back.codes(), layer.codes())
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ._linear import QuantLinear

__all__ = ["GPTQ_BITS", "GPTQ_FORMATS", "to_gptq_tensors", "from_gptq_tensors", "pack_int32", "unpack_int32"]

GPTQ_BITS: tuple[int, ...] = (2, 4, 8)
GPTQ_FORMATS: tuple[str, ...] = ("v1", "v2")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_bits(bits: object, owner: str) -> int:
    if bits == 3:
        raise ConfigError(f"{owner}: 3-bit layers are not supported in the GPTQ layout (its 3-bit packing spans word boundaries); use 2, 4 or 8 bits")
    if isinstance(bits, bool) or bits not in GPTQ_BITS:
        raise ConfigError(f"{owner}: bits must be one of 2, 4, 8 (got {bits!r})")
    return int(bits)  # type: ignore[arg-type]


def _check_format(fmt: object, owner: str) -> None:
    if fmt not in GPTQ_FORMATS:
        raise ConfigError(f"{owner}: format must be 'v1' or 'v2' (got {fmt!r})")


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values ``(rows, cols)`` along the last dimension into int32
    words ``(rows, cols * bits / 32)``, the earliest value in the lowest bits.

    Example:
        >>> pack_int32(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4)
        tensor([[-144358623]], dtype=torch.int32)
        >>> hex(-144358623 & 0xFFFFFFFF)
        '0xf7654321'
    """
    per = 32 // bits
    rows, cols = u.shape
    fields = u.to(torch.int64).reshape(rows, cols // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=u.device)
    word = (fields << shifts).sum(dim=-1)  # fields do not overlap: the sum is a bitwise or
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same 32 bits, two's complement


def unpack_int32(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned values ``(rows, cols * 32 / bits)`` int16 that :func:`pack_int32` packed.

    Example:
        >>> unpack_int32(torch.tensor([[-144358623]], dtype=torch.int32), 4)
        tensor([[ 1,  2,  3,  4,  5,  6,  7, 15]], dtype=torch.int16)
    """
    rows, cols = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=words.device)
    return ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(rows, cols * (32 // bits)).to(torch.int16)


def to_gptq_tensors(layer: QuantLinear, *, dtype: torch.dtype = torch.float16, format: str = "v1") -> dict[str, torch.Tensor]:
    """A :class:`QuantLinear` as GPTQ tensors ``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}``.

    Args:
        layer: The layer (2, 4 or 8 bits; ``in_features`` and ``out_features`` multiples of
            ``32 / bits``; not a tied output layer).
        dtype: Dtype of ``scales`` and ``bias``: float16 (what the ecosystem reads), bfloat16
            or float32.
        format: ``"v1"`` (zero points stored minus one) or ``"v2"`` (stored as they are).

    Returns:
        The tensors, on the layer's device.

    Raises:
        ConfigError: A layer the layout cannot hold: 3 bits, shapes that do not pack, a tied
            layer, a zero point of 0 in v1, or scales that overflow ``dtype``.
    """
    owner = "to_gptq_tensors"
    if not isinstance(layer, QuantLinear):
        raise ConfigError(f"{owner}: layer must be a QuantLinear (got {type(layer).__name__})")
    bits = _check_bits(layer.bits, owner)
    _check_format(format, owner)
    if dtype not in _FLOATS:
        raise ConfigError(f"{owner}: dtype must be float16, bfloat16 or float32 (got {dtype!r})")
    if layer._tied_to is not None:
        raise ConfigError(f"{owner}: a tied output layer shares its embedding's int8 table; the GPTQ layout has no tied layers")
    per, k, n = 32 // bits, layer.in_features, layer.out_features
    if k % per or n % per:
        raise ConfigError(f"{owner}: in_features and out_features must be multiples of {per} at {bits} bits (got {k} and {n})")
    q, scales, zeros = layer._unpacked()
    offset = 2 ** (bits - 1)
    u = q.to(torch.int16) + offset
    uz = torch.full(scales.shape, offset, dtype=torch.int16, device=q.device) if zeros is None else zeros.to(torch.int16) + offset
    if format == "v1":
        if bool((uz == 0).any()):
            raise ConfigError(f"{owner}: a zero point is 0, which the v1 format cannot store (it stores zero - 1); use format='v2' or a symmetric grid")
        uz = uz - 1
    s = scales.t().to(dtype).contiguous()
    if not bool(torch.isfinite(s).all()):
        raise ConfigError(f"{owner}: scales overflow {str(dtype).replace('torch.', '')} (largest {float(scales.float().abs().max()):g})")
    group = layer.group_size or k
    out = {
        "qweight": pack_int32(u, bits).t().contiguous(),
        "qzeros": pack_int32(uz.t(), bits),
        "scales": s,
        "g_idx": (torch.arange(k, device=q.device) // group).to(torch.int32),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().to(dtype)
    return out


def _expect(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
    t = tensors[name]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise CheckpointError(f"GPTQ tensor {name!r}: shape {tuple(getattr(t, 'shape', ()))}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise CheckpointError(f"GPTQ tensor {name!r}: dtype {t.dtype}, expected {dtype}")
    return t


def _group_of_blocks(g_idx: torch.Tensor, in_features: int, group: int, stored_groups: int) -> torch.Tensor:
    # Our groups are contiguous runs of `group` columns. g_idx fits them when it is constant
    # on each run (groups may be numbered in any order: the scales are gathered by run).
    g = g_idx.to(torch.int64)
    if bool((g < 0).any()) or bool((g >= stored_groups).any()):
        raise CheckpointError(f"GPTQ tensor 'g_idx': group indices must lie in [0, {stored_groups}) (got {int(g.min())} .. {int(g.max())})")
    starts = torch.arange(0, in_features, group, device=g.device)
    first = g[starts]
    if not torch.equal(g, first.repeat_interleave(group)[:in_features]):
        raise ConfigError(
            "from_gptq_tensors: g_idx scatters a group's columns over the row (an act-order / desc_act checkpoint "
            f"without static groups); QuantLinear's groups are contiguous runs of {group} columns, so this layer "
            "cannot be expressed without permuting its inputs"
        )
    return first


def from_gptq_tensors(
    tensors: Mapping[str, torch.Tensor],
    *,
    bits: int,
    group_size: int | None,
    sym: bool,
    in_features: int,
    out_features: int,
    bias: torch.Tensor | None = None,
    format: str = "v1",
    scale_dtype: torch.dtype | None = None,
    weight_dtype: torch.dtype = torch.float32,
) -> QuantLinear:
    """A :class:`QuantLinear` from GPTQ tensors (the inverse of :func:`to_gptq_tensors`).

    Args:
        tensors: ``qweight``, ``scales``, ``qzeros`` (may be absent when ``sym``), ``g_idx``
            (optional: absent means contiguous groups), ``bias`` (optional).
        bits: 2, 4 or 8.
        group_size: Columns per group; ``None`` or ``-1``: one group per output channel.
        sym: Symmetric checkpoint: every zero point must be ``2**(bits-1)``.
        in_features / out_features: Shape of the weight ``(out, in)``.
        bias: The bias (overrides ``tensors["bias"]``).
        format: ``"v1"`` or ``"v2"`` (see the module docstring).
        scale_dtype: Dtype of the layer's scales (default: the checkpoint's).
        weight_dtype: Dtype of the layer's output weight and bias (the model's).

    Returns:
        The layer, on the tensors' device.

    Raises:
        ConfigError: Bad settings, or a ``g_idx`` our contiguous groups cannot express.
        CheckpointError: A missing tensor, a shape or dtype that does not fit, a zero point
            outside the grid.
    """
    owner = "from_gptq_tensors"
    bits = _check_bits(bits, owner)
    _check_format(format, owner)
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{owner}: {name} must be a positive integer (got {value!r})")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1)):
        raise ConfigError(f"{owner}: group_size must be a positive integer, -1 or None (got {group_size!r})")
    k, n, per, offset = in_features, out_features, 32 // bits, 2 ** (bits - 1)
    if k % per or n % per:
        raise ConfigError(f"{owner}: in_features and out_features must be multiples of {per} at {bits} bits (got {k} and {n})")
    group = k if group_size is None or group_size == -1 or group_size >= k else group_size
    missing = [name for name in ("qweight", "scales") + (() if sym else ("qzeros",)) if name not in tensors]
    if missing:
        raise CheckpointError(f"GPTQ tensors missing: {', '.join(missing)}")
    qweight = _expect(tensors, "qweight", (k // per, n), torch.int32)
    scales = tensors["scales"]
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.shape[1] != n or not scales.is_floating_point():
        raise CheckpointError(f"GPTQ tensor 'scales': shape {tuple(getattr(scales, 'shape', ()))} {getattr(scales, 'dtype', '')}, expected (groups, {n}) floating point")
    stored = scales.shape[0]
    ours = math.ceil(k / group)
    if "g_idx" in tensors:
        blocks = _group_of_blocks(_expect(tensors, "g_idx", (k,), None), k, group, stored)
    elif stored == ours:
        blocks = torch.arange(ours, device=scales.device)
    else:
        raise CheckpointError(f"GPTQ tensor 'scales': {stored} groups without a g_idx, expected {ours}")
    u = unpack_int32(qweight.t(), bits)  # (out, in)
    if "qzeros" in tensors:
        uz = unpack_int32(_expect(tensors, "qzeros", (stored, n // per), torch.int32), bits)
        if format == "v1":
            if bool((uz == (1 << bits) - 1).any()):
                raise CheckpointError(f"GPTQ tensor 'qzeros': a v1 field holds {2**bits - 1}, i.e. zero point {2**bits}, outside the {bits}-bit grid (a v1 checkpoint whose zero point 0 was stored as -1)")
            uz = uz + 1
    else:
        uz = torch.full((stored, n), offset, dtype=torch.int16, device=qweight.device)
    uz = uz[blocks.to(uz.device)].t()  # (out, our groups)
    if sym and not bool((uz == offset).all()):
        raise CheckpointError(f"GPTQ tensor 'qzeros': sym=True but zero points other than {offset} are stored")
    zero = None if sym else (uz - offset).to(torch.int8)
    scale = scales[blocks.to(scales.device)].t().contiguous()
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    if bias is None:
        bias = tensors.get("bias")
    if bias is not None:
        bias = _expect({"bias": bias}, "bias", (n,), None).to(weight_dtype)
    codes = (u - offset).to(torch.int8).contiguous()
    return QuantLinear.from_codes(codes, scale, zero, bits=bits, group_size=None if group == k else group, bias=bias, weight_dtype=weight_dtype)
