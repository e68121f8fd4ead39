"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2023), a non-uniform allocation.

Blocks whose importance scores hold more outliers (entries above ``m`` times the block's mean
score) get lower sparsity, the others higher, the mean kept at the target: with ``D_l`` the
outlier ratio of block ``l``, rescaled to ``[0, 2 lambda]``, block ``l`` prunes
``target - (D_l - mean D)``. The ratios come from a read-only calibration sweep over the dense
model (:func:`outlier_ratios`) before the pruning sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._context import Context
from ..calibration import InputStats, calibrate
from ._mask import from_rows, rows_view

__all__ = ["owl_sparsities", "outlier_ratios", "wanda_scores"]

Scorer = Callable[[str, nn.Module, InputStats], torch.Tensor]


def wanda_scores(module: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` shaped like ``module.weight``, from per-input-channel norms.

    Example:
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, -1.0]]))
        >>> wanda_scores(layer, torch.tensor([1.0, 10.0])).tolist()
        [[3.0, 10.0]]
    """
    weight = module.weight.detach()
    rows = rows_view(module, weight).abs().float() * norms.to(device=weight.device, dtype=torch.float32).unsqueeze(0)
    return from_rows(module, rows, weight.shape)


def owl_sparsities(ratios: Sequence[float], target: float, lam: float, cap: float = 1.0) -> list[float]:
    """Per-block sparsities from outlier ratios: more outliers, lower sparsity; the mean is ``target``.

    The ratios are rescaled to ``[0, 2 lam]`` and centred, so sparsities span ``target +- lam``.
    When that range would leave ``[0, cap)`` the deviations shrink alike until it fits (the
    order and the mean stay).

    Args:
        ratios: Outlier ratio per block.
        target: The mean sparsity, in [0, 1).
        lam: Half the spread of the sparsities (OWL's lambda, e.g. 0.08).
        cap: No block prunes this much or more (at most 1).

    Example:
        >>> [round(s, 3) for s in owl_sparsities([0.01, 0.03, 0.02], 0.5, 0.08)]
        [0.58, 0.42, 0.5]
    """
    n = len(ratios)
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if n < 2 or lam == 0 or float(r.max() - r.min()) == 0.0:
        return [float(target)] * n
    norm = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    dev = norm.mean() - norm
    hi = min(cap, 1.0) * (1 - 1e-9)  # strictly below the cap: a mask never prunes a whole layer
    scale = 1.0
    if float(dev.min()) < 0:
        scale = min(scale, target / -float(dev.min()))
    if float(dev.max()) > 0:
        scale = min(scale, max(hi - target, 0.0) / float(dev.max()))
    return [min(max(float(target + scale * d), 0.0), hi) for d in dev]


class _OutlierProbe:
    """A read-only solver for the calibration engine: each block's share of outlier scores."""

    sequential = False
    edits_in_place = False

    def __init__(self, owner: Any, score: Scorer, m: float) -> None:
        self.owner, self.score, self.m = owner, score, m
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.ratios: dict[str, float] = {}
        self.block_of: dict[str, str] = {}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return self.owner.select(model)

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"sqsum"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> None:
        self.pending.append((name, self.score(name, module, stats).detach().flatten().float()))

    def close_block(self, block_name: str, block: nn.Module) -> None:
        # OWL compares a block's scores with their mean over the whole block, all its layers together
        if not self.pending:
            return
        flat = torch.cat([s for _, s in self.pending])
        self.ratios[block_name] = float((flat > self.m * flat.mean()).double().mean())
        self.block_of.update({name: block_name for name, _ in self.pending})
        self.pending.clear()


def outlier_ratios(model: nn.Module, ctx: Context, owner: Any, score: Scorer, m: float) -> tuple[dict[str, float], dict[str, str]]:
    """Outlier ratio of each block, from one read-only sweep over the model as it is.

    Args:
        model: The model (not modified).
        ctx: Calibration data and device.
        owner: The pass whose targets are scored (its ``select``, ``blocks`` and ``label``).
        score: ``score(name, module, stats)``: importance scores of one module's weights.
        m: An entry is an outlier above ``m`` times the mean score of its block.

    Returns:
        ``({block name: ratio}, {module name: block name})``; modules outside the blocks
        (an ``lm_head``) have no block.
    """
    probe = _OutlierProbe(owner, score, m)
    # read-only: blocks come from ctx.weights when on disk, but are not handed to ctx.after_block
    calibrate(model, ctx, [probe], blocks=owner.blocks, propagate="original", weights=ctx.weights, after_block=probe.close_block,
              desc=f"{owner.label} (OWL outliers)")
    return probe.ratios, probe.block_of


def allocate(model: nn.Module, ctx: Context, owner: Any, score: Scorer, *, target: float, lam: float, m: float,
             cap: float | None) -> tuple[dict[str, float], str]:
    """Per-module sparsities under OWL, and a one-line note for the report."""
    ratios, block_of = outlier_ratios(model, ctx, owner, score, m)
    names = list(ratios)
    per_block = dict(zip(names, owl_sparsities([ratios[b] for b in names], target, lam, 1.0 if cap is None else cap)))
    shares = list(per_block.values()) or [target]
    note = (
        f"OWL (lambda={lam:g}, M={m:g}): block sparsities {min(shares):.3f}..{max(shares):.3f} "
        f"(mean {math.fsum(shares) / len(shares):.3f}), outlier ratios {min(ratios.values(), default=0):.4f}.."
        f"{max(ratios.values(), default=0):.4f}"
    )
    return {name: per_block[block] for name, block in block_of.items()}, note
