"""SparseGPT's solver: prune a weight column block by column block, compensating with the Hessian.

Pure functions on rows ``[out, in]`` (see :func:`~llmslim.prune.rows_view`) and the layer-wise
Hessian ``H = 2 X^T X / n`` of the inputs; nothing here knows about modules or passes.

The objective is the layer's output error on the calibration inputs, ``||W X^T - W' X^T||^2``,
a quadratic form in each row with Hessian ``H`` shared by all rows. Optimal Brain Surgeon
removes one weight ``w_q`` at a time and moves the not-yet-visited weights of its row by
``-(w_q / [H^-1]_qq) [H^-1]_q,:``, the change that best absorbs the removal. Visiting the
columns left to right lets every row share one sequence of inverse Hessians, read off the upper
Cholesky factor of ``H^-1`` (row ``j`` of it is ``[H_j^-1]_j,: / sqrt([H_j^-1]_jj)`` for the
Hessian of the columns not yet visited); updates to columns right of the current block are
applied once per block as a matrix product (SparseGPT's lazy batch updates).

The mask is chosen on the way (adaptive mask selection): at each block's first column for
unstructured patterns, at each group's first column for N:M, by the OBS saliency
``w^2 / [H^-1]_jj^2`` of the weights as the compensation left them.

With a :class:`QuantGrid` the kept weights are also quantized (SparseGPT's joint sparsification
and quantization: the GPTQ update with a mask). The pruning solve runs first and fixes the mask
and each group's grid (fitted to the compensated weights it leaves: compensation moves kept
weights far more than rounding does, so a grid fitted before it would clip them); a second sweep
then visits the columns again with the error ``w_j - q_j``, ``q_j`` the grid value where kept and
0 where pruned, so pruned weights stay exactly zero and kept ones absorb both errors.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..errors import CalibrationError, ConfigError
from ..quant._functional import code_range, quant_params
from ._patterns import lowest_mask, nm_mask, prune_count, row_mask
from ._refit import refit_kept

__all__ = ["ObsResult", "QuantGrid", "inverse_hessian_factor", "obs_prune", "relative_output_error"]

# Each failed Cholesky retries with ten times the damping: 1% -> 10% -> 100% -> 1000% -> 10000%
# of the mean diagonal. Past 100% the Hessian barely matters and the solve tends to magnitude
# pruning, still a valid answer; a Hessian that fails all of them holds NaN or Inf.
RETRIES = 4


@dataclasses.dataclass(frozen=True)
class QuantGrid:
    """The grid :func:`obs_prune` quantizes kept weights to (as :func:`~llmslim.quant.quant_params`).

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: Columns per scale (a shorter last group where it does not divide the row),
            or ``None`` for one per output row.
        symmetric: Symmetric grid, or asymmetric with integer zero points.
        scale_dtype: Storage dtype of the scales (they are rounded to it before codes are chosen).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: torch.dtype = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class ObsResult:
    """What :func:`obs_prune` computed.

    Attributes:
        weight: The compensated rows ``[out, in]``, float32, exactly zero where pruned.
        keep: Boolean keep-mask of the same shape.
        damping: The damping finally used, as a fraction of the Hessian's mean diagonal.
        retries: How many times the Cholesky factorisation failed and was retried with more damping.
        dead: Inputs whose Hessian diagonal is zero (never non-zero on the calibration data).
        error: Relative output error on the calibration inputs, ``||(W - W') X^T|| / ||W X^T||``
            (``None`` when ``W X^T`` is zero).
        codes, scale, zero: With a :class:`QuantGrid`: int8 codes ``[out, in]`` (the zero point
            where pruned), scales and zero points ``[out, groups]`` (``zero`` ``None`` on a
            symmetric grid); ``weight`` is then what they dequantize to. ``None`` otherwise.
    """

    weight: torch.Tensor
    keep: torch.Tensor
    damping: float
    retries: int
    dead: int
    error: float | None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


def inverse_hessian_factor(hessian: torch.Tensor, damping: float, *, retries: int = RETRIES) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) * I)^-1``, retrying with more damping.

    Args:
        hessian: Symmetric positive semi-definite ``[n, n]`` (not modified).
        damping: Fraction of the mean diagonal added to the diagonal, >= 0.
        retries: Further attempts, each with ten times the damping (at least 10%).

    Returns:
        ``(U, damping used, retries needed)``.

    Raises:
        CalibrationError: Every attempt failed (a Hessian with NaN or Inf).

    Example:
        >>> u, used, tries = inverse_hessian_factor(torch.eye(3) * 4, 0.0)
        >>> u.diagonal().tolist(), used, tries
        ([0.5, 0.5, 0.5], 0.0, 0)
    """
    h = hessian.float()
    mean = float(h.diagonal().mean()) if h.numel() else 0.0
    attempts = [damping] + [max(damping, 0.01) * 10**k for k in range(1, retries + 1)]
    for tries, amount in enumerate(attempts):
        damped = h.clone()
        damped.diagonal().add_(amount * mean)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        # a non-finite entry anywhere reaches the diagonal of its column: checking it is enough
        if int(info) == 0 and bool(torch.isfinite(upper.diagonal()).all()):
            return upper, float(amount), tries
    raise CalibrationError(
        f"the Hessian is not positive definite even with damping {attempts[-1]:g} x its mean diagonal "
        f"({mean:g}); its inputs may hold NaN or Inf"
    )


def relative_output_error(before: torch.Tensor, after: torch.Tensor, hessian: torch.Tensor) -> float | None:
    """``||(B - A) X^T|| / ||B X^T||`` from the rows ``B``, ``A`` and ``H`` proportional to ``X^T X``.

    ``||W X^T||^2 = tr(W X^T X W^T)``, so the Hessian is all the inputs it takes; the scale of
    ``H`` cancels. ``None`` when ``B X^T`` is zero.

    Example:
        >>> b = torch.tensor([[1.0, 1.0]])
        >>> relative_output_error(b, torch.tensor([[1.0, 0.0]]), torch.eye(2))
        0.7071067811865476
    """
    h = hessian.float()
    delta = (before.float() - after.float())
    num = float(((delta @ h) * delta).sum().clamp_min(0))
    den = float(((before.float() @ h) * before.float()).sum())
    if not den > 0:
        return None if num > 0 or den != den else 0.0
    return math.sqrt(num / den)


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    scope: str = "layer",
    block_size: int = 128,
    damping: float = 0.01,
    remainder: str = "error",
    pruned: torch.Tensor | None = None,
    quant: QuantGrid | None = None,
    refit: int = 0,
) -> ObsResult:
    """Prune rows ``weight`` ``[out, in]`` with OBS updates from ``hessian`` ``[in, in]`` (SparseGPT).

    Args:
        weight: The rows (not modified).
        hessian: ``2 X^T X / n`` of the layer's inputs (not modified).
        sparsity: Fraction to prune (unstructured); ignored for N:M.
        n_m: ``(N, M)`` to keep N of every M consecutive weights of a row, or ``None``.
        scope: ``"layer"``: each block of columns prunes its share of the whole layer's count,
            its lowest saliencies across all rows; ``"row"``: each row prunes its share of the block.
        block_size: Columns per block (rounded up to a multiple of M for N:M patterns).
        damping: Fraction of the Hessian's mean diagonal added to its diagonal.
        remainder: N:M with a row length M does not divide: ``"error"`` or ``"dense"`` (the
            last, partial group stays).
        pruned: Boolean ``[out, in]``: weights already pruned (an earlier mask); they stay pruned
            and count towards the share of their block.
        quant: Also quantize the kept weights to this grid, with the same error feedback (see
            module docs); the result then carries ``codes``, ``scale`` and ``zero``.
        refit: Conjugate-gradient iterations re-fitting the kept weights to the dense outputs
            once the mask is final (:func:`~llmslim.prune.refit_kept`); 0 keeps the sweep's
            weights. Not with ``quant``.

    Returns:
        An :class:`ObsResult`. Inputs that never fired (zero Hessian diagonal) are pruned first:
        their weights cost nothing on the calibration data.

    Raises:
        ConfigError: Bad shapes or sizes; an N:M row length without a remainder policy.
        CalibrationError: The Hessian cannot be factorised at any damping.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 8, generator=g) * torch.tensor([0.1, 1, 3, 0.5, 2, 1, 0.2, 4])  # uneven channels
        >>> w, h = torch.randn(4, 8, generator=g), 2 * x.T @ x / 256
        >>> out = obs_prune(w, h, sparsity=0.5)
        >>> magnitude = w * (w.abs() > w.abs().median())
        >>> int((out.weight == 0).sum()), round(out.error, 3), round(relative_output_error(w, magnitude, h), 3)
        (16, 0.103, 0.266)
        >>> joint = obs_prune(w, h, sparsity=0.5, quant=QuantGrid(bits=4, group_size=4))
        >>> tuple(joint.scale.shape), bool((joint.weight[~joint.keep] == 0).all()), round(joint.error, 3)
        ((4, 2), True, 0.107)
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ConfigError(f"obs_prune: weight must be [out, in] and hessian [in, in] (got {tuple(weight.shape)} and {tuple(hessian.shape)})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"obs_prune: block_size must be an integer >= 1 (got {block_size!r})")
    if scope not in ("layer", "row"):
        raise ConfigError(f"obs_prune: scope must be 'layer' or 'row' (got {scope!r})")
    cols = weight.shape[1]
    full = cols
    if n_m is not None:
        n, m = n_m
        full = cols // m * m
        if full != cols and remainder != "dense":
            raise ConfigError(f"obs_prune: rows of {cols} weights do not split into groups of {m}; set remainder='dense'")
        block_size = -(-block_size // m) * m  # groups never straddle two blocks
    w, forced, dead = _start(weight, hessian, pruned)
    original = w.clone()  # what the layer computed before (already-pruned and dead-input weights read zeros)
    u, used, tries = inverse_hessian_factor(_fixed(hessian), damping)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        _solve_block(w, u, keep, forced, i1, i2, sparsity=sparsity, n_m=n_m, full=full, scope=scope)
    w[~keep] = 0.0
    if quant is None:
        if refit:
            w = refit_kept(original, w, keep, _fixed(hessian), damping=used, iterations=refit)
        return ObsResult(w, keep, used, tries, int(dead.sum()), relative_output_error(original, w, hessian))
    if refit:
        raise ConfigError(f"obs_prune: refit must be 0 with a quantization grid (got {refit})")
    scale, zero = quant_params(w, bits=quant.bits, group_size=quant.group_size, symmetric=quant.symmetric,
                               scale_dtype=quant.scale_dtype)
    grid = _Grid(quant, scale, zero, w.shape)
    w = _quantize_sweep(original.clone(), u, keep, grid, block_size)
    return ObsResult(w, keep, used, tries, int(dead.sum()), relative_output_error(original, w, hessian), grid.codes, scale, zero)


def _start(weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # (rows as float32 with forced entries zeroed, forced [out, in], dead inputs [in]); inputs
    # that never fired (zero Hessian diagonal) and earlier masks are forced: pruned first
    w = weight.detach().float().clone()
    dead = hessian.diagonal() == 0
    forced = dead.to(w.device).unsqueeze(0).expand_as(w).clone()
    if pruned is not None:
        forced |= pruned.to(device=w.device, dtype=torch.bool)
    w[forced] = 0.0
    return w, forced, dead


def _fixed(hessian: torch.Tensor) -> torch.Tensor:
    # float32 copy with a unit diagonal where it is zero: no signal there, so any weight is
    # optimal, and the unit keeps the factorisation finite
    h = hessian.float().clone()
    h.diagonal()[h.diagonal() == 0] = 1.0
    return h


def _quantize_sweep(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, grid: _Grid, block_size: int) -> torch.Tensor:
    """The joint sweep over ``w`` (modified): quantize where ``keep``, zero elsewhere, feeding each
    column's error ``(w_j - q_j) / d_j`` forward as the pruning solve does; returns ``w``."""
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        wt = w[:, i1:i2].t().contiguous()  # a column is a contiguous row (see _solve_block)
        kt, u1 = keep[:, i1:i2].t(), u[i1:i2, i1:i2]
        err, done = torch.empty_like(wt), torch.empty_like(wt)
        for j in range(i2 - i1):
            done[j] = grid.round(i1 + j, wt[j], kt[j])
            e = torch.div(wt[j] - done[j], u1[j, j], out=err[j])
            wt[j:].addr_(u1[j, j:], e, alpha=-1.0)
        w[:, i1:i2] = done.t()  # exact grid values, zeros where pruned
        if i2 < cols:
            w[:, i2:].addmm_(err.t(), u[i1:i2, i2:], alpha=-1.0)
    return w


class _Grid:
    """Fixed grids (one scale and zero point per row and group) and the codes chosen on them."""

    def __init__(self, quant: QuantGrid, scale: torch.Tensor, zero: torch.Tensor | None, shape: torch.Size) -> None:
        self.qmin, self.qmax = code_range(quant.bits)
        self.size = shape[1] if quant.group_size is None else quant.group_size
        self.s = scale.float()
        self.z = torch.zeros_like(self.s) if zero is None else zero.float()
        self.codes = torch.empty(shape, dtype=torch.int8, device=scale.device)

    def round(self, col: int, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Codes for column ``col`` (the zero point where not kept); returns the dequantized column."""
        g = col // self.size
        s, z = self.s[:, g], self.z[:, g]
        q = torch.where(keep, torch.clamp(torch.round(values / s) + z, self.qmin, self.qmax), z)
        self.codes[:, col] = q.to(torch.int8)
        return (q - z) * s  # as dequantize computes it: exactly 0.0 where pruned


def _salience(w1: torch.Tensor, diag: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    # OBS saliency w^2 / [H^-1]_jj^2 (the loss of removing w, up to a factor); forced entries first
    return (w1.square() / diag.square().unsqueeze(0)).masked_fill(forced, -math.inf)


def _solve_block(w: torch.Tensor, u: torch.Tensor, keep: torch.Tensor, forced: torch.Tensor, i1: int, i2: int, *,
                 sparsity: float, n_m: tuple[int, int] | None, full: int, scope: str) -> None:
    """Prune columns ``i1:i2`` of ``w`` in place, updating the columns right of them."""
    rows = w.shape[0]
    w1, u1, f1 = w[:, i1:i2], u[i1:i2, i1:i2], forced[:, i1:i2]
    diag = u1.diagonal()
    # forced weights (dead inputs, an earlier mask) are pruned whatever the pattern decides,
    # also in the dense remainder columns of an N:M pattern
    keep1 = ~f1
    if n_m is None:
        # Each block's share of the layer's (or row's) count, from the running totals, so the
        # shares add up to exactly what one unstructured or row mask would prune.
        score = _salience(w1, diag, f1)
        if scope == "layer":
            keep1 = lowest_mask(score, prune_count(sparsity, rows * i2) - prune_count(sparsity, rows * i1))
        else:
            share = prune_count(sparsity, i2) - prune_count(sparsity, i1)
            keep1 = row_mask(score, share / (i2 - i1))
        keep1 &= ~f1
    # The column loop works on the block transposed (a column is then a contiguous row): about
    # twice as fast on CPUs. err_j = (w_j - q_j) / d_j with q_j = 0 where pruned and w_j where
    # kept, that is w_j * (pruned / d_j).
    wt = w1.t().contiguous()
    err = torch.zeros_like(wt)
    factor = ((~keep1).float() / diag.unsqueeze(0)).t().contiguous()
    for j in range(i2 - i1):
        col = i1 + j
        if n_m is not None and col % n_m[1] == 0 and col + n_m[1] <= full:
            g = slice(j, j + n_m[1])
            keep1[:, g] = nm_mask(_salience(wt[g].t(), diag[g], f1[:, g]), n_m[0], n_m[1]) & ~f1[:, g]
            factor[g] = ((~keep1[:, g]).float() / diag[g].unsqueeze(0)).t()
        e = torch.mul(wt[j], factor[j], out=err[j])
        wt[j:].addr_(u1[j, j:], e, alpha=-1.0)  # OBS update of the rest of the block (column j itself: to q_j)
    w[:, i1:i2] = wt.t().masked_fill(~keep1, 0.0)  # exact zeros (the update leaves rounding residue there)
    keep[:, i1:i2] = keep1
    if i2 < w.shape[1]:
        w[:, i2:].addmm_(err.t(), u[i1:i2, i2:], alpha=-1.0)  # lazy batch update of the columns after the block
