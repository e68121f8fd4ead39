"""Re-fit the kept weights of a pruned layer to its dense outputs, the mask held fixed.

Once a mask is chosen, the best kept weights are the least-squares solution of
``min ||W X^T - W' X^T||^2`` over the entries the mask keeps, one quadratic per row with the
Hessian ``H = 2 X^T X / n`` restricted to that row's kept columns. Wanda never updates the kept
weights; SparseGPT's column sweep updates each weight only for the columns pruned after it, so
neither reaches that optimum. Solving it exactly needs one factorisation per row (every row keeps
different columns); a few iterations of conjugate gradients on all rows at once, each one matrix
product with ``H``, get there closely (on SmolLM2 the layer error stops moving after about ten).
"""

from __future__ import annotations

import torch

__all__ = ["refit_kept"]


def refit_kept(target: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, *,
               damping: float = 0.01, iterations: int = 10) -> torch.Tensor:
    """Least-squares kept weights for a fixed mask, by Jacobi-preconditioned conjugate gradients.

    Minimises ``tr((W' - T) H (W' - T)^T)`` over ``W'`` with ``W'`` zero where ``keep`` is False,
    starting from ``start``; ``H`` gets ``damping`` times its mean diagonal added (as the OBS
    solve does), after ``H`` is scaled to a unit maximum diagonal; diagonal entries below float32's
    epsilon (inputs that, relative to the others, never fired) become 1.

    Args:
        target: The dense rows ``T`` ``[out, in]`` whose outputs are matched (not modified).
        start: Rows to start from, e.g. the pruned weights (not modified).
        keep: Boolean ``[out, in]``: the entries that may be non-zero.
        hessian: ``[in, in]``, proportional to ``X^T X`` (not modified).
        damping: Fraction of the mean diagonal added to the diagonal, >= 0.
        iterations: Conjugate-gradient steps, >= 0 (0 returns ``start`` masked).

    Returns:
        float32 rows ``[out, in]``, exactly zero where not kept.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 6, generator=g) @ torch.randn(6, 6, generator=g)  # correlated inputs
        >>> w, h = torch.randn(3, 6, generator=g), x.T @ x
        >>> keep = torch.rand(3, 6, generator=g) > 0.5
        >>> err = lambda v: float(((v - w) @ h * (v - w)).sum())
        >>> fitted = refit_kept(w, w * keep, keep, h, damping=0.0, iterations=6)
        >>> err(fitted) < 0.5 * err(w * keep), bool((fitted[~keep] == 0).all())
        (True, True)
    """
    m = keep.to(torch.float32)
    t = target.float()
    x = start.float() * m
    if iterations <= 0 or x.numel() == 0:
        return x
    h = hessian.float().clone()
    diag = h.diagonal()
    scale = float(diag.max())  # not empty: x has entries, so H has a column
    if not 0.0 < scale < float("inf"):
        return x  # no input ever fired (or the statistics overflowed): nothing to fit to
    # The minimiser does not change when H is scaled; scaling to a unit maximum keeps activations of
    # 1e-20 (squares below float32's normal range) from turning the preconditioner into inf / NaN.
    h.div_(scale)
    diag[diag <= torch.finfo(torch.float32).eps] = 1.0  # inputs that (relatively) never fired
    diag.add_(damping * float(diag.mean()))
    inv_diag = 1.0 / diag
    r = ((t - x) @ h) * m  # minus half the gradient, on the free entries only
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        hp = (p @ h) * m
        # a converged row has r = p = 0: its step is 0/tiny = 0
        alpha = rz / (p * hp).sum(1, keepdim=True).clamp_min(tiny)
        x.add_(alpha * p)
        r.sub_(alpha * hp)
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + (rz_next / rz.clamp_min(tiny)) * p
        rz = rz_next
    return x * m
