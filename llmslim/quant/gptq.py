"""GPTQ: quantize each layer column by column, feeding every column's rounding error back into
the columns still to come through the layer's Hessian ``H = 2 X^T X / n`` from calibration.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import ModuleRow
from .._targets import replace_module_, select
from .._validate import check_range, fail
from ..calibration import CalibrationPass, InputStats
from ._clip import search_params
from ._functional import code_range, dequantize, quant_params, quantize
from ._grid import GridFields
from ._linear import float_weight
from ._sparse import quantized_layer

__all__ = ["GPTQ", "gptq_quantize"]


def _group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    size = in_features if group_size is None or group_size >= in_features else group_size
    return [(s, min(s + size, in_features)) for s in range(0, in_features, size)]


_SHRINKS = torch.linspace(1.0, 0.5, 21).tolist()


def _weighted_mse_params(cols: torch.Tensor, importance: torch.Tensor, *, bits: int, symmetric: bool,
                         scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Each row's clipping of one group, chosen to minimize the squared error weighted by each
    # column's Hessian diagonal (its share of the output error) instead of the plain weight MSE.
    best_s = best_z = best_err = None
    for f in _SHRINKS:
        shrink = torch.full((cols.shape[0], 1), f)
        s, z = quant_params(cols, bits=bits, group_size=None, symmetric=symmetric, scale_dtype=scale_dtype, shrink=shrink)
        approx = dequantize(quantize(cols, s, z, bits=bits, group_size=None), s, z, group_size=None)
        err = ((approx - cols) ** 2 * importance).sum(1, keepdim=True)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z  # type: ignore[return-value]


# Widest layer whose inverse Cholesky factor is computed in float64 under solve_dtype="auto":
# wider ones use float32 (as the reference GPTQ does throughout), halving the solve's peak.
FLOAT64_MAX_COLUMNS = 4096


def _inverse_cholesky(build: Callable[[], torch.Tensor], damp: float, retries: int = 4) -> tuple[torch.Tensor, float, int]:
    # Upper Cholesky factor of H^-1, damped by a fraction of the mean diagonal; a failure
    # (H not positive definite in float) is retried with ten times the damping.
    # ``build()`` makes a fresh H in the solve's dtype; no reference to it outlives its factor, and each
    # factor is freed as soon as the next exists: a (5632, 5632) float64 Hessian is 254 MB, and
    # the peak here sets the peak of calibrating a large model from disk (a retry builds H again)
    for attempt in range(retries + 1):
        h = build()
        h.diagonal().add_(damp * h.diagonal().mean().item())
        lower, info = torch.linalg.cholesky_ex(h)
        del h
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
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
    solve_dtype: torch.dtype | None = None,
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
        clip: Grid search for each group (``"minmax"``, ``"mse"``, ``"hqq"``); ``"mse"`` weights
            each column's squared error by its Hessian diagonal (its share of the output error).
        keep_zeros: Boolean ``(out, in)``: entries forced to exactly 0 (pruned weights); the
            error of forcing them is fed back like any rounding error.
        solve_dtype: dtype of the Hessian's inverse Cholesky factor; ``None``: float64 up to
            :data:`FLOAT64_MAX_COLUMNS` input columns, float32 above.

    Returns:
        ``codes`` int8 ``(out, in)``, ``scale`` and ``zero`` ``(out, groups)``, ``damp`` (used),
        ``retries`` (Cholesky retries), ``loss`` (the OBS objective, summed) and
        ``solve_dtype`` (the factor's dtype, by name).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 16, generator=g)
        >>> out = gptq_quantize(torch.randn(8, 16, generator=g), 2 * x.T @ x / 256, bits=4, group_size=8, symmetric=False)
        >>> out["codes"].shape, out["scale"].shape
        (torch.Size([8, 16]), torch.Size([8, 2]))
    """
    w = w.detach().float().clone()
    hessian = hessian.detach()
    out_features, columns = w.shape
    qmin, qmax = code_range(bits)
    diagonal = hessian.diagonal().double()
    dead = diagonal == 0  # inputs that never fire: nothing to preserve there
    diagonal[dead] = 1.0
    w[:, dead] = 0.0
    groups = _group_bounds(columns, group_size)
    group_of = torch.empty(columns, dtype=torch.long)
    for g, (s, e) in enumerate(groups):
        group_of[s:e] = g
    perm = torch.argsort(diagonal, descending=True) if act_order else torch.arange(columns)
    w, dead_p = w[:, perm], dead[perm]

    if solve_dtype is None:
        solve_dtype = torch.float64 if columns <= FLOAT64_MAX_COLUMNS else torch.float32

    def build() -> torch.Tensor:  # H in the solve's dtype, permuted, dead inputs given a unit diagonal
        h = (hessian[perm[:, None], perm[None, :]] if act_order else hessian).to(solve_dtype, copy=True)
        h[dead_p, dead_p] = 1.0
        return h

    zeros_mask = None if keep_zeros is None else keep_zeros[:, perm]
    upper, used_damp, retries = _inverse_cholesky(build, damp)
    upper = upper.float()  # a float64 factor is freed here: only the float32 copy stays

    scale = torch.empty(out_features, len(groups), dtype=scale_dtype)
    zero = None if symmetric else torch.empty(out_features, len(groups), dtype=torch.int8)

    hdiag = diagonal[perm].float()

    def fit(g: int, cols: torch.Tensor, idx: torch.Tensor) -> None:
        if clip == "mse":  # GPTQ's own objective: each column's error weighted by its Hessian diagonal
            s, z = _weighted_mse_params(cols, hdiag[idx][None, :], bits=bits, symmetric=symmetric, scale_dtype=scale_dtype)
        else:
            s, z = search_params(cols, bits=bits, group_size=None, symmetric=symmetric, method=clip, scale_dtype=scale_dtype)
        scale[:, g] = s[:, 0]
        if zero is not None:
            zero[:, g] = z[:, 0]

    if act_order:  # static groups: every grid from the original weight
        unperm = torch.argsort(perm)
        original = w[:, unperm]
        for g, (s, e) in enumerate(groups):
            fit(g, original[:, s:e], unperm[s:e])
    # the loop walks columns: keep them contiguous (rows of the transpose) so every update reads
    # and writes memory in order
    wt = w.t().contiguous()
    zeros_t = None if zeros_mask is None else zeros_mask.t().contiguous()
    codes_t = torch.empty(columns, out_features, dtype=torch.int8)
    loss = torch.zeros(out_features)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        errors = torch.empty(end - start, out_features)
        for i in range(start, end):
            col = int(perm[i])
            g = int(group_of[col])
            if not act_order and col == groups[g][0]:  # dynamic groups: the grid from the updated columns
                n = groups[g][1] - groups[g][0]
                cols = wt[i : i + n].t()
                if zeros_t is not None:  # pruned entries will be 0: they must not widen the grid
                    cols = cols.masked_fill(zeros_t[i : i + n].t(), 0.0)
                fit(g, cols, torch.arange(i, i + cols.shape[1]))
            sc = scale[:, g].float()
            zp = 0.0 if zero is None else zero[:, g].float()
            q = torch.clamp(torch.round(wt[i] / sc) + zp, qmin, qmax)
            if zeros_t is not None:
                q = torch.where(zeros_t[i], torch.as_tensor(zp, dtype=q.dtype).expand_as(q), q)
            codes_t[i] = q.to(torch.int8)
            diff = wt[i] - (q - zp) * sc
            d = upper[i, i]
            err = diff / d
            loss += diff**2 / d**2 / 2
            wt[i + 1 : end] -= torch.outer(upper[i, i + 1 : end], err)
            errors[i - start] = err
        wt[end:] -= upper[start:end, end:].t() @ errors
    inverse = torch.argsort(perm)
    codes = codes_t.t()
    return {"codes": codes[:, inverse], "scale": scale, "zero": zero, "damp": used_damp, "retries": retries, "loss": float(loss.sum()),
            "solve_dtype": str(solve_dtype).removeprefix("torch.")}


@dataclasses.dataclass
class GPTQ(GridFields, CalibrationPass):
    """Quantize weights with GPTQ's Hessian error feedback; swap in packed :class:`QuantLinear`.

    Needs calibration data (the engine's ``X^T X`` per layer). True-sequential by default: within
    a block, q/k/v are quantized first and o sees their quantized outputs, and so on. A pruned
    weight stays exactly zero, whether a pruning mask still holds it or it was baked in (every
    weight that is exactly 0.0 counts as pruned): its code is the zero point and its error is fed
    back, so the error feedback never revives it.

    Args:
        bits: Code width: 2, 3, 4 or 8.
        group_size: Input columns per scale (a shorter last group where it does not divide the
            row), or ``None`` for one per output channel.
        symmetric: Symmetric grid, or asymmetric with an integer zero point per group.
        scale_dtype: ``"auto"`` (float32 at 8 bits, bfloat16 below), ``"bfloat16"``,
            ``"float16"`` or ``"float32"``.
        damp: Fraction of the Hessian's mean diagonal added to it (retried x10 on failure).
        block_size: Columns per lazy batch update.
        act_order: Columns in order of decreasing Hessian diagonal, with static groups (the
            default: without it, int4 g64 on SmolLM2 loses 1.19x perplexity instead of 1.11x).
        clip: Each group's grid: ``"mse"`` (the default: the clipping with the lowest squared
            error, each column weighted by its Hessian diagonal), ``"minmax"`` or ``"hqq"``.
        true_sequential: Solve one input group at a time within a block.
        solve_dtype: Precision of the inverse Hessian's Cholesky factor: ``"float64"``,
            ``"float32"`` (half the memory; the reference GPTQ's choice) or ``"auto"`` (the
            default): float64 up to 4096 input columns, float32 above, where the float64 pair of
            factors sets the peak (a 5632-wide ``down_proj``: 2 x 254 MB).
        storage: ``"packed"`` (every code stored; the CPU int4/int8 kernels) or ``"sparse"``: a
            layer with zeros stores only its non-zero codes plus a bitmask or N:M indices
            (:class:`~llmslim.quant.SparseQuantLinear`) where that is smaller than packed; each
            row's ``info["storage"]`` says which.
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

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True  # with clip="mse": 1.05x float32 perplexity at int4 g64 on SmolLM2 (quant_quality ablation)
    clip: Literal["minmax", "mse", "hqq"] = "mse"
    true_sequential: bool = True
    storage: Literal["packed", "sparse"] = "packed"
    solve_dtype: Literal["auto", "float64", "float32"] = "auto"

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})
    rejects_after: ClassVar[Mapping[str, str]] = {"packed": "the weights are already quantized"}
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    strategy_overrides: ClassVar[Mapping[str, Any]] = {
        "blocks": [None], "group_size": [None, 3, 8, 16, 32], "damp": [0.001, 0.01, 0.1], "block_size": [1, 4, 128],
    }

    def validate(self) -> None:
        super().validate()
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
        zeros = w == 0  # pruned weights, masked or baked in: they stay exactly zero
        result = gptq_quantize(
            w, hessian, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
            scale_dtype=self.scales_dtype(), damp=self.damp, block_size=self.block_size,
            act_order=self.act_order, clip=self.clip, keep_zeros=zeros if bool(zeros.any()) else None,
            solve_dtype=None if self.solve_dtype == "auto" else getattr(torch, self.solve_dtype),
        )
        new, stored = quantized_layer(result["codes"], result["scale"], result["zero"], bits=self.bits,
                                      group_size=self.group_size, bias=bias, weight_dtype=w.dtype,
                                      sparse=self.storage == "sparse")
        if ctx.model is None:
            raise RuntimeError("GPTQ.solve runs inside the calibration engine, which sets ctx.model")
        replace_module_(ctx.model, name, new)
        # relative output error tr(D H D^T) / tr(W H W^T), in float32 products summed in float64:
        # no float64 copy of a (5632, 5632) Hessian at the peak of the sweep
        w = w.float()
        delta = w - new.dequantize(torch.float32)
        denominator = float((w @ hessian).mul_(w).sum(dtype=torch.float64))
        error = float((delta @ hessian).mul_(delta).sum(dtype=torch.float64)) / denominator if denominator > 0 else 0.0
        return self.row(name, new, before, started=started, error=math.sqrt(max(error, 0.0)), group_size=new.group_size,
                        symmetric=self.symmetric, kernel=new.kernel, damp=result["damp"], cholesky_retries=result["retries"],
                        solve_dtype=result["solve_dtype"],
                        storage=stored)

