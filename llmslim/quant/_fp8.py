"""float8 (e4m3) weights with one scale per output channel: pure functions and ``FP8Linear``.

A weight row ``w`` is stored as ``c = fp8(w / s)`` with ``s = max|w| / 448`` (448 is e4m3's
largest finite value), so the row's largest weight lands on the top of the format and every code
is finite: values beyond ``±448`` saturate (clamp) rather than overflow to NaN. e4m3 has 3 mantissa
bits: a normal number (``|c| >= 2**-6``) is rounded with a relative error of at most ``2**-4``;
smaller ones (subnormals, spaced ``2**-9``) with an absolute error of at most ``2**-10`` times the
scale. Zero stays exactly zero, so a pruned weight stays pruned.

CPU has no fast float8 conversion in torch (``.to()`` runs a scalar loop, ~7 ns per weight), so
codes are widened to bfloat16 with integer bit operations: an e4m3 bit pattern shifted into a
bfloat16 one is the same number times ``2**-120`` (subnormals included), which one exact
multiplication by ``2**120`` undoes.

Example:
    >>> import torch
    >>> codes, scale = fp8_quantize(torch.tensor([[0.0, 1.0, -2.0, 448.0]]))
    >>> fp8_dequantize(codes, scale)
    tensor([[  0.,   1.,  -2., 448.]])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from ._kernels import cpu_gemm_dtype, workspace
from ._packed import PackedLinear

__all__ = ["FP8_MAX", "FP8_SCALE_DTYPES", "FP8Linear", "fp8_quantize", "fp8_dequantize", "to_fp8", "fp8_to_bfloat16", "scaled_mm_available"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_SCALE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACTIVATIONS = ("none", "dynamic")
FP8_CLIPS = ("minmax", "mse")


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to float8 e4m3, saturating at ``±448`` (never NaN for finite input).

    Example:
        >>> to_fp8(torch.tensor([1000.0, -0.3])).float().tolist()
        [448.0, -0.3125]
    """
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # stored scales round up, so max|w| / s <= 448: the row's largest weight is never clamped
    stored = scale.to(dtype)
    if dtype != scale.dtype:
        up = torch.nextafter(stored, torch.full_like(stored, math.inf))
        stored = torch.where(stored.to(scale.dtype) < scale, up, stored)
    return stored


def fp8_quantize(w: torch.Tensor, *, scale_dtype: torch.dtype = torch.float32, clip: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel float8 codes of a weight ``(out, in)``: ``(codes, scale)``.

    Args:
        w: Floating-point weight ``(out, in)``.
        scale_dtype: float32 or bfloat16; an all-zero row gets scale 1.
        clip: ``"minmax"`` (``s = max|w| / 448``) or ``"mse"``: per row, the scale of lowest
            squared error among ``max|w| / 448 * 2**(k/8)``, ``k = 0..7`` (the e4m3 grid repeats
            every octave, so these are its alignments with the row; none clips the row's largest
            weight).

    Returns:
        ``codes`` ``(out, in)`` float8_e4m3fn and ``scale`` ``(out,)`` in ``scale_dtype``.

    Raises:
        ConfigError: Not a 2-D floating-point tensor, or another scale dtype.

    Example:
        >>> codes, scale = fp8_quantize(torch.tensor([[0.5, -0.25], [0.0, 0.0]]))
        >>> codes.float().tolist(), scale.tolist()
        ([[448.0, -224.0], [0.0, 0.0]], [0.0011160714784637094, 1.0])
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ConfigError(f"weight must be a 2-D floating-point tensor (got {getattr(w, 'shape', type(w).__name__)})")
    if scale_dtype not in FP8_SCALE_DTYPES.values():
        raise ConfigError(f"scale_dtype must be float32 or bfloat16 (got {scale_dtype!r})")
    if clip not in FP8_CLIPS:
        raise ConfigError(f"clip must be one of 'minmax', 'mse' (got {clip!r})")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    first = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scale = _round_up(first, scale_dtype)
    codes = to_fp8(wf / scale.float()[:, None])
    if clip == "mse":
        best = _row_error(wf, codes, scale)
        for k in range(1, 8):
            s = _round_up(first * 2.0 ** (k / 8), scale_dtype)
            c = to_fp8(wf / s.float()[:, None])
            err = _row_error(wf, c, s)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            codes = torch.where(better[:, None], c.view(torch.uint8), codes.view(torch.uint8)).view(FP8)
    return codes, scale


def _row_error(wf: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (fp8_to_bfloat16(codes).float() * scale.float()[:, None] - wf).square().sum(dim=1)


def _bits_to_bfloat16(codes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # e4m3 s.eeee.mmm -> bfloat16 s.0000eeee.mmm0000: the same number times 2**-120 (subnormals
    # too); int8 sign extension then a mask moves the sign bit, one multiplication rescales.
    bits = out.view(torch.int16)
    bits.copy_(codes.view(torch.int8)).bitwise_left_shift_(4).bitwise_and_(-30721)  # keep 0x87FF
    return bits.view(torch.bfloat16).mul_(2.0**120)


_EXACT: list[bool] = []


def _bit_path_exact() -> bool:
    # checked once on every code (a CPU flushing subnormals to zero would fail it): else torch's cast
    if not _EXACT:
        codes = torch.arange(256, dtype=torch.uint8)
        codes = codes[(codes & 0x7F) != 0x7F].view(FP8)  # no NaN codes
        got = _bits_to_bfloat16(codes, torch.empty(codes.shape, dtype=torch.bfloat16))
        _EXACT.append(bool(torch.equal(got.float(), codes.float())))
    return _EXACT[0]


_bit_path_exact()  # decided at import: traced first under torch.export its tensors would be fake (data-dependent)


def fp8_to_bfloat16(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float8 ``codes`` as bfloat16 (exact: every e4m3 value is a bfloat16 value), into ``out``.

    Example:
        >>> fp8_to_bfloat16(to_fp8(torch.tensor([0.0, -1.5, 2.0**-9]))).tolist()
        [0.0, -1.5, 0.001953125]
    """
    out = torch.empty(codes.shape, dtype=torch.bfloat16, device=codes.device) if out is None else out
    if codes.device.type == "cpu" and _bit_path_exact():
        return _bits_to_bfloat16(codes, out)
    return out.copy_(codes)


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``codes * scale`` (per row), computed in float32, returned in ``dtype``.

    Example:
        >>> fp8_dequantize(to_fp8(torch.tensor([[2.0, -3.0]])), torch.tensor([0.5]))
        tensor([[ 1.0000, -1.5000]])
    """
    return (fp8_to_bfloat16(codes).float() * scale.float()[:, None]).to(dtype)


def _quantize_tokens(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # dynamic per-token activation scales: each row's max |x| lands on 448
    amax = x2.detach().float().abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return to_fp8(x2.float() / scale), scale


def scaled_mm_available(device: torch.device) -> bool:
    """Whether ``torch._scaled_mm`` has a native float8 kernel on ``device`` (CUDA, compute
    capability 8.9 or newer: Ada, Hopper, Blackwell).

    Example:
        >>> scaled_mm_available(torch.device("cpu"))
        False
    """
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(PackedLinear):
    """A linear layer ``y = x @ (c * s).T + b`` holding float8 e4m3 codes ``c`` and a scale per
    output channel.

    Activations (``activations``): ``"none"`` keeps them in the input's precision (weight-only
    numerics on every device); ``"dynamic"`` rounds each token's activations to float8 with a scale
    of its own, the numerics of ``torch._scaled_mm``'s float8 tensor-core GEMM, which runs them
    on CUDA devices of compute capability 8.9+; elsewhere the same numerics are emulated.
    Paths (:meth:`kernel_for`): ``scaled_mm`` (CUDA 8.9+, ``"dynamic"``, sizes multiples of 16);
    ``dequant_gemm_bf16`` on CPU (codes widened into a reused bfloat16 buffer, one GEMM, scales on
    the output; ``dequant_gemm_fp32`` on CPUs without native bfloat16); ``dequant_gemm`` elsewhere
    and under autograd (dequantize in the input's dtype).

    Args:
        in_features / out_features: Shape of the weight ``(out, in)``.
        bias: Whether the layer has a bias.
        scale_dtype: float32 (default) or bfloat16 scales.
        activations: ``"none"`` or ``"dynamic"``.
        weight_dtype: Dtype of the original weight (and of ``bias``).
        device: Where the tensors live.

    Raises:
        ConfigError: A bad size or setting.

    Example:
        >>> lin = torch.nn.Linear(64, 32)
        >>> layer = FP8Linear.from_float(lin)
        >>> layer.kernel, layer.weight_bits, layer(torch.randn(3, 64)).shape
        ('dequant_gemm_bf16', 8, torch.Size([3, 32]))
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, scale_dtype: torch.dtype = torch.float32,
                 activations: str = "none", weight_dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FP8Linear: {name} must be a positive integer (got {value!r})")
        if scale_dtype not in FP8_SCALE_DTYPES.values():
            raise ConfigError(f"FP8Linear: scale_dtype must be float32 or bfloat16 (got {scale_dtype!r})")
        if activations not in ACTIVATIONS:
            raise ConfigError(f"FP8Linear: activations must be one of 'none', 'dynamic' (got {activations!r})")
        self.in_features, self.out_features = in_features, out_features
        self.scale_dtype, self.activations, self.weight_dtype = scale_dtype, activations, weight_dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None

    @classmethod
    def from_float(cls, module: nn.Module, *, scale_dtype: torch.dtype = torch.float32, activations: str = "none",
                   clip: str = "minmax") -> FP8Linear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` (a pruning mask included); ``clip``
        as :func:`fp8_quantize`.

        Raises:
            ConfigError: Not a linear layer, or a bad setting.
        """
        from ._linear import float_weight

        w, bias = float_weight(module)
        new = cls(w.shape[1], w.shape[0], bias=bias is not None, scale_dtype=scale_dtype, activations=activations,
                  weight_dtype=w.dtype, device=w.device)
        new.qweight, new.scales = fp8_quantize(w, scale_dtype=scale_dtype, clip=clip)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias.detach())
        return new

    # -- what module_stats and code reading .weight see -----------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out, in)`` the codes stand for, in ``dtype`` (default: the original's)."""
        return fp8_dequantize(self.qweight, self.scales, dtype=dtype or self.weight_dtype)

    @property
    def weight_bits(self) -> int:
        return 8

    @property
    def weight_sparsity(self) -> float:
        """Fraction of codes that are zero (``+0`` or ``-0``)."""
        return float(((self.qweight.view(torch.uint8) & 0x7F) == 0).sum()) / self.qweight.numel()

    @property
    def bytes_per_weight(self) -> float:
        """Bytes of codes and scales per weight (1 + scale bytes / in_features)."""
        return (self.qweight.numel() + self.scales.numel() * self.scales.element_size()) / self.qweight.numel()

    # -- kernels ------------------------------------------------------------------------------
    def kernel_for(self, tokens: int, device: torch.device | None = None) -> str:
        """The path a forward of ``tokens`` rows takes on ``device`` (default: the layer's)."""
        device = device or self.qweight.device
        if self.activations == "dynamic" and scaled_mm_available(device) and self.in_features % 16 == 0 and self.out_features % 16 == 0:
            return "scaled_mm"
        if device.type == "cpu":
            return "dequant_gemm_bf16" if cpu_gemm_dtype() == torch.bfloat16 else "dequant_gemm_fp32"
        return "dequant_gemm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"FP8Linear: input's last dimension must be {k} (got shape {tuple(x.shape)})")
        x2 = x.reshape(-1, k)
        grad = x.requires_grad and torch.is_grad_enabled()
        path = self.kernel_for(x2.shape[0], x.device)
        if path == "scaled_mm" and not grad and x2.shape[0]:
            xq, sx = _quantize_tokens(x2)
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=sx, scale_b=self.scales.float().view(1, n),
                                 out_dtype=torch.bfloat16).to(x.dtype)
        elif path.startswith("dequant_gemm_") and not grad and x2.shape[0]:
            gemm = cpu_gemm_dtype()
            w = workspace("fp8", (n, k), torch.bfloat16, x.device, reuse=not torch.compiler.is_compiling())
            w = fp8_to_bfloat16(self.qweight, w)  # the codes exactly; the scales go on the output
            w = w if gemm == torch.bfloat16 else w.float()
            if self.activations == "dynamic":
                xq, sx = _quantize_tokens(x2)
                y = F.linear(fp8_to_bfloat16(xq).to(gemm), w).float().mul_(sx)
            else:
                y = F.linear(x2.to(gemm), w).float()
            y = y.mul_(self.scales.float().view(1, n)).to(x.dtype)
        else:
            xa = x2
            if self.activations == "dynamic":  # emulated, straight-through under autograd
                xq, sx = _quantize_tokens(x2)
                xa = x2 + ((xq.float() * sx).to(x2.dtype) - x2).detach()
            y = F.linear(xa, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)

    # -- devices and dtypes -------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> FP8Linear:
        # move the codes and scales, never cast them (model.half() must not turn codes into fp16)
        codes, scales = self._buffers.pop("qweight"), self._buffers.pop("scales")
        probe = fn(torch.empty(0, device=codes.device, dtype=self.weight_dtype))
        self.weight_dtype = probe.dtype
        super()._apply(fn, recurse)
        self.register_buffer("qweight", codes.to(probe.device))
        self.register_buffer("scales", scales.to(probe.device))
        return self

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this layer from (see :mod:`llmslim.io`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "scale_dtype": dtype_name(self.scale_dtype), "activations": self.activations, "weight_dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> FP8Linear:
        """An empty layer (``meta`` tensors) of :meth:`checkpoint_config`'s shape."""
        return cls(cfg["in_features"], cfg["out_features"], bias=cfg["bias"], scale_dtype=dtype_from_name(cfg["scale_dtype"]),
                   activations=cfg["activations"], weight_dtype=dtype_from_name(cfg["weight_dtype"]), device="meta")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scales={str(self.scale_dtype).replace('torch.', '')}, activations={self.activations!r}, bias={self.bias is not None}")
