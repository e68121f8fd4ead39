"""``Int8DynamicLinear``: int8 weights times int8 activations quantized per token at run time.

Numerics (the same on every path and at every token count): the weight is stored as int8 codes
``q_w`` with one float32 scale ``s_w`` per output channel (symmetric); each input row (token)
``x`` is rounded at run time to int8 codes ``q_x = round(x / s_x)`` with ``s_x = max|x| / 127``;
the layer returns ``(q_x @ q_w.T) * s_x * s_w + b`` in the input's dtype, where the integer
product is summed exactly in int32.

Paths, as :attr:`Int8DynamicLinear.kernel` reports them:

* ``onednn_qlinear``: oneDNN's int8 matmul with a weight packed once for it
  (``torch.ops.onednn.qlinear_pointwise``; AMX or VNNI on x86), CPU, eager mode;
* ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32) on CPU for input widths that are multiples
  of 8, and on CUDA where its shape rules hold (more than 16 rows, both widths multiples of 8);
  also the CPU path under ``torch.compile``;
* ``int8_emulated``: the integer product computed in float32 (exact for widths up to 1040, a
  float32 rounding of it beyond), for devices without an int8 GEMM.

On the AMX machine measured (docs/quantization.md) oneDNN was 1.3-2x faster than
``torch._int_mm`` on large layers (4096 and 11008 wide) at 1 to 128 tokens, where it reads a
weight packed ahead of time, but took 0.5-5 ms instead of 20-60 us for layers with at most 256
outputs at 1-4 tokens (the key/value projections of a grouped-query model); those layers take
``torch._int_mm``. Both switch points stay tunable at run time in :data:`ONEDNN_MAX_TOKENS` and
:data:`ONEDNN_MIN_OUT_FEATURES`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from ._functional import quant_params, quantize
from ._packed import PackedLinear
from ._linear import float_weight

__all__ = ["Int8DynamicLinear", "quantize_tokens", "int8_reference", "ONEDNN_MAX_TOKENS", "ONEDNN_MIN_OUT_FEATURES", "onednn_available"]

# Largest token count served by the oneDNN path on CPU (above it, torch._int_mm).
ONEDNN_MAX_TOKENS: dict[str, int] = {"onednn_qlinear": 1 << 30}
# Smallest layer (output features) served by the oneDNN path on CPU (below it, torch._int_mm).
ONEDNN_MIN_OUT_FEATURES: dict[str, int] = {"onednn_qlinear": 257}

_TINY = torch.finfo(torch.float32).tiny


def onednn_available() -> bool:
    """Whether this torch has oneDNN's int8 linear on CPU."""
    return _ONEDNN


def _probe_onednn() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    try:  # a build whose kernels cannot run on this CPU fails here, once
        w = torch.ones(8, 16, dtype=torch.int8)
        y = _onednn_mm(torch.ones(2, 16, dtype=torch.int8), ops.qlinear_prepack(w, None), torch.ones(8))
        return bool(torch.all(y == 16))
    except (RuntimeError, NotImplementedError):
        return False


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``x`` ``(M, K)`` and the row scales ``(M, 1)`` float32.

    An all-zero row gets codes 0 (and a tiny positive scale).

    Example:
        >>> q, s = quantize_tokens(torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]]))
        >>> q.tolist(), round(s[0].item() * 127, 6)
        ([[127, -64, 32], [0, 0, 0]], 1.0)
    """
    # few kernels on purpose: at one token this runs once per layer and costs as much as the GEMM;
    # |x| / scale cannot round past 127, so no clamp is needed
    xf = x.float()
    scale = torch.linalg.vector_norm(xf, ord=float("inf"), dim=-1, keepdim=True).clamp_(min=_TINY * 127).div_(127.0)
    return (xf / scale).round_().to(torch.int8), scale


class _LastInput(threading.local):
    """The codes of the last input quantized eagerly on this thread: q/k/v (and gate/up) read the
    same tensor, so it is rounded once. The tensor itself is held, so its id cannot be reused while
    cached, and its version counter catches in-place edits."""

    def __init__(self) -> None:
        self.entry: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    def quantize(self, x: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of ``x2``, the rows of the layer input ``x`` (the key: a reshape is a new object)."""
        e = self.entry
        if e is not None and e[0] is x and e[1] == x._version:
            return e[2], e[3]
        q_x, s_x = quantize_tokens(x2)
        self.entry = (x, x._version, q_x, s_x)
        return q_x, s_x


_LAST = _LastInput()


def int8_reference(q_x: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    """``q_x @ q_w.T`` of int8 codes, summed exactly (float64), as float32: what every path computes."""
    return (q_x.double() @ q_w.double().T).float()


def _onednn_mm(q_x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, zp: torch.Tensor | None = None,
               x_scale: float = 1.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    # zero points 0: oneDNN returns the int32 sum times x_scale times the channel scale (plus bias), float32
    zp = torch.zeros(w_scale.shape[0], dtype=torch.int64) if zp is None else zp
    return torch.ops.onednn.qlinear_pointwise(q_x, x_scale, 0, packed, w_scale, zp, bias, 1.0, 0, torch.float32, "none", [], "")


_ONEDNN = _probe_onednn()


class Int8DynamicLinear(PackedLinear):
    """A linear layer with int8 weights (per output channel) and int8 activations (per token).

    Args:
        in_features / out_features: Shape of the weight ``(out, in)``.
        bias: Whether the layer has a bias.
        weight_dtype: Dtype of the original weight (and of ``bias``).
        device: Where the tensors live.

    Raises:
        ConfigError: A bad size.

    Example:
        >>> lin = torch.nn.Linear(64, 32)
        >>> q = Int8DynamicLinear.from_float(lin)
        >>> x = torch.randn(5, 64)
        >>> q(x).shape, bool((q(x) - lin(x)).abs().max() < 0.05)
        (torch.Size([5, 32]), True)
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, weight_dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Int8DynamicLinear: {name} must be a positive integer (got {value!r})")
        self.in_features, self.out_features, self.weight_dtype = in_features, out_features, weight_dtype
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None
        self._packed: tuple[Any, torch.Tensor] | None = None  # oneDNN's copy of qweight (not state)

    @classmethod
    def from_float(cls, module: nn.Module) -> Int8DynamicLinear:
        """Quantize an ``nn.Linear`` or transformers ``Conv1D`` (symmetric, per output channel,
        round to nearest on the min/max grid; exact zeros stay zero).

        Raises:
            ConfigError: Not a linear layer.
        """
        w, bias = float_weight(module)
        new = cls(w.shape[1], w.shape[0], bias=bias is not None, weight_dtype=w.dtype, device=w.device)
        scale, _ = quant_params(w, bits=8, group_size=None, symmetric=True, scale_dtype=torch.float32)
        with torch.no_grad():
            new.qweight.copy_(quantize(w, scale, None, bits=8))
            new.scales.copy_(scale[:, 0])
            if bias is not None:
                new.bias.copy_(bias.detach())
        return new

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``q_w * s_w`` ``(out, in)`` (0.0 exactly where the code is 0)."""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype or self.weight_dtype)

    # -- what module_stats reads ------------------------------------------------------------
    @property
    def weight_bits(self) -> int:
        return 8

    @property
    def weight_sparsity(self) -> float:
        return float((self.qweight == 0).sum()) / self.qweight.numel()

    # -- kernels ----------------------------------------------------------------------------
    def kernel_for(self, tokens: int, device: torch.device | None = None, *, compiling: bool = False) -> str:
        """The path the forward takes for ``tokens`` rows of input on ``device``."""
        device = device or self.qweight.device
        if device.type == "cpu":
            # torch._int_mm miscomputes on CPU for a single input column; widths that are multiples
            # of 8 are the ones measured and tested
            int_mm = self.in_features % 8 == 0
            small = self.out_features < ONEDNN_MIN_OUT_FEATURES["onednn_qlinear"]
            if _ONEDNN and not compiling and tokens <= ONEDNN_MAX_TOKENS["onednn_qlinear"] and not (small and int_mm):
                return "onednn_qlinear"
            return "int_mm" if int_mm else "int8_emulated"
        if device.type == "cuda" and tokens > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0:
            return "int_mm"
        return "int8_emulated"

    def _onednn_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (packed weight, float32 scales, zero points), made on first use and whenever the
        # codes or scales change (load_state_dict, .to(...))
        key = (self.qweight.data_ptr(), self.qweight._version, self.scales.data_ptr(), self.scales._version)
        if self._packed is None or self._packed[0] != key:
            zp = torch.zeros(self.out_features, dtype=torch.int64)
            self._packed = (key, (torch.ops.onednn.qlinear_prepack(self.qweight, None), self.scales.float(), zp))
        return self._packed[1]

    def int_product(self, q_x: torch.Tensor, path: str) -> torch.Tensor:
        """``(q_x @ q_w.T) * s_w`` float32 ``(M, out)`` for int8 codes ``q_x`` ``(M, in)`` through ``path``."""
        if path == "onednn_qlinear":
            return _onednn_mm(q_x, *self._onednn_weight())
        if path == "int_mm":
            return torch._int_mm(q_x, self.qweight.t()).float().mul_(self.scales.float())
        return F.linear(q_x.float(), self.qweight.float()).mul_(self.scales.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"Int8DynamicLinear: input's last dimension must be {k} (got shape {tuple(x.shape)})")
        x2 = x.reshape(-1, k)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], n)
        compiling = torch.compiler.is_compiling()
        q_x, s_x = quantize_tokens(x2) if compiling or torch.is_grad_enabled() else _LAST.quantize(x, x2)
        path = self.kernel_for(x2.shape[0], x.device, compiling=compiling)
        bias = self.bias
        if path == "onednn_qlinear" and x2.shape[0] == 1 and (bias is None or bias.dtype == torch.float32):
            # one token: its scale and the bias go into oneDNN's epilogue (two kernels fewer per layer)
            packed, w_scale, zp = self._onednn_weight()
            y = _onednn_mm(q_x, packed, w_scale, zp, float(s_x), None if bias is None else bias.detach())
        else:
            y = self.int_product(q_x, path).mul_(s_x)
            if bias is not None:
                y.add_(bias.float())
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    # -- copies and devices -----------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}  # oneDNN's opaque tensor cannot be copied or pickled

    def _apply(self, fn: Any, recurse: bool = True) -> Int8DynamicLinear:
        # codes and scales keep their dtypes (int8, float32) whatever the model is cast to
        qweight, scales = self.qweight, self.scales
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=qweight.device))
        super()._apply(fn, recurse)
        self.weight_dtype = probe.dtype
        self.qweight, self.scales = qweight.to(probe.device), scales.to(probe.device)
        self._packed = None
        return self

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this layer from (see :mod:`llmslim.io`)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "weight_dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> Int8DynamicLinear:
        """An empty layer (``meta`` tensors) of :meth:`checkpoint_config`'s shape."""
        return cls(cfg["in_features"], cfg["out_features"], bias=cfg["bias"], weight_dtype=dtype_from_name(cfg["weight_dtype"]), device="meta")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 weights and per-token int8 activations"
