"""PruneBase: the pruning pass minus its score. What to cut is ``score()``; how to cut is here.

A subclass overrides one method, ``score(name, module, ctx)``, returning a tensor shaped like
the module's weight (higher is more important); everything else (patterns, scopes, schedules,
masks, baking, compressed storage, reports) is shared by every pruning method.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._pass import PassBase
from .._report import ModuleRow, Report
from .._targets import Target, replace_module_, select
from .._validate import check_range, fail
from ..errors import ConfigError, TargetError
from ._mask import bake_, from_rows, get_mask, is_transposed, rows_view, set_mask_, zero_pruned_
from ._patterns import global_counts, lowest_mask, nm_mask, parse_pattern, row_mask, unstructured_mask
from ._schedule import Schedule, check_schedule
from ._storage import DTYPES, SparseLinear, storage_bytes

__all__ = ["PruneBase"]

_SCHEDULE_KEYS = ("kind", "initial", "begin_step", "end_step", "frequency")
_DEFAULT_TARGETS = ("Linear", "Conv1D")


class _LinearLike:
    """The default targets as one predicate: a model has either kind (GPT-2 both), and the core
    warns about each target that matches nothing."""

    def __call__(self, name: str, module: nn.Module) -> bool:
        return any(c.__name__ in _DEFAULT_TARGETS for c in type(module).__mro__)

    def __repr__(self) -> str:
        return " or ".join(repr(t) for t in _DEFAULT_TARGETS)


@dataclasses.dataclass
class PruneBase(PassBase):
    """Base of pruning passes: masks from ``score()`` for a pattern and scope, on a schedule.

    Subclasses implement :meth:`score`; see :class:`~llmslim.prune.Magnitude` for the whole of
    one. ``apply`` masks the targets at the schedule's sparsity for ``ctx.step`` (the final
    sparsity without a schedule), ``step`` (called by ``PassManager.step`` after each optimizer
    step) prunes more as the schedule rises, and ``finalize`` bakes the masks into dense weights
    with zeros or into compressed :class:`~llmslim.prune.SparseLinear` layers.

    Args:
        targets: Modules to prune (default every ``Linear`` and Hugging Face ``Conv1D``).
        ignore: Modules to leave alone.
        name: Label in reports.
        sparsity: Fraction of weights to prune, in [0, 1). ``None``: 0.5, or ``1 - N/M`` for an
            N:M pattern (which fixes it; another value is an error).
        pattern: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive weights along
            the input dimension, ``0 < N < M``).
        scope: Where ``sparsity`` holds: ``"layer"`` (each module), ``"row"`` (each output
            unit) or ``"global"`` (one threshold across all targets; unstructured only).
        max_layer_sparsity: No module prunes more than this, in (0, 1] and at least ``sparsity``;
            it binds under ``scope="global"`` (the other scopes never exceed ``sparsity``).
        remainder: N:M with a row length M does not divide: ``"error"`` (ConfigError) or
            ``"dense"`` (the last partial group of each row stays unpruned).
        schedule: ``None`` (prune once, in ``apply``) or a schedule as plain data, the fields of
            :class:`~llmslim.prune.Schedule` but ``final`` (which is ``sparsity``):
            ``{"kind": "cubic", "end_step": 1000, "frequency": 10}`` (also ``"initial"``,
            ``"begin_step"``; kinds ``"constant"``, ``"linear"``, ``"cubic"``).
        storage: What ``finalize`` leaves: ``"dense"`` weights with zeros (train further) or
            ``"compressed"`` (``Linear``/``Conv1D`` become ``SparseLinear``; others stay dense).
        value_dtype: dtype of compressed values (``None``: the weight's own).

    Raises:
        ConfigError: At construction, for any value out of range or fields that contradict.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> class Random(PruneBase):
        ...     def score(self, name, module, ctx):
        ...         return torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(ctx.seed))
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        >>> report = ls.compress_(model, Random(sparsity=0.25, scope="row"), progress=False)
        >>> [int((model[i].weight == 0).sum(dim=1).max()) for i in (0, 1)]   # 2 of 8 in every row
        [2, 2]
    """

    targets: tuple[Target, ...] = _DEFAULT_TARGETS
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: Literal["layer", "row", "global"] = "layer"
    max_layer_sparsity: float | None = None
    remainder: Literal["error", "dense"] = "error"
    schedule: dict[str, Any] | None = None
    storage: Literal["dense", "compressed"] = "dense"
    value_dtype: Literal["float32", "float16", "bfloat16"] | None = None

    # Class attributes the plan check reads (unannotated: PassBase declares their types).
    produces = frozenset({"masks"})
    rejects_after = {"packed": "weights are packed; prune before quantizing"}
    accepts = ("Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d")
    edits_in_place = True  # zeroes pruned originals in place: journal first
    # Plain data for llmslim.testing: the values its strategies draw.
    strategy_overrides: ClassVar[dict[str, Any]] = {
        "sparsity": {"min_value": 0.0, "max_value": 1.0, "exclude_max": True},
        "pattern": ["unstructured", "unstructured", "2:4", "1:4", "4:8", "1:2"],
        "max_layer_sparsity": [None, None, 1.0, 0.99],
        "schedule": [
            None,
            None,
            {"kind": "cubic", "end_step": 10, "frequency": 2},
            {"kind": "linear", "initial": 0.05, "begin_step": 1, "end_step": 4},
            {"kind": "constant", "begin_step": 2},
            {"kind": "constant"},
        ],
    }

    # -- configuration ---------------------------------------------------------------------
    def validate(self) -> None:
        owner = self.label
        nm = parse_pattern(self.pattern, owner)
        if self.sparsity is not None:
            check_range(owner, "sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
            if nm is not None and not math.isclose(self.sparsity, 1 - nm[0] / nm[1], abs_tol=1e-9):
                fail(owner, "sparsity", f"None or {1 - nm[0] / nm[1]:g} (1 - N/M) with pattern {self.pattern!r}", self.sparsity)
        if nm is not None and self.scope == "global":
            fail(owner, "scope", "'layer' or 'row' with an N:M pattern (every group keeps N)", self.scope)
        if self.max_layer_sparsity is not None:  # binds under scope="global"; never contradicts the others
            check_range(owner, "max_layer_sparsity", self.max_layer_sparsity, 0.0, 1.0, lo_open=True)
            if self.max_layer_sparsity < self.final_sparsity:
                fail(owner, "max_layer_sparsity", f">= sparsity ({self.final_sparsity:g}) so the target is reachable", self.max_layer_sparsity)
        if self.schedule is not None:
            self.schedule_spec  # noqa: B018  (builds and checks it)
            if nm is not None:
                fail(owner, "schedule", "None with an N:M pattern (the pattern fixes the sparsity)", self.schedule)

    @property
    def schedule_spec(self) -> Schedule | None:
        """``schedule`` as a :class:`~llmslim.prune.Schedule` ending at ``final_sparsity``.

        Raises:
            ConfigError: A malformed schedule (unknown keys, values out of range).
        """
        spec, owner = self.schedule, self.label
        if spec is None:
            return None
        if not isinstance(spec, Mapping) or "kind" not in spec:
            fail(owner, "schedule", 'None or a mapping with a "kind" (e.g. {"kind": "cubic", "end_step": 1000})', spec)
        unknown = sorted(set(spec) - set(_SCHEDULE_KEYS))
        if unknown:
            fail(owner, "schedule", f"a mapping with keys from {list(_SCHEDULE_KEYS)} (sparsity is the final value)", dict(spec))
        values = {"initial": 0.0, "begin_step": 0, "end_step": 0, "frequency": 1, **spec}
        check_schedule(owner, **values, final=self.final_sparsity,
                       names={**{k: f"schedule[{k!r}]" for k in _SCHEDULE_KEYS}, "final": "sparsity"})
        return Schedule(final=self.final_sparsity, **values)

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M pattern, ``None`` for unstructured."""
        return parse_pattern(self.pattern, self.label)

    @property
    def final_sparsity(self) -> float:
        """The sparsity the pass ends at: ``1 - N/M``, ``sparsity``, or 0.5 by default."""
        nm = self.n_m
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def sparsity_at(self, step: int) -> float:
        """The target sparsity at training step ``step`` (the final one without a schedule)."""
        spec = self.schedule_spec
        return self.final_sparsity if spec is None else spec(step)

    def declares(self) -> dict[str, Any]:
        """What ``llmslim.testing.check_pass`` may verify after apply and finalize at step 0."""
        nm = self.n_m
        if nm is not None:
            props: dict[str, Any] = {"pattern": self.pattern}
            if self.remainder == "error":  # with dense remainders a row may fall short
                props["sparsity"] = self.final_sparsity
            return props
        if self.scope == "global":  # one threshold: each module's share varies
            return {}
        return {"sparsity": self.sparsity_at(0)}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules this pass targets, in model order (raises TargetError when none)."""
        if self.targets != _DEFAULT_TARGETS:
            return super().select(model)
        return select(model, [_LinearLike()], self.ignore, accepts=self.accepts, owner=f"pass {self.label!r}")

    # -- what to cut -------------------------------------------------------------------------
    def score(self, name: str, module: nn.Module, ctx: Context) -> torch.Tensor:
        """Importance of each weight of ``module``: a tensor shaped like ``module.weight``.

        Higher is kept longer. ``module.weight`` is the masked weight when the module already
        has a mask; entries already pruned stay pruned whatever their score.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement score(name, module, ctx)")

    # -- how to cut --------------------------------------------------------------------------
    def _each(self, ctx: Context, chosen: list[tuple[str, nn.Module]], *, in_place: bool, desc: str | None = None,
              progress: bool = True) -> Iterator[tuple[str, nn.Module]]:
        items = ctx.progress_bar(chosen, desc=desc or self.label, total=len(chosen)) if progress else chosen
        for name, module in items:
            with ctx.working_on(name, module, in_place=in_place):
                yield name, module

    def _scores(self, name: str, module: nn.Module, ctx: Context, raw: torch.Tensor | None = None) -> torch.Tensor:
        # The score (``score()``'s unless given) as float32 rows [out, in], pruned entries at -inf.
        weight = module.weight
        raw = self.score(name, module, ctx) if raw is None else raw
        if not isinstance(raw, torch.Tensor) or raw.shape != weight.shape:
            got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ConfigError(f"{self.label}: score() must return a tensor shaped like {name!r}'s weight {tuple(weight.shape)} (got {got})")
        rows = rows_view(module, raw.detach()).to(torch.float32, copy=True)
        if bool(torch.isnan(rows).any()):
            raise ConfigError(f"{self.label}: score() returned NaN for module {name!r}")
        mask = get_mask(module)
        if mask is not None:
            rows.masked_fill_(~rows_view(module, mask.mask).to(rows.device), -math.inf)
        return rows

    def _keep(self, rows: torch.Tensor, target: float) -> torch.Tensor:
        nm = self.n_m
        if nm is not None:
            return nm_mask(rows, nm[0], nm[1], self.remainder)
        if self.scope == "row":
            return row_mask(rows, target)
        return unstructured_mask(rows, target)

    def _check_groups(self, chosen: list[tuple[str, nn.Module]]) -> None:
        # Fail before any module changes: a row M does not divide, without a remainder policy.
        nm = self.n_m
        if nm is None or self.remainder != "error":
            return
        for name, module in chosen:
            cols = rows_view(module, module.weight).shape[1]
            if cols % nm[1]:
                raise ConfigError(
                    f"{self.label}: module {name!r} has rows of {cols} weights, which do not split into groups of "
                    f"{nm[1]} for pattern {self.pattern!r}; set remainder='dense' to keep each row's last "
                    f"{cols % nm[1]} weight(s) unpruned, or ignore the module"
                )

    def _prune(self, chosen: list[tuple[str, nn.Module]], ctx: Context, target: float, *,
               training: bool = False) -> Iterator[tuple[str, nn.Module, Any]]:
        """Mask every chosen module for ``target``; yield ``(name, module, before)`` after each.

        In ``apply`` each module is journaled and measured first; in a training ``step``
        (``training=True``) there is no journal, no measurement and no progress bar.
        """
        journal, show = not training, not training
        if self.scope != "global":
            for name, module in self._each(ctx, chosen, in_place=journal, progress=show):
                before = None if training else self.measure(module)
                keep = from_rows(module, self._keep(self._scores(name, module, ctx), target), module.weight.shape)
                set_mask_(module, keep, target, name)
                yield name, module, before
            return
        scored = []
        for name, module in self._each(ctx, chosen, in_place=False, desc=f"{self.label} (score)", progress=show):
            scored.append((None if training else self.measure(module), self._scores(name, module, ctx)))
        counts = global_counts([s for _, s in scored], target, self.max_layer_sparsity)
        for (name, module), (before, scores), count in zip(self._each(ctx, chosen, in_place=journal, progress=False), scored, counts):
            set_mask_(module, from_rows(module, lowest_mask(scores, count), module.weight.shape), target, name)
            yield name, module, before

    def _info(self, module: nn.Module, target: float, kept: torch.Tensor) -> dict[str, Any]:
        # Target vs achieved (the mask's share of pruned weights) and the bytes of each storage form.
        achieved = 1.0 - float(kept.sum()) / kept.numel() if kept.numel() else 0.0
        info: dict[str, Any] = {"pattern": self.pattern, "scope": self.scope, "target_sparsity": target, "achieved_sparsity": achieved}
        info.update(storage_bytes(rows_view(module, module.weight.detach()), DTYPES.get(self.value_dtype or ""), self.n_m))
        return info

    def mask_module_(self, name: str, module: nn.Module, ctx: Context, scores: torch.Tensor | None = None, *,
                     sparsity: float | None = None) -> ModuleRow:
        """Mask one module at the sparsity for ``ctx.step``; return its report row.

        The seam for methods whose scores arrive one module at a time, e.g. from a calibration
        sweep's ``solve``: pass ``scores`` (shaped like the weight) or let :meth:`score` compute
        them. Layer, row and N:M patterns; ``scope="global"`` needs every score at once
        (:meth:`apply`). The original weight is zeroed in place where pruned: inside a pass,
        journal the module first (``ctx.working_on(name, module)``, as ``self.modules`` does).
        ``sparsity`` overrides the target for this module (non-uniform allocations such as
        Wanda's OWL); ignored by N:M patterns, which fix it.

        Raises:
            ConfigError: ``scope="global"``, scores of the wrong shape or NaN, an N:M row
                length without a remainder policy, or a ``sparsity`` outside [0, 1).
        """
        if self.scope == "global":
            raise ConfigError(f"{self.label}: mask_module_ masks one module at a time; scope='global' needs apply()")
        self._check_groups([(name, module)])
        target = self.sparsity_at(ctx.step)
        if sparsity is not None and self.n_m is None:
            check_range(self.label, f"sparsity of module {name!r}", sparsity, 0.0, 1.0, hi_open=True)
            target = float(sparsity)
        start, before = time.perf_counter(), self.measure(module)
        keep = self._keep(self._scores(name, module, ctx, scores), target)
        set_mask_(module, from_rows(module, keep, module.weight.shape), target, name)
        return self.row(name, module, before, started=start, **self._info(module, target, get_mask(module).mask))  # type: ignore[union-attr]

    # -- the pass contract -------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Mask the targets at the schedule's sparsity for ``ctx.step``; one row per module."""
        chosen = self.select(model)
        self._check_groups(chosen)
        target = self.sparsity_at(ctx.step)
        rows: list[ModuleRow] = []
        start = time.perf_counter()
        for name, module, before in self._prune(chosen, ctx, target):
            info = self._info(module, target, get_mask(module).mask)  # type: ignore[union-attr]
            rows.append(self.row(name, module, before, started=start, **info))
            start = time.perf_counter()
        notes = ()
        if self.scope == "global":
            kept = sum(int(get_mask(m).mask.sum()) for _, m in chosen)  # type: ignore[union-attr]
            total = sum(m.weight.numel() for _, m in chosen)
            notes = (f"global: {total - kept:,} of {total:,} weights pruned ({1 - kept / total:.4f}; target {target:g})",)
        return self.report(rows, notes=notes)

    def _masked_targets(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        try:
            chosen = self.select(model)
        except TargetError:
            return []
        return [(n, m) for n, m in chosen if get_mask(m) is not None]

    def step(self, model: nn.Module, ctx: Context) -> None:
        """After an optimizer step: re-zero pruned originals, and prune more when the schedule rose.

        ``ctx.step`` counts the steps completed before this one, so the schedule is read at
        ``ctx.step + 1``: after ``end_step`` calls the masks are at the final sparsity.
        """
        masked = self._masked_targets(model)
        for name, module in self._each(ctx, masked, in_place=False, progress=False):
            zero_pruned_(module)
        if self.schedule is None or not masked:
            return
        target = self.sparsity_at(ctx.step + 1)
        if all(get_mask(m).sparsity >= target for _, m in masked):  # type: ignore[union-attr]
            return
        for _ in self._prune(masked, ctx, target, training=True):
            pass

    def finalize(self, model: nn.Module, ctx: Context) -> Report:
        """Bake every mask: dense weights with zeros, or compressed ``SparseLinear`` layers."""
        rows: list[ModuleRow] = []
        kept_dense: list[str] = []
        value_dtype = DTYPES.get(self.value_dtype or "")
        for name, module in self._masked_targets(model):
            compress = self.storage == "compressed" and bool(name) and (isinstance(module, nn.Linear) or is_transposed(module))
            if self.storage == "compressed" and not compress:
                kept_dense.append(name or "(root)")
            # compressing swaps the module (undone for free); baking edits the weight in place
            with ctx.working_on(name, module, in_place=not compress):
                start, before = time.perf_counter(), self.measure(module)
                mask = get_mask(module)
                target, kept = mask.sparsity, mask.mask  # type: ignore[union-attr]
                if compress:
                    new = SparseLinear.from_module(module, value_dtype=value_dtype, n_m=self.n_m)
                    replace_module_(model, name, new)
                    info = {**self._info(module, target, kept), "storage": new.format}
                    module = new
                else:
                    bake_(module, name)
                    info = {**self._info(module, target, kept), "storage": "dense"}
                rows.append(self.row(name, module, before, started=start, **info))
        notes: list[str] = []
        if kept_dense:
            notes.append(f"kept dense (compressed storage covers Linear and Conv1D below the root): {', '.join(kept_dense)}")
        short = [r.module for r in rows if r.info["target_sparsity"] < self.final_sparsity]
        if short and self.schedule is not None:  # e.g. compress_ with a schedule: nothing stepped it
            notes.append(
                f"finalized {len(short)} module(s) below the final sparsity {self.final_sparsity:g} "
                f"(at {min(r.info['target_sparsity'] for r in rows):g}): the schedule reaches it after "
                f"end_step calls of PassManager.step in a training loop"
            )
        return self.report(rows, modified=bool(rows), notes=tuple(notes))
