"""GPTQ: quantize each layer column by column, feeding every column's rounding error back into
the columns still to come through the layer's Hessian ``H = 2 X^T X / n`` from calibration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import ModuleRow
from .._targets import Target, replace_module_, select
from .._validate import check_range, fail
from ..calibration import CalibrationPass, InputStats
from ._clip import search_params
from ._functional import code_range
from ._linear import SCALE_DTYPES, QuantLinear, float_weight

__all__ = ["GPTQ", "gptq_quantize"]


def _group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    size = in_features if group_size is None or group_size >= in_features else group_size
    return [(s, min(s + size, in_features)) for s in range(0, in_features, size)]


def _inverse_cholesky(h: torch.Tensor, damp: float, retries: int = 4) -> tuple[torch.Tensor, float, int]:
    # Upper Cholesky factor of H^-1, damped by a fraction of the mean diagonal; a failure
    # (H not positive definite in float) is retried with ten times the damping.
    mean = h.diagonal().mean().item()
    for attempt in range(retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, damp, attempt
        damp *= 10
    raise torch.linalg.LinAlgError(f"the Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.bfloat16,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip: str = "minmax",
    keep_zeros: torch.Tensor | None = None,
) -> dict[str, Any]:
    """GPTQ on one weight ``(out, in)`` with its Hessian ``(in, in)``.

    Args:
        w: The float weight.
        hessian: ``2 X^T X / n`` of the layer's inputs (not modified).
        bits, group_size, symmetric, scale_dtype: The grid, as for RTN.
        damp: Added to the Hessian's diagonal, as a fraction of its mean.
        block_size: Columns updated together (lazy batch updates).
        act_order: Quantize columns in order of decreasing Hessian diagonal. Group grids are then
            fixed up front from the original weight ("static groups"), so that they stay one per
            contiguous group in the stored layout.
        clip: Grid search for each group (``"minmax"``, ``"mse"``, ``"hqq"``).
        keep_zeros: Boolean ``(out, in)``: entries forced to exactly 0 (pruned weights); the
            error of forcing them is fed back like any rounding error.

    Returns:
        ``codes`` int8 ``(out, in)``, ``scale`` and ``zero`` ``(out, groups)``, ``damp`` (used),
        ``retries`` (Cholesky retries) and ``loss`` (the OBS objective, summed).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 16, generator=g)
        >>> out = gptq_quantize(torch.randn(8, 16, generator=g), 2 * x.T @ x / 256, bits=4, group_size=8, symmetric=False)
        >>> out["codes"].shape, out["scale"].shape
        (torch.Size([8, 16]), torch.Size([8, 2]))
    """
    w = w.detach().float().clone()
    h = hessian.detach().double().clone()
    out_features, columns = w.shape
    qmin, qmax = code_range(bits)
    dead = h.diagonal() == 0  # inputs that never fire: nothing to preserve there
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = _group_bounds(columns, group_size)
    group_of = torch.empty(columns, dtype=torch.long)
    for g, (s, e) in enumerate(groups):
        group_of[s:e] = g
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(columns)
    w, h = w[:, perm], h[perm][:, perm]
    zeros_mask = None if keep_zeros is None else keep_zeros[:, perm]
    upper, used_damp, retries = _inverse_cholesky(h, damp)
    upper = upper.float()

    scale = torch.empty(out_features, len(groups), dtype=scale_dtype)
    zero = None if symmetric else torch.empty(out_features, len(groups), dtype=torch.int8)

    def fit(g: int, cols: torch.Tensor) -> None:
        s, z = search_params(cols, bits=bits, group_size=None, symmetric=symmetric, method=clip, scale_dtype=scale_dtype)
        scale[:, g] = s[:, 0]
        if zero is not None:
            zero[:, g] = z[:, 0]

    if act_order:  # static groups: every grid from the original weight
        original = w[:, torch.argsort(perm)]
        for g, (s, e) in enumerate(groups):
            fit(g, original[:, s:e])
    codes = torch.empty(out_features, columns, dtype=torch.int8)
    loss = torch.zeros(out_features)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        errors = torch.empty(out_features, end - start)
        for i in range(start, end):
            col = int(perm[i])
            g = int(group_of[col])
            if not act_order and col == groups[g][0]:  # dynamic groups: the grid from the updated columns
                fit(g, w[:, i : i + groups[g][1] - groups[g][0]])
            sc = scale[:, g].float()
            zp = 0.0 if zero is None else zero[:, g].float()
            q = torch.clamp(torch.round(w[:, i] / sc) + zp, qmin, qmax)
            if zeros_mask is not None:
                q = torch.where(zeros_mask[:, i], torch.as_tensor(zp, dtype=q.dtype).expand_as(q), q)
            codes[:, i] = q.to(torch.int8)
            dq = (q - zp) * sc
            d = upper[i, i]
            err = (w[:, i] - dq) / d
            loss += (w[:, i] - dq) ** 2 / d**2 / 2
            w[:, i + 1 : end] -= err[:, None] * upper[i, i + 1 : end][None, :]
            errors[:, i - start] = err
        w[:, end:] -= errors @ upper[start:end, end:]
    inverse = torch.argsort(perm)
    return {"codes": codes[:, inverse], "scale": scale, "zero": zero, "damp": used_damp, "retries": retries, "loss": float(loss.sum())}


@dataclasses.dataclass
class GPTQ(CalibrationPass):
    """Quantize weights with GPTQ's Hessian error feedback; swap in packed :class:`QuantLinear`.

    Needs calibration data (the engine's ``X^T X`` per layer). True-sequential by default: within
    a block, q/k/v are quantized first and o sees their quantized outputs, and so on. A pruned
    weight (exact zero under a pruning mask) stays exactly zero; its error is fed back.

    Args:
        bits: Code width: 2, 3, 4 or 8.
        group_size: Input columns per scale (a shorter last group where it does not divide the
            row), or ``None`` for one per output channel.
        symmetric: Symmetric grid, or asymmetric with an integer zero point per group.
        scale_dtype: ``"bfloat16"`` (the CPU kernels' dtype), ``"float16"`` or ``"float32"``.
        damp: Fraction of the Hessian's mean diagonal added to it (retried x10 on failure).
        block_size: Columns per lazy batch update.
        act_order: Columns in order of decreasing Hessian diagonal, with static groups.
        clip: Each group's grid: ``"minmax"``, ``"mse"`` or ``"hqq"``.
        true_sequential: Solve one input group at a time within a block.
        blocks, propagate: As :class:`~llmslim.calibration.CalibrationPass`.

    Raises:
        ConfigError: A bad setting.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> batches = [torch.randn(16, 64) for _ in range(4)]
        >>> report = ls.compress_(model, GPTQ(bits=4, group_size=32, ignore=()), calibration=batches, progress=False)
        >>> [type(m).__name__ for m in model], report.all_rows[0].bits
        (['QuantLinear', 'ReLU', 'QuantLinear'], 4.0)
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip: Literal["minmax", "mse", "hqq"] = "minmax"
    true_sequential: bool = True

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})
    rejects_after: ClassVar[Mapping[str, str]] = {"packed": "the weights are already quantized"}
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    strategy_overrides: ClassVar[Mapping[str, Any]] = {
        "blocks": [None], "group_size": [None, 3, 8, 16, 32], "damp": [0.001, 0.01, 0.1], "block_size": [1, 4, 128],
    }

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            fail(self.label, "group_size", "a positive integer or None", self.group_size)
        check_range(self.label, "damp", self.damp, 0.0, 1.0, lo_open=True)
        if self.block_size < 1:
            fail(self.label, "block_size", "a positive integer", self.block_size)

    @property
    def sequential(self) -> bool:  # the engine's true-sequential switch
        return self.true_sequential

    def declares(self) -> dict[str, Any]:
        return {"bits": float(self.bits)}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        present = {c.__name__ for m in model.modules() for c in type(m).__mro__}
        targets = tuple(t for t in self.targets if t != "Conv1D" or t in present) or self.targets
        return select(model, targets, self.ignore, accepts=self.accepts, owner=f"pass {self.label!r}", warn_unmatched=False)

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"xtx"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow:
        started, before = time.perf_counter(), self.measure(module)
        w, bias = float_weight(module)
        hessian = stats.hessian()
        masked = torch.nn.utils.parametrize.is_parametrized(module, "weight")
        result = gptq_quantize(
            w, hessian, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
            scale_dtype=SCALE_DTYPES[self.scale_dtype], damp=self.damp, block_size=self.block_size,
            act_order=self.act_order, clip=self.clip, keep_zeros=(w == 0) if masked else None,
        )
        new = QuantLinear.from_codes(result["codes"], result["scale"], result["zero"], bits=self.bits,
                                     group_size=self.group_size, bias=bias, weight_dtype=w.dtype)
        if ctx.model is None:
            raise RuntimeError("GPTQ.solve runs inside the calibration engine, which sets ctx.model")
        replace_module_(ctx.model, name, new)
        delta = (w.float() - new.dequantize(torch.float32)).double()
        h = hessian.double()
        denominator = torch.einsum("oi,ij,oj->", w.double(), h, w.double()).item()
        error = torch.einsum("oi,ij,oj->", delta, h, delta).item() / denominator if denominator > 0 else 0.0
        return self.row(name, new, before, started=started, error=math.sqrt(max(error, 0.0)), group_size=new.group_size,
                        symmetric=self.symmetric, kernel=new.kernel, damp=result["damp"], cholesky_retries=result["retries"])

