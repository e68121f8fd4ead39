"""4-bit weights on CPU: to and from the kernel's layout, the few-token and many-token paths.

The kernel computes ``w = (u - 8) * s + m`` per group, ``u`` the offset-binary nibble; the
portable format's ``(q - z) * s`` is the same with ``u = q + 8`` and ``m = -z * s``. The
kernel's ``scale_zero`` tensor (bfloat16 ``(kernel groups, rows, 2)``) is then the only copy of
the scales when they are stored in bfloat16: the zero points come back exactly as
``round(-m / s)`` (``|z| <= 8`` and bfloat16's relative error 2**-9 keep the quotient within
1/64 of the integer).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ._kernels import workspace
from ._layout import Int4Plan, _Layout, pack_int4, unpack_int4, unpack_rows

__all__ = ["Int4State", "to_kernel", "from_kernel", "int4_decode", "int4_prefill"]

Int4State = Mapping[str, torch.Tensor]  # a layer's buffers: qweight, scale_zero [, qweight_rem, scale_zero_rem]
_CHUNK_WEIGHTS = 1 << 23  # dequantize this many weights at a time: few large ops (robust on a busy machine), bounded scratch


def _pad_rows(t: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]), value=value)


def to_kernel(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, plan: Int4Plan) -> tuple[Int4State, tuple[_Layout, ...]] | None:
    """Kernel tensors for codes ``q`` ``(out, in)`` int8, ``scale``/``zero`` ``(out, groups)``.

    Returns ``({"qweight", "scale_zero", ["qweight_rem", "scale_zero_rem"]}, layouts)`` or
    ``None`` when the packed layout could not be verified.
    """
    rows = plan.padded_out
    u = _pad_rows((q.to(torch.int16) + 8).to(torch.uint8), rows, 8)  # padding rows: code 0
    source = torch.tensor(plan.source, dtype=torch.long)
    s = scale.float()[:, source]
    m = torch.zeros_like(s) if zero is None else -zero.float()[:, source] * s
    sz = torch.stack([_pad_rows(s, rows, 1.0), _pad_rows(m, rows, 0.0)], dim=-1).to(torch.bfloat16)
    sz = sz.transpose(0, 1).contiguous()  # (kernel groups, rows, 2)
    state: dict[str, torch.Tensor] = {}
    layouts = []
    if plan.main:
        packed = pack_int4(u[:, : plan.main])
        if packed is None:
            return None
        state["qweight"], layout = packed
        state["scale_zero"] = sz[: plan.main_groups].contiguous()
        layouts.append(layout)
    if plan.rem:
        rem = F.pad(u[:, plan.main :], (0, plan.rem_padded - plan.rem), value=8)
        packed = pack_int4(rem)
        if packed is None:
            return None
        state["qweight_rem"], layout = packed
        state["scale_zero_rem"] = sz[plan.main_groups :].contiguous()
        layouts.append(layout)
    return state, tuple(layouts)


def from_kernel(state: Int4State, layouts: tuple[_Layout, ...], plan: Int4Plan, groups: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The portable ``(q, scale, zero)`` back from kernel tensors (scale in bfloat16)."""
    parts, sz, it = [], [], iter(layouts)
    if plan.main:
        parts.append(unpack_int4(state["qweight"], plan.padded_out, plan.main, next(it)))
        sz.append(state["scale_zero"])
    if plan.rem:
        parts.append(unpack_int4(state["qweight_rem"], plan.padded_out, plan.rem_padded, next(it))[:, : plan.rem])
        sz.append(state["scale_zero_rem"])
    n = plan.out_features
    q = (torch.cat(parts, dim=1)[:n].to(torch.int16) - 8).to(torch.int8)
    first = [plan.source.index(g) for g in range(groups)]  # a kernel group of each portable group
    sz_all = torch.cat(sz, dim=0)[first, :n]  # (groups, out, 2)
    scale = sz_all[..., 0].t().contiguous()
    zero = None if symmetric else torch.round(-sz_all[..., 1].float() / sz_all[..., 0].float()).t().to(torch.int8).contiguous()
    return q, scale, zero


def int4_decode(xb: torch.Tensor, state: Int4State, plan: Int4Plan) -> torch.Tensor:
    """``x @ W.T`` with the CPU int4 kernel, one call per segment; ``xb`` ``(M, in)`` bfloat16.
    Returns ``(M, padded_out)`` float32."""
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    y = None
    if plan.main:
        xm = xb[:, : plan.main].contiguous() if plan.rem else xb  # the kernel needs contiguous rows
        y = mm(xm, state["qweight"], plan.main_group, state["scale_zero"]).float()
    if plan.rem:
        xr = F.pad(xb[:, plan.main :], (0, plan.rem_padded - plan.rem))  # zero columns meet the padding
        yr = mm(xr, state["qweight_rem"], plan.rem_group, state["scale_zero_rem"]).float()
        y = yr if y is None else y.add_(yr)
    assert y is not None  # a plan has a main segment or a remainder
    return y


def int4_prefill(xb: torch.Tensor, state: Int4State, layouts: tuple[_Layout, ...], plan: Int4Plan, *, symmetric: bool, reuse: bool) -> torch.Tensor:
    """The many-token path: dequantize ``(u - 8) * s`` piece by piece into a reused bfloat16
    buffer, one GEMM; the offsets ``m`` (asymmetric grids) are added as ``sum(x) @ m`` per group.
    Returns ``(M, padded_out)`` float32."""
    rows, k = plan.padded_out, plan.in_features
    w = workspace("int4", (rows, k), xb.dtype, xb.device, reuse=reuse)
    it = iter(layouts)
    if plan.main:
        layout, flat, main, g = next(it), state["qweight"].reshape(-1), plan.main, plan.main_group
        scale = state["scale_zero"][..., 0].t()  # (rows, kernel groups), a view
        step = max(layout.block, _CHUNK_WEIGHTS // main // layout.block * layout.block)
        codes = workspace("int4-codes", (min(step, rows), main), torch.int8, xb.device, reuse=reuse)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            c = unpack_rows(flat[r0 * main // 2 : r1 * main // 2], r1 - r0, main, layout, codes[: r1 - r0], signed=True)
            piece = w[r0:r1, :main]
            piece.copy_(c)
            piece.view(r1 - r0, main // g, g).mul_(scale[r0:r1, :, None])
    if plan.rem:
        codes = unpack_rows(state["qweight_rem"], rows, plan.rem_padded, next(it), torch.empty(rows, plan.rem_padded, dtype=torch.int8), signed=True)
        piece = w[:, plan.main :]
        piece.copy_(codes[:, : plan.rem])
        piece.mul_(state["scale_zero_rem"][0, :, 0, None])
    y = F.linear(xb, w).float()
    if not symmetric:
        xf = xb.float()
        if plan.main:
            sums = xf[:, : plan.main].reshape(xf.shape[0], -1, plan.main_group).sum(dim=-1)
            y += sums @ state["scale_zero"][..., 1].float()
        if plan.rem:
            y += xf[:, plan.main :].sum(dim=-1, keepdim=True) * state["scale_zero_rem"][0, :, 1].float()
    return y
