"""The ``channels`` pass: MLP width of recognised transformer blocks, or any coupled channel set the tracer finds."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..._context import Context
from ..._report import ModuleRow, Report
from ..._validate import check_range, fail
from ._base import StructuredBase, order
from ._cut import cut_mlp_, mlp_config, remove_, removed_of, update_config_
from ._groups import Decoder, channel_groups, decoder, find_layout
from ._trace import Traced, trace

__all__ = ["Channels", "keep_count"]


def keep_count(width: int, ratio: float, round_to: int = 1) -> int:
    """Units kept of ``width`` when pruning ``ratio``: at least one, rounded up to a multiple of ``round_to``.

    Example:
        >>> keep_count(1536, 0.25), keep_count(100, 0.25, round_to=16), keep_count(3, 0.9)
        (1152, 80, 1)
    """
    keep = max(1, width - int(ratio * width + 1e-9))
    return min(width, math.ceil(keep / round_to) * round_to)


@dataclasses.dataclass
class Channels(StructuredBase):
    """Remove a share of channels: each MLP's intermediate channels, or the traced channel sets of any model.

    On a model whose blocks a registered layout covers (LLaMA, Qwen2, Mistral, OPT, GPT-2, BERT):
    the MLP channels of the targeted blocks (rows of gate/up, columns of down). On any other
    model: the coupled channel sets the generic tracer finds in its ``torch.fx`` graph (see
    :func:`~llmslim.prune.structured.trace`); ``targets``/``ignore`` then name the layers
    whose output channels may go, and a graph the tracer cannot prove safe raises
    :class:`~llmslim.errors.TraceError` before anything changes.

    Args:
        ratio: Share of channels to remove, in [0, 1).
        scope: ``"layer"`` (each block, or each channel set, removes ``ratio``) or ``"global"``
            (one ranking over all of them, so widths differ; each keeps at least ``round_to``).
        round_to: Kept widths are multiples of this (rounded up), for kernel-friendly shapes.
        importance: ``"l2"`` (default), ``"l1"``, ``"activation"``, ``"taylor"`` (calibration)
            or a registered one.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> model = models.tiny("llama")
        >>> report = ls.compress_(model, Channels(ratio=0.25, round_to=8), progress=False)
        >>> model.config.intermediate_size, model.model.layers[0].mlp.down_proj.in_features
        (96, 96)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> _ = ls.compress_(net, Channels(ratio=0.5), progress=False)
        >>> net[0].out_features, net[2].in_features
        (8, 8)
    """

    ratio: float = 0.25
    scope: Literal["layer", "global"] = "layer"
    round_to: int = 1

    group_kinds = ("channel",)
    strategy_overrides: ClassVar[dict[str, Any]] = {
        "ratio": {"min_value": 0.0, "max_value": 0.95},
        "round_to": [1, 1, 2, 4, 8],
        "importance": ["l2", "l1", "activation", "taylor"],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.round_to < 1:
            fail(self.label, "round_to", "an integer >= 1", self.round_to)

    def plan(self, model: nn.Module) -> Decoder | Traced:
        """The model's blocks when a layout covers them, else the traced channel sets.

        Raises:
            TargetError: A layout matches but the layers cannot be cut (quantized, masked), or
                no block is targeted.
            TraceError: The tracer cannot prove the graph safe (see :func:`trace`).
        """
        _, layout = find_layout(model)
        if layout is not None:
            return decoder(model)
        return trace(model, targets=self.targets, ignore=self.ignore)

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The targeted blocks, or the layers producing the traced channel sets."""
        plan = self.plan(model)
        if isinstance(plan, Decoder):
            return super().select(model)
        return [(p, model.get_submodule(p)) for s in plan.spaces for p in s.producers]

    def _keeps(self, widths: list[int], scores: list[torch.Tensor]) -> list[list[int]]:
        if self.scope == "layer":
            return [sorted(order(s)[w - keep_count(w, self.ratio, self.round_to):]) for w, s in zip(widths, scores)]
        flat = torch.cat(scores)
        owner = [k for k, w in enumerate(widths) for _ in range(w)]
        total = keep_count(sum(widths), self.ratio)
        top = order(flat)[len(flat) - total:]
        counts = [0] * len(widths)
        for j in top:
            counts[owner[j]] += 1
        counts = [min(w, math.ceil(max(c, 1) / self.round_to) * self.round_to) for c, w in zip(counts, widths)]
        return [sorted(order(s)[w - c:]) for w, c, s in zip(widths, counts, scores)]

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Score every channel, then cut each MLP (or each traced channel set)."""
        plan = self.plan(model)
        if isinstance(plan, Traced):
            return self._apply_traced(model, ctx, plan)
        dec, chosen = self.decoder(model)
        groups = [channel_groups(dec, i) for i in chosen]
        flat = self.scores([g for gs in groups for g in gs], model, ctx)
        scores = list(torch.split(flat, [len(gs) for gs in groups]))
        keeps = self._keeps([len(gs) for gs in groups], scores)
        rows: list[ModuleRow] = []
        for i, keep, s in zip(chosen, keeps, scores):
            name, mlp = dec.mlp(i)
            start, before, width = time.perf_counter(), self.measure(mlp), len(s)
            removed = sorted(set(range(width)) - set(keep))
            if removed:
                with ctx.working_on(name, mlp, in_place=False):
                    cut_mlp_(model, dec, i, torch.tensor(keep, dtype=torch.long))
            rows.append(self.row(name, mlp, before, started=start, **self.info(removed, s, width_before=width, width_after=len(keep))))
        changed = any(r.info["removed"] for r in rows)
        if changed:
            update_config_(model, mlp_config(model, dec))
        kept = sum(r.info["width_after"] for r in rows)
        total = sum(r.info["width_before"] for r in rows)
        return self.report(rows, modified=changed, notes=(f"MLP channels: {kept:,} of {total:,} kept ({self.importance} importance)",))

    def _apply_traced(self, model: nn.Module, ctx: Context, traced: Traced) -> Report:
        groups = [s.groups() for s in traced.spaces]
        flat = self.scores([g for gs in groups for g in gs], model, ctx)
        scores = list(torch.split(flat, [len(gs) for gs in groups]))
        keeps = self._keeps([s.width for s in traced.spaces], scores)
        gone = [g for gs, keep in zip(groups, keeps) for g in gs if g.index not in set(keep)]
        # one row per layer touched: its removed output rows (with the set's scores) and input columns
        info: dict[str, dict[str, Any]] = {}
        for space, keep, s in zip(traced.spaces, keeps, scores):
            removed = sorted(set(range(space.width)) - set(keep))
            for u in space.uses:
                entry = info.setdefault(u.module, {})
                if u.module in space.producers:
                    entry.update(self.info(removed, s, channels=space.index, width_before=space.width, width_after=len(keep)))
                elif u.dim == 0:
                    entry["removed"] = sorted({*entry.get("removed", ()), *(u.offset + c for c in removed)})
                else:
                    entry["removed_inputs"] = sorted({*entry.get("removed_inputs", ()), *(u.offset + c for c in removed)})
        cuts = removed_of(gone)
        rows: list[ModuleRow] = []
        for name in info:
            if not any(k[0] == name for k in cuts):
                continue
            module, start = model.get_submodule(name), time.perf_counter()
            before = self.measure(module)
            with ctx.working_on(name, module, in_place=False):
                remove_(model, {k: v for k, v in cuts.items() if k[0] == name})
            rows.append(self.row(name, model.get_submodule(name), before, started=start, **info[name]))
        if rows:
            update_config_(model, {})
        kept = sum(len(k) for k in keeps)
        total = sum(s.width for s in traced.spaces)
        notes = [f"channels: {kept:,} of {total:,} kept in {len(traced.spaces)} traced channel set(s) ({self.importance} importance)"]
        notes += [f"kept whole: channels of {p} ({why})" for p, why in traced.kept]
        return self.report(rows, modified=bool(rows), notes=tuple(notes))
