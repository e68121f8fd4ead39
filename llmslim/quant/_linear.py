"""``QuantLinear``: a linear layer holding packed low-bit weights, with real CPU kernels.

Storage (what ``state_dict`` holds, on every device): ``qweight`` (codes packed as in
:mod:`~llmslim.quant._packing`), ``scales`` ``(out, groups)`` in the chosen dtype, ``zeros``
``(out, groups)`` int8 on asymmetric grids, and ``bias``. In memory a 4-bit layer on CPU holds
the int4 kernel's own layout instead (see ``_int4cpu``): the same bytes, never both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from . import _int4cpu
from ._clip import search_params
from ._functional import BITS, dequantize, num_groups, quantize, zero_fraction
from ._kernels import DECODE_MAX_TOKENS, cpu_gemm_dtype, few_tokens, int8_available, int8_decode, int8_prefill
from ._layout import cpu_int4_available, int4_plan
from ._packed import PackedLinear
from ._packing import pack, row_bytes, unpack

__all__ = ["QuantLinear", "float_weight", "SCALE_DTYPES"]

SCALE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_NAMES = ("qweight", "qweight_rem", "scales", "zeros", "scale_zero", "scale_zero_rem")


def float_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (stored
    ``(in, out)``), as the forward sees them (a pruning mask applied through a parametrization
    is included).

    Raises:
        ConfigError: Neither kind of layer.
    """
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(w, torch.Tensor):
        return w.detach(), module.bias
    if type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(module, "nf"):
        return w.detach().t(), getattr(module, "bias", None)
    raise ConfigError(f"module must be an nn.Linear or a transformers Conv1D (got {type(module).__name__})")


class QuantLinear(PackedLinear):
    """A linear layer ``y = x @ W.T + b`` whose ``W = (q - z) * s`` is stored as packed codes.

    The forward picks the fastest correct path for the device and the number of tokens (rows
    of the flattened input): on CPU the int8 or int4 kernel for few tokens, dequantize-and-GEMM
    in bfloat16 for many; elsewhere dequantize-and-GEMM in the activation's dtype. Float32 in,
    float32 out; the activation is rounded to bfloat16 inside the layer on CPU paths.

    Args:
        in_features / out_features: Shape of the weight ``(out, in)``.
        bits: 2, 3, 4 or 8.
        group_size: Columns per scale, or ``None`` for one scale per output channel.
        symmetric: Symmetric grid (no zero points) or asymmetric (int8 zero points).
        bias: Whether the layer has a bias.
        scale_dtype: Dtype of the scales: bfloat16 (the CPU kernels' own), float16 or float32.
        weight_dtype: Dtype of the original weight (of ``weight`` and ``bias``).
        device: Where the tensors live.

    Raises:
        ConfigError: A bad size, bit width, group size or scale dtype.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = QuantLinear.from_float(lin, bits=4, group_size=32)
        >>> q.kernel, q.weight_bits, q(torch.randn(3, 64)).shape
        ('int4pack_mm', 4, torch.Size([3, 32]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = False,
        bias: bool = True,
        scale_dtype: torch.dtype = torch.bfloat16,
        weight_dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"QuantLinear: {name} must be a positive integer (got {value!r})")
        if bits not in BITS:
            raise ConfigError(f"QuantLinear: bits must be one of {', '.join(map(str, BITS))} (got {bits!r})")
        if scale_dtype not in SCALE_DTYPES.values():
            raise ConfigError(f"QuantLinear: scale_dtype must be bfloat16, float16 or float32 (got {scale_dtype!r})")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.groups = num_groups(in_features, group_size)  # also checks group_size
        self.group_size = None if group_size is None or group_size >= in_features else group_size
        self.symmetric, self.scale_dtype, self.weight_dtype = symmetric, scale_dtype, weight_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None
        self._tied_to: nn.Module | None = None
        self._plan = int4_plan(out_features, in_features, self.group_size) if bits == 4 else None
        zero_row = pack(torch.zeros(1, in_features, dtype=torch.int8, device=device), bits)
        scales = torch.ones(out_features, self.groups, dtype=scale_dtype, device=device)
        # a placeholder (all codes 0) until from_float or load_state_dict fills it: no kernel format yet
        self._install(zero_row.repeat(out_features, 1), scales, None if symmetric else torch.zeros_like(scales, dtype=torch.int8), kernel=False)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = False,
        scale_dtype: torch.dtype = torch.bfloat16,
        clip: str = "minmax",
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` or ``Conv1D`` (round to nearest on a min/max grid, or on a
        grid from the clipping search ``clip``: ``"minmax"``, ``"mse"``, ``"hqq"``).

        Raises:
            ConfigError: Not a linear layer, or a bad setting.
        """
        w, bias = float_weight(module)
        out_features, in_features = w.shape
        new = cls(in_features, out_features, bits=bits, group_size=group_size, symmetric=symmetric, bias=bias is not None,
                  scale_dtype=scale_dtype, weight_dtype=w.dtype, device=w.device)
        scale, zero = search_params(w, bits=bits, group_size=new.group_size, symmetric=symmetric, method=clip, scale_dtype=scale_dtype)
        q = quantize(w, scale, zero, bits=bits, group_size=new.group_size)
        new._install(pack(q, bits), scale, zero, codes=q)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias.detach())
        return new

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        *,
        bits: int,
        group_size: int | None,
        bias: torch.Tensor | None = None,
        weight_dtype: torch.dtype = torch.float32,
    ) -> QuantLinear:
        """A layer holding codes ``(out, in)`` int8 with their ``scale``/``zero`` ``(out, groups)``
        (``zero`` ``None``: symmetric), as a calibrated method (GPTQ ...) produces them.

        Raises:
            ConfigError: Shapes or settings that do not fit together.
        """
        out_features, in_features = codes.shape
        new = cls(in_features, out_features, bits=bits, group_size=group_size, symmetric=zero is None, bias=bias is not None,
                  scale_dtype=scale.dtype, weight_dtype=weight_dtype, device=codes.device)
        if tuple(scale.shape) != (out_features, new.groups) or (zero is not None and zero.shape != scale.shape):
            raise ConfigError(f"QuantLinear.from_codes: scale and zero must have shape {(out_features, new.groups)} (got {tuple(scale.shape)})")
        codes = codes.to(torch.int8)
        new._install(pack(codes, bits), scale, None if zero is None else zero.to(torch.int8), codes=codes)
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias.detach())
        return new

    @classmethod
    def tied(cls, embedding: nn.Module, bias: torch.Tensor | None = None) -> QuantLinear:
        """An output layer sharing a :class:`~llmslim.quant.QuantEmbedding`'s packed table (a
        tied ``lm_head``): it stores no weights of its own, so the table is held once."""
        num, dim = embedding.qweight.shape
        new = cls(dim, num, bits=8, group_size=None, symmetric=True, bias=bias is not None,
                  scale_dtype=embedding.scales.dtype, weight_dtype=embedding.weight_dtype, device=embedding.qweight.device)
        for name in _NAMES:
            new._buffers.pop(name, None)
        object.__setattr__(new, "_tied_to", embedding)  # a reference, not a child: the table is the embedding's
        if bias is not None:
            with torch.no_grad():
                new.bias.copy_(bias.detach())
        return new

    # -- storage ----------------------------------------------------------------------------
    def _install(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, *, kernel: bool = True,
                 codes: torch.Tensor | None = None) -> None:
        """Hold the portable tensors, converted to the device's kernel format where there is one
        (``codes``: the unpacked ``qweight``, when the caller has them)."""
        for name in _NAMES:
            self._buffers.pop(name, None)
        self._format, self._layouts = "packed", ()
        self._sparsity = None if codes is None else zero_fraction(codes, zeros, self.in_features, self.group_size)
        scales = scales.to(self.scale_dtype)
        if kernel and self._plan is not None and qweight.device.type == "cpu" and cpu_int4_available():
            made = _int4cpu.to_kernel(unpack(qweight, 4, self.in_features) if codes is None else codes, scales, zeros, self._plan)
            if made is not None:
                state, self._layouts = made
                for name, t in state.items():
                    self.register_buffer(name, t, persistent=False)
                if scales.dtype != torch.bfloat16:  # the kernel's bfloat16 copy cannot give them back exactly
                    self.register_buffer("scales", scales, persistent=False)
                    if zeros is not None:
                        self.register_buffer("zeros", zeros, persistent=False)
                self._format = "int4_cpu"
                return
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        if zeros is not None:
            self.register_buffer("zeros", zeros, persistent=False)

    def _unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # (codes, scales, zeros), whichever format is held
        owner = self._tied_to if self._tied_to is not None else self
        if self._format == "packed":
            return unpack(owner.qweight, self.bits, self.in_features), owner.scales, owner._buffers.get("zeros")
        state = {n: t for n, t in self._buffers.items() if n.startswith(("qweight", "scale_zero"))}
        q, scales, zeros = _int4cpu.from_kernel(state, self._layouts, self._plan, self.groups, self.symmetric)
        if "scales" in self._buffers:
            scales, zeros = self.scales, self._buffers.get("zeros")
        return q, scales, zeros

    def packed_state(self) -> dict[str, torch.Tensor]:
        """The portable tensors: ``{"qweight", "scales"[, "zeros"]}`` (what ``state_dict`` saves)."""
        owner = self._tied_to if self._tied_to is not None else self
        if self._format == "packed":
            q, scales, zeros = owner.qweight, owner.scales, owner._buffers.get("zeros")
        else:
            q, scales, zeros = self._unpacked()
            q = pack(q, 4)
        return {"qweight": q, "scales": scales} | ({} if zeros is None else {"zeros": zeros})

    def codes(self) -> torch.Tensor:
        """The integer codes ``(out, in)`` int8."""
        return self._unpacked()[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``(out, in)`` the codes stand for, ``(q - z) * s`` (0.0 exactly where
        ``q == z``), in ``dtype`` (default: the original weight's)."""
        q, scales, zeros = self._unpacked()
        return dequantize(q, scales, zeros, group_size=self.group_size, dtype=dtype or self.weight_dtype)

    # -- what module_stats reads ------------------------------------------------------------
    @property
    def weight_bits(self) -> int:
        return self.bits

    @property
    def logical_params(self) -> int:
        """Weights this layer represents (a tied layer's are its embedding's) plus bias."""
        own = 0 if self._tied_to is not None else self.in_features * self.out_features
        return own + (self.out_features if self.bias is not None else 0)

    @property
    def weight_sparsity(self) -> float:
        """Fraction of weights that are exactly zero (codes equal to their zero point)."""
        if self._sparsity is None:
            q, _, zeros = self._unpacked()
            self._sparsity = zero_fraction(q, zeros, self.in_features, self.group_size)
        return self._sparsity

    # -- kernels ----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        owner = self._tied_to if self._tied_to is not None else self
        return next(iter(owner.buffers())).device

    def kernel_for(self, tokens: int, device: torch.device | None = None) -> str:
        """The path the forward takes for ``tokens`` rows of input on ``device``."""
        device = device or self._device()
        if device.type != "cpu":
            return "dequant_gemm"
        if self._format == "int4_cpu" and tokens <= DECODE_MAX_TOKENS["int4pack_mm"]:
            return "int4pack_mm"
        if self._int8_kernel() and tokens <= DECODE_MAX_TOKENS["int8pack_mm"]:
            return "int8pack_mm"
        return "dequant_gemm_bf16" if cpu_gemm_dtype() == torch.bfloat16 else "dequant_gemm_fp32"

    def _int8_kernel(self) -> bool:
        # The kernel reads rows in whole vectors: it crashes or miscomputes when in_features is
        # not a multiple of the vector width (16 floats on AVX-512); 32 leaves a margin.
        return self.bits == 8 and self.groups == 1 and self.in_features % 32 == 0 and self._format == "packed" and int8_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"QuantLinear: input's last dimension must be {k} (got shape {tuple(x.shape)})")
        x2 = x.reshape(-1, k)
        tokens = x2.shape[0]
        grad = x.requires_grad and torch.is_grad_enabled()
        if x.device.type == "cpu" and tokens and not grad:
            y = self._cpu_matmul(x2, tokens)  # a fresh tensor: the bias can be added in place
            y = y.to(x.dtype) if y.dtype != x.dtype else y
            if self.bias is not None:
                y.add_(self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        else:
            # other devices, and autograd: dequantize in the activation's dtype (differentiable)
            y = F.linear(x2, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], n)

    def _cpu_matmul(self, x2: torch.Tensor, tokens: int) -> torch.Tensor:
        # kept lean: for SmolLM2-sized layers this wrapper costs as much as the kernel call
        reuse = not torch.compiler.is_compiling()  # compiled graphs plan their own memory
        if self._format == "int4_cpu":
            if few_tokens(tokens, "int4pack_mm"):
                y = _int4cpu.int4_decode(x2.to(torch.bfloat16), self._buffers, self._plan)
            else:
                y = _int4cpu.int4_prefill(x2.to(cpu_gemm_dtype()), self._buffers, self._layouts, self._plan, symmetric=self.symmetric, reuse=reuse)
            return y if self._plan.padded_out == self.out_features else y[:, : self.out_features]
        if self._int8_kernel():
            owner = self._tied_to if self._tied_to is not None else self
            q, scales, zeros = owner.qweight.view(torch.int8), owner.scales, owner._buffers.get("zeros")
            if few_tokens(tokens, "int8pack_mm"):
                return int8_decode(x2.to(torch.bfloat16), q, scales, zeros)
            return int8_prefill(x2.to(cpu_gemm_dtype()), q, scales, zeros, reuse=reuse)
        gemm = cpu_gemm_dtype()
        return F.linear(x2.to(gemm), self.dequantize(gemm))

    # -- devices, dtypes and checkpoints --------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # Move the portable tensors (never cast them: the scale dtype is a choice, not the
        # model's dtype), then rebuild the format of the new device.
        if self._tied_to is not None:
            return super()._apply(fn, recurse)
        state = self.packed_state()
        probe = fn(torch.empty(0, device=state["qweight"].device, dtype=self.weight_dtype))
        device, self.weight_dtype = probe.device, probe.dtype
        for name in _NAMES:
            self._buffers.pop(name, None)
        super()._apply(fn, recurse)
        self._install(state["qweight"].to(device), state["scales"].to(device), state["zeros"].to(device) if "zeros" in state else None)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tied_to is None:
            for name, t in self.packed_state().items():
                destination[prefix + name] = t.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        mine = {} if self._tied_to is not None else {n: prefix + n for n in ("qweight", "scales", "zeros")}
        if self.symmetric:
            mine.pop("zeros", None)
        rest = {k: v for k, v in state_dict.items() if k not in mine.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not mine:
            return
        missing = [key for key in mine.values() if key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        expect = {"qweight": (self.out_features, row_bytes(self.in_features, self.bits)), "scales": (self.out_features, self.groups), "zeros": (self.out_features, self.groups)}
        got = {n: state_dict[key] for n, key in mine.items()}
        bad = [f"{mine[n]}: shape {tuple(t.shape)}, expected {expect[n]}" for n, t in got.items() if tuple(t.shape) != expect[n]]
        if bad:
            error_msgs.extend(bad)
            return
        device = self._device()
        device = got["qweight"].device if device.type == "meta" else device  # an empty layer from a checkpoint
        zeros = got["zeros"].to(device=device, dtype=torch.int8) if "zeros" in got else None
        self._install(got["qweight"].to(device=device, dtype=torch.uint8), got["scales"].to(device), zeros)

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this layer from (see :mod:`llmslim.io`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None, "scale_dtype": dtype_name(self.scale_dtype),
                "weight_dtype": dtype_name(self.weight_dtype)}

    def checkpoint_tied(self) -> nn.Module | None:
        """The embedding whose table this layer reads, or ``None``."""
        return self._tied_to

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> QuantLinear:
        """An empty layer (``meta`` tensors) of :meth:`checkpoint_config`'s shape; ``tied``: its embedding."""
        wd = dtype_from_name(cfg["weight_dtype"])
        bias = torch.empty(cfg["out_features"], dtype=wd, device="meta") if cfg["bias"] else None
        if tied is not None:
            return cls.tied(tied, bias=bias)
        return cls(cfg["in_features"], cfg["out_features"], bits=cfg["bits"], group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                   bias=cfg["bias"], scale_dtype=dtype_from_name(cfg["scale_dtype"]), weight_dtype=wd, device="meta")

    def extra_repr(self) -> str:
        tied = ", tied" if self._tied_to is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, scales={str(self.scale_dtype).replace('torch.', '')}, "
            f"bias={self.bias is not None}{tied}"
        )

    @property
    def bytes_per_weight(self) -> float:
        """Bytes of packed weights, scales and zero points per weight this layer represents."""
        if self._tied_to is not None:
            return 0.0
        held = sum(t.numel() * t.element_size() for n, t in self._buffers.items() if n in _NAMES)
        return held / math.prod((self.out_features, self.in_features))
