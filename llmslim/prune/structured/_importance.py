"""What to cut: importance scores of dependency groups, as small pluggable hooks.

An importance is a function ``fn(groups, model, ctx) -> tensor`` giving one score per group
(higher is kept); it is registered by name with :func:`register_importance` and chosen by a
pass's ``importance`` field. Built-ins:

* ``"l1"``, ``"l2"``: the norm of the group's weight slices together (of the logical ``[out, in]``
  matrices; batch-norm slices ride along unmeasured);
* ``"activation"``: for the slices that are *inputs* of a projection (columns of ``down_proj``
  and ``o_proj``), ``sum_j ||X_j|| * ||W[:, j]||`` with ``||X_j||`` the calibration norm of input
  channel ``j`` (Wanda's score, summed over a structured group; needs calibration data);
* ``"influence"``: for blocks, ``1 - cos(h_in, h_out)`` averaged over calibration tokens (a block
  that barely changes the hidden state matters least; needs calibration data);
* ``"last"``: for blocks, later blocks score lower (the naive depth baseline);
* ``"taylor"`` (in :mod:`._taylor`): ``sum over the group of |gradient x weight|``, first-order
  estimates of the loss change from each of the group's weights (needs calibration data).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._context import Context
from ...calibration import InputStats, calibrate
from ...calibration._capture import first_tensor, token_mask, without_cache
from ...errors import ConfigError, RegistryError
from ._groups import Group
from ._slicing import sliceable

__all__ = ["Importance", "register_importance", "importance", "available_importances", "group_scores"]

ScoreFn = Callable[[Sequence[Group], nn.Module, Context], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Importance:
    """A registered importance: its function, whether it needs calibration data, the group kinds it scores."""

    name: str
    fn: ScoreFn
    calibration: bool = False
    kinds: frozenset[str] = frozenset({"channel", "head", "kv", "block"})


_REGISTRY: dict[str, Importance] = {}


def register_importance(name: str, fn: ScoreFn, *, calibration: bool = False, kinds: Sequence[str] | None = None,
                        replace: bool = False) -> None:
    """Register ``fn(groups, model, ctx) -> tensor[len(groups)]`` as importance ``name``.

    Args:
        name: What a pass's ``importance`` field says.
        fn: One score per group, higher is kept; ``ctx.calibration`` holds the batches when
            ``calibration`` is set.
        calibration: Whether it needs calibration data (passes using it then require it).
        kinds: Group kinds it can score (default all: ``channel``, ``head``, ``kv``, ``block``).
        replace: Replace an existing registration of ``name`` instead of raising.

    Raises:
        RegistryError: ``name`` is taken (without ``replace``) or not a non-empty string.

    Example:
        >>> import torch
        >>> register_importance("doc-ones", lambda groups, model, ctx: torch.ones(len(groups)))
        >>> "doc-ones" in available_importances()
        True
        >>> del _REGISTRY["doc-ones"]
    """
    if not isinstance(name, str) or not name:
        raise RegistryError(f"importance name must be a non-empty string (got {name!r})")
    if name in _REGISTRY and not replace:
        raise RegistryError(f"importance {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = Importance(name, fn, bool(calibration), frozenset(kinds or ("channel", "head", "kv", "block")))


def available_importances() -> tuple[str, ...]:
    """Registered importance names, sorted."""
    return tuple(sorted(_REGISTRY))


def importance(name: str) -> Importance:
    """The importance registered as ``name``.

    Raises:
        ConfigError: No such importance.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"importance must be one of {', '.join(available_importances())} (got {name!r})")
    return _REGISTRY[name]


def group_scores(name: str, groups: Sequence[Group], model: nn.Module, ctx: Context, owner: str) -> torch.Tensor:
    """Scores of ``groups`` by importance ``name`` as float64, checked: one finite number per group.

    Raises:
        ConfigError: The importance cannot score these groups, or returned the wrong shape or NaN.
    """
    imp = importance(name)
    kinds = {g.kind for g in groups}
    if not kinds <= imp.kinds:
        raise ConfigError(f"{owner}: importance {name!r} scores {sorted(imp.kinds)} groups, not {sorted(kinds - imp.kinds)}")
    raw = imp.fn(groups, model, ctx)
    scores = torch.as_tensor(raw).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if scores.numel() != len(groups):
        raise ConfigError(f"{owner}: importance {name!r} must return one score per group ({len(groups)}; got {scores.numel()})")
    if bool(torch.isnan(scores).any()):
        raise ConfigError(f"{owner}: importance {name!r} returned NaN")
    return scores


# -- built-ins ---------------------------------------------------------------------------------
def _slice_sums(groups: Sequence[Group], model: nn.Module, per_entry: Callable[[str, nn.Module, int], torch.Tensor | None]) -> torch.Tensor:
    # Sum a per-row (dim 0) or per-column (dim 1) vector over each group's slices; vectors cached per (module, dim).
    cache: dict[tuple[str, int], torch.Tensor | None] = {}
    out = torch.zeros(len(groups), dtype=torch.float64)
    for k, g in enumerate(groups):
        total = 0.0
        for s in g.slices:
            key = (s.module, s.dim)
            if key not in cache:
                v = per_entry(s.module, model.get_submodule(s.module), s.dim)
                cache[key] = None if v is None else torch.cumsum(torch.cat([v.new_zeros(1), v.double().cpu()]), 0)
            c = cache[key]
            if c is not None:
                total += float(c[s.stop] - c[s.start])
        out[k] = total
    return out


def _matrix(module: nn.Module, t: torch.Tensor) -> torch.Tensor | None:
    spec = sliceable(module)
    return None if spec is None else spec.matrix(module, t)


def _magnitude(p: int) -> ScoreFn:
    def score(groups: Sequence[Group], model: nn.Module, ctx: Context) -> torch.Tensor:
        def entry(name: str, module: nn.Module, dim: int) -> torch.Tensor | None:
            w = _matrix(module, module.weight.detach().float())
            if w is None:
                return None  # batch norm and the like ride along: no weight matrix to measure
            return (w.abs() if p == 1 else w.square()).sum(dim=1 - dim)

        sums = _slice_sums(groups, model, entry)
        return sums if p == 1 else sums.sqrt()

    return score


class _Norms:
    """A calibration solver that only records the input norms of the modules it selects."""

    sequential = False
    edits_in_place = False

    def __init__(self, names: set[str]) -> None:
        self.names, self.norms = names, {}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if n in self.names]

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"sqsum"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> None:
        self.norms[name] = stats.channel_norms().cpu()


def _activation(groups: Sequence[Group], model: nn.Module, ctx: Context) -> torch.Tensor:
    solver = _Norms({s.module for g in groups for s in g.slices if s.dim == 1})
    if solver.names:
        calibrate(model, ctx, [solver], propagate="original", desc="importance")

    def entry(name: str, module: nn.Module, dim: int) -> torch.Tensor | None:
        if dim != 1:
            return None  # output rows have no input statistic; the consumer's columns carry the score
        return _matrix(module, module.weight.detach().float()).norm(dim=0).cpu() * solver.norms[name]  # type: ignore[union-attr]

    return _slice_sums(groups, model, entry)


def _influence(groups: Sequence[Group], model: nn.Module, ctx: Context) -> torch.Tensor:
    if not ctx.calibration:
        raise ConfigError("importance 'influence' needs calibration data")
    from ._groups import decoder

    blocks = [decoder(model).blocks[g.layer][1] for g in groups]
    sums = torch.zeros(len(groups), dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.float64)
    state: dict[str, Any] = {}
    handles = []
    for k, block in enumerate(blocks):
        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _k: int = k) -> None:
            state[_k] = args[0] if args else kwargs["hidden_states"]

        def post(mod: nn.Module, args: Any, kwargs: Any, out: Any, _k: int = k) -> None:
            h_in, h_out = state.pop(_k).float(), first_tensor(out).float()
            cos = F.cosine_similarity(h_in, h_out, dim=-1)  # [batch, seq]
            mask = state.get("mask")
            keep = mask.to(cos.device).bool() if mask is not None and tuple(mask.shape) == tuple(cos.shape) else torch.ones_like(cos, dtype=torch.bool)
            sums[_k] += float((1 - cos)[keep].double().sum())
            counts[_k] += int(keep.sum())

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            for batch in ctx.calibration:
                state["mask"] = token_mask(batch)
                ctx.run(model, without_cache(model, batch))
    finally:
        for h in handles:
            h.remove()
    return sums / counts.clamp(min=1)


def _last(groups: Sequence[Group], model: nn.Module, ctx: Context) -> torch.Tensor:
    return -torch.tensor([float(g.layer) for g in groups], dtype=torch.float64)


register_importance("l1", _magnitude(1), kinds=("channel", "head", "kv"))
register_importance("l2", _magnitude(2), kinds=("channel", "head", "kv"))
register_importance("activation", _activation, calibration=True, kinds=("channel", "head", "kv"))
register_importance("influence", _influence, calibration=True, kinds=("block",))
register_importance("last", _last, kinds=("block",))
