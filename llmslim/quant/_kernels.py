"""Matrix-multiply paths of quantized linear layers: CPU int8 kernel, dequantize-and-GEMM, workspace.

Every path computes ``x @ W.T`` for the weight ``W = (q - z) * s`` the layer stores (weight-only
numerics: activations are never quantized). On CPU the activation is rounded to bfloat16 inside
the layer, where the low-bit kernels and the AMX GEMM are fast; the result comes back in float32.

Path names, as :attr:`QuantLinear.kernel` reports them:

* ``int8pack_mm``: ``torch._weight_int8pack_mm`` (8-bit, one scale per output channel), few tokens;
* ``int4pack_mm``: ``torch._weight_int4pack_mm_for_cpu`` (4-bit, see ``_int4cpu``), few tokens;
* ``dequant_gemm_bf16`` / ``dequant_gemm_fp32``: dequantize into a reused buffer, one GEMM; the
  many-token path on CPU, and the only path for 2/3-bit and grouped 8-bit weights;
* ``dequant_gemm``: the same on other devices (CUDA ...), in the activation's dtype.

The token counts where the CPU paths switch were measured on an AMX machine (see
docs/quantization.md); they live in :data:`DECODE_MAX_TOKENS` and can be changed at run time.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

__all__ = [
    "DECODE_MAX_TOKENS",
    "few_tokens",
    "cpu_gemm_dtype",
    "workspace",
    "release_workspace",
    "int8_available",
    "int8_decode",
    "int8_prefill",
]

# Largest number of tokens (rows of the flattened input) served by the low-bit kernels; above
# it, dequantizing once and running the bfloat16 GEMM is faster (the kernels' cost grows with
# every token, the GEMM's barely does).
DECODE_MAX_TOKENS: dict[str, int] = {"int8pack_mm": 16, "int4pack_mm": 48}


def few_tokens(tokens: int, kernel: str) -> bool:
    """Whether ``tokens`` rows go to the low-bit ``kernel`` (:data:`DECODE_MAX_TOKENS`)."""
    # A token count left symbolic by torch.export: the kernel serves every count, while a branch
    # on the count would restrict the exported program to one side of the threshold.
    return (isinstance(tokens, torch.SymInt) and torch.compiler.is_exporting()) or tokens <= DECODE_MAX_TOKENS[kernel]


def _native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    return any(callable(getattr(cpu, f, None)) and getattr(cpu, f)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


# Facts about this machine and this torch, read once (plain constants: torch.compile traces them freely).
_GEMM_DTYPE = torch.bfloat16 if _native_bf16() else torch.float32
_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def cpu_gemm_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX), else float32."""
    return _GEMM_DTYPE


def int8_available() -> bool:
    """Whether this torch has the CPU int8 weight-only kernel."""
    return _INT8


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.by_key: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


_BUFFERS = _Buffers()


def workspace(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, reuse: bool = True) -> torch.Tensor:
    """An uninitialised tensor, reused across calls (one per slot, dtype and device, per thread).

    Dequantized weights are written here: a fresh allocation of tens of megabytes costs more in
    page faults than the dequantization itself. Not used under autograd (a saved tensor must not
    be overwritten by the next layer) or ``torch.compile`` (which plans memory itself): pass
    ``reuse=False`` there.
    """
    numel = 1
    for n in shape:
        numel *= n
    if not reuse:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, dtype, torch.device(device))
    buf = _BUFFERS.by_key.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _BUFFERS.by_key[key] = buf
    return buf[:numel].view(shape)


def release_workspace() -> int:
    """Free this thread's dequantization buffers; return the bytes released.

    Example:
        >>> release_workspace() >= 0
        True
    """
    freed = sum(b.numel() * b.element_size() for b in _BUFFERS.by_key.values())
    _BUFFERS.by_key.clear()
    return freed


# -- int8, one scale per output channel ---------------------------------------------------------
def int8_decode(xb: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``x @ ((q - z) * s).T`` with the CPU int8 kernel; ``xb`` ``(M, K)`` bfloat16, ``q`` ``(N, K)``
    int8, ``scale``/``zero`` ``(N, 1)``. Returns ``(M, N)`` float32."""
    s = scale.reshape(-1)
    if s.dtype == xb.dtype:
        y = torch.ops.aten._weight_int8pack_mm(xb, q, s).float()
    else:  # scales finer than the kernel's dtype are applied after it, unrounded
        y = torch.ops.aten._weight_int8pack_mm(xb, q, torch.ones_like(s, dtype=xb.dtype)).float().mul_(s.float())
    if zero is not None:
        # asymmetric: the kernel computes with q; remove the zero point's share, sum(x) * z * s
        y -= xb.float().sum(dim=-1, keepdim=True) * (zero.reshape(-1).float() * s.float())
    return y


def int8_prefill(xb: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, reuse: bool) -> torch.Tensor:
    """The many-token int8 path: ``q - z`` (small integers, exact in bfloat16) in a reused
    buffer, one GEMM, the scales applied to the float32 output. Returns ``(M, N)`` float32."""
    n, k = q.shape
    dtype = xb.dtype
    w = workspace("int8", (n, k), dtype, q.device, reuse=reuse)
    w.copy_(q)
    if zero is not None:
        w.sub_(zero.reshape(n, 1).to(dtype))
    return F.linear(xb, w).float().mul_(scale.reshape(1, n).float())
