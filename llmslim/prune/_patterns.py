"""How to cut: keep-masks from scores, for a pattern (unstructured, N:M) and a scope (row, layer, global).

Every function here takes *scores* (higher means more important, kept first) laid out as rows
``[out, in]`` (see :func:`~llmslim.prune.rows_view`) and returns a boolean keep-mask of the same
shape. They know nothing about where the scores come from, so magnitude, Wanda and SparseGPT
share them. Ties are broken by position (the earlier weight is pruned first), so a mask is a pure
function of its scores.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from ..errors import ConfigError

__all__ = ["parse_pattern", "prune_count", "unstructured_mask", "row_mask", "nm_mask", "global_counts", "lowest_mask"]

_NM = re.compile(r"(\d+):(\d+)")


def parse_pattern(pattern: str, owner: str = "pattern") -> tuple[int, int] | None:
    """``None`` for ``"unstructured"``, ``(N, M)`` for an ``"N:M"`` pattern with ``0 < N < M``.

    Raises:
        ConfigError: Anything else.

    Example:
        >>> parse_pattern("2:4"), parse_pattern("unstructured")
        ((2, 4), None)
    """
    if pattern == "unstructured":
        return None
    match = _NM.fullmatch(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ConfigError(f"{owner}: pattern must be 'unstructured' or 'N:M' with 0 < N < M (got {pattern!r})")
    return int(match[1]), int(match[2])


def prune_count(sparsity: float, numel: int) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: the nearest whole number (halves up).

    Example:
        >>> prune_count(0.5, 7), prune_count(0.25, 10)
        (4, 3)
    """
    return min(numel, max(0, math.floor(sparsity * numel + 0.5)))


def _lowest(flat: torch.Tensor, k: int) -> torch.Tensor:
    # Boolean mask of the k lowest entries of a 1-D tensor, ties to the earlier position.
    # kthvalue + a tie pass instead of a full sort: O(n) memory on the largest layers.
    out = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return out
    if k >= flat.numel():
        return ~out
    tau = flat.kthvalue(k).values
    out = flat < tau
    need = k - int(out.sum())
    if need:
        ties = (flat == tau).nonzero().flatten()[:need]
        out[ties] = True
    return out


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() != 2:
        raise ConfigError(f"scores must be 2-D [out, in] (got shape {tuple(scores.shape)})")
    if bool(torch.isnan(scores).any()):
        raise ConfigError(f"scores must not be NaN (got {int(torch.isnan(scores).sum())} NaN of {scores.numel()})")
    return scores


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``prune_count(sparsity, numel)`` lowest scores of the whole tensor.

    Example:
        >>> unstructured_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5).tolist()
        [[True, False], [False, True]]
    """
    scores = _check_scores(scores)
    return ~_lowest(scores.flatten(), prune_count(sparsity, scores.numel())).view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``prune_count(sparsity, in)`` lowest scores of every row (output unit).

    Example:
        >>> row_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.5).tolist()
        [[True, False], [False, True]]
    """
    scores = _check_scores(scores)
    k = prune_count(sparsity, scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        order = scores.argsort(dim=1, stable=True)[:, :k]
        keep.scatter_(1, order, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int, remainder: str = "error") -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive ones along each row (the input dimension).

    Args:
        scores: ``[out, in]``.
        n, m: The pattern, ``0 < n < m``.
        remainder: What to do with a row length that ``m`` does not divide: ``"error"`` raises,
            ``"dense"`` keeps the last, partial group whole.

    Raises:
        ConfigError: A bad pattern, or ``in % m != 0`` with ``remainder="error"``.

    Example:
        >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 9.0]]), 2, 4, remainder="dense").int().tolist()
        [[1, 0, 1, 0, 1]]
    """
    scores = _check_scores(scores)
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern must have 0 < N < M (got {n}:{m})")
    if remainder not in ("error", "dense"):
        raise ConfigError(f"remainder must be 'error' or 'dense' (got {remainder!r})")
    rows, cols = scores.shape
    full = cols // m * m
    if full != cols and remainder == "error":
        raise ConfigError(
            f"rows of {cols} weights do not split into groups of {m} for the {n}:{m} pattern; "
            f"set remainder='dense' to keep the last {cols - full} weight(s) of each row unpruned"
        )
    keep = torch.ones_like(scores, dtype=torch.bool)
    if full:
        groups = scores[:, :full].reshape(rows, full // m, m)
        drop = groups.argsort(dim=-1, stable=True)[..., : m - n]
        keep_groups = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        keep[:, :full] = keep_groups.reshape(rows, full)
    return keep


def _lowest_counts(scores: Sequence[torch.Tensor], k: int) -> list[int]:
    # How many of each tensor's entries are among the k lowest of all of them (ties by order).
    total = sum(s.numel() for s in scores)
    if k <= 0:
        return [0] * len(scores)
    if k >= total:
        return [s.numel() for s in scores]
    tau = torch.cat([s.flatten().float() for s in scores]).kthvalue(k).values
    below = [int((s < tau).sum()) for s in scores]
    need, out = k - sum(below), []
    for s, b in zip(scores, below):
        take = min(need, int((s == tau).sum()))
        need -= take
        out.append(b + take)
    return out


def global_counts(scores: Sequence[torch.Tensor], sparsity: float, max_layer_sparsity: float | None = None) -> list[int]:
    """How many weights each layer prunes under one threshold across all of them.

    The ``prune_count(sparsity, total)`` lowest scores of all layers together are pruned; with
    ``max_layer_sparsity`` no layer prunes more than ``floor(cap * numel)``, and the threshold
    rises over the other layers to make up the difference (as far as their caps allow).

    Args:
        scores: One tensor per layer (any shapes; scores must be comparable across layers).
        sparsity: Fraction of all weights to prune.
        max_layer_sparsity: The per-layer cap, or ``None`` for none.

    Returns:
        Counts per layer; prune each layer's lowest that many (:func:`unstructured_mask` with
        ``count / numel``, or directly).

    Example:
        >>> a, b = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([5.0, 6.0, 7.0, 8.0])
        >>> global_counts([a, b], 0.5), global_counts([a, b], 0.5, max_layer_sparsity=0.5)
        ([4, 0], [2, 2])
    """
    for s in scores:
        if bool(torch.isnan(s).any()):
            raise ConfigError("scores must not be NaN")
    k = prune_count(sparsity, sum(s.numel() for s in scores))
    caps = [s.numel() if max_layer_sparsity is None else math.floor(max_layer_sparsity * s.numel()) for s in scores]
    counts: list[int | None] = [None] * len(scores)
    active = list(range(len(scores)))
    # Water-filling: a layer over its cap is fixed at the cap; the rest share what is left. A
    # raised threshold only adds to the other layers' counts, so a capped layer stays capped.
    while active:
        got = _lowest_counts([scores[i] for i in active], k)
        over = [i for i, c in zip(active, got) if c > caps[i]]
        if not over:
            for i, c in zip(active, got):
                counts[i] = c
            break
        for i in over:
            counts[i] = caps[i]
            k -= caps[i]
        active = [i for i in active if i not in over]
    return [int(c or 0) for c in counts]


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep all but the ``count`` lowest scores of the whole tensor (ties by position).

    Example:
        >>> lowest_mask(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), 2).tolist()
        [[False, True], [False, True]]
    """
    return ~_lowest(scores.flatten(), count).view_as(scores)
