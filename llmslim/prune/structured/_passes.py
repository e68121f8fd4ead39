"""The structural passes: ``channels`` (MLP width), ``heads`` (attention heads), ``layers`` (depth)."""

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
from ...errors import TargetError
from ._base import StructuredBase, order
from ._cut import cut_attention_, cut_blocks_, cut_mlp_, mlp_config, update_config_
from ._groups import block_groups, channel_groups, head_groups, kv_groups

__all__ = ["Channels", "Heads", "Layers", "keep_count"]


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
    """Remove a share of each MLP's intermediate channels (rows of gate/up, columns of down).

    Args:
        ratio: Share of channels to remove, in [0, 1).
        scope: ``"layer"`` (each block removes ``ratio``) or ``"global"`` (one ranking over all
            targeted blocks, so widths differ; every block keeps at least ``round_to``).
        round_to: Kept widths are multiples of this (rounded up), for kernel-friendly shapes.
        importance: ``"l2"`` (default), ``"l1"``, ``"activation"`` (calibration) or a registered one.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> model = models.tiny("llama")
        >>> report = ls.compress_(model, Channels(ratio=0.25, round_to=8), progress=False)
        >>> model.config.intermediate_size, model.model.layers[0].mlp.down_proj.in_features
        (96, 96)
    """

    ratio: float = 0.25
    scope: Literal["layer", "global"] = "layer"
    round_to: int = 1

    group_kinds = ("channel",)
    strategy_overrides: ClassVar[dict[str, Any]] = {
        "ratio": {"min_value": 0.0, "max_value": 0.95},
        "round_to": [1, 1, 2, 4, 8],
        "importance": ["l2", "l1", "activation"],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "ratio", self.ratio, 0.0, 1.0, hi_open=True)
        if self.round_to < 1:
            fail(self.label, "round_to", "an integer >= 1", self.round_to)

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
        """Score every channel of the targeted blocks, then cut each block's MLP."""
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


@dataclasses.dataclass
class Heads(StructuredBase):
    """Remove attention heads, grouped-query aware: query heads within each key/value group, or whole groups.

    Every targeted block keeps the same number of heads (so one config value describes them).

    Args:
        ratio: Share to remove, in [0, 1): of the query heads of each kv group (``unit="query"``,
            rounded to whole heads, at least one kept per group) or of the kv groups
            (``unit="kv"``, each with its query heads; at least one group kept).
        unit: ``"query"`` or ``"kv"``.
        importance: ``"l2"`` (default), ``"l1"``, ``"activation"`` (calibration) or a registered one.

    Example:
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> model = models.tiny("llama", heads=4, kv_heads=2)
        >>> _ = ls.compress_(model, Heads(ratio=0.5), progress=False)
        >>> model.config.num_attention_heads, model.config.num_key_value_heads, model.model.layers[0].self_attn.num_key_value_groups
        (2, 2, 1)
    """

    ratio: float = 0.25
    unit: Literal["query", "kv"] = "query"

    group_kinds = ("head", "kv")
    strategy_overrides: ClassVar[dict[str, Any]] = {
        "ratio": {"min_value": 0.0, "max_value": 0.95},
        "importance": ["l2", "l1", "activation"],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "ratio", self.ratio, 0.0, 1.0, hi_open=True)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Score the heads (or kv groups) of the targeted blocks, then cut q/k/v/o of each."""
        dec, chosen = self.decoder(model)
        make = head_groups if self.unit == "query" else kv_groups
        groups = [make(dec, i) for i in chosen]
        flat = self.scores([g for gs in groups for g in gs], model, ctx)
        scores = list(torch.split(flat, [len(gs) for gs in groups]))
        rows: list[ModuleRow] = []
        for i, s in zip(chosen, scores):
            name, attn = dec.attn(i)
            nq, nkv, _ = dec.heads(i)
            per = nq // nkv
            start, before = time.perf_counter(), self.measure(attn)
            if self.unit == "query":
                drop = min(per - 1, round(self.ratio * per))
                removed = sorted(g * per + k for g in range(nkv) for k in order(s[g * per:(g + 1) * per])[:drop])
                keep_kv = list(range(nkv))
            else:
                drop = min(nkv - 1, round(self.ratio * nkv))
                removed_kv = sorted(order(s)[:drop])
                removed = [h for g in removed_kv for h in range(g * per, (g + 1) * per)]
                keep_kv = [g for g in range(nkv) if g not in removed_kv]
            keep = [h for h in range(nq) if h not in set(removed)]
            if removed:
                with ctx.working_on(name, attn, in_place=False):
                    cut_attention_(model, dec, i, keep, keep_kv)
            what = "query heads" if self.unit == "query" else "kv groups"
            rows.append(self.row(name, attn, before, started=start, **self.info(
                removed if self.unit == "query" else [g for g in range(nkv) if g not in keep_kv], s, unit=what,
                heads_after=len(keep), kv_heads_after=len(keep_kv))))
        changed = any(r.info["removed"] for r in rows)
        notes: tuple[str, ...] = ()
        if changed:
            notes = self._config(model, dec)
        return self.report(rows, modified=changed, notes=notes)

    def _config(self, model: nn.Module, dec: Any) -> tuple[str, ...]:
        counts = {dec.heads(i)[:2] for i in range(len(dec.blocks))}
        head_dim = dec.heads(0)[2]
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if len(counts) == 1:
            nq, nkv = next(iter(counts))
            if not isinstance(hidden, int) or hidden % nq == 0:
                update_config_(model, {"num_attention_heads": nq, "num_key_value_heads": nkv, "head_dim": head_dim})
                return ()
        # blocks differ, or transformers would refuse the count (hidden_size % heads): the
        # modules and the checkpoint manifest carry the shapes, the config lists them per block
        per = [dec.heads(i)[:2] for i in range(len(dec.blocks))]
        update_config_(model, {"head_dim": head_dim, "num_attention_heads_per_layer": [p[0] for p in per],
                               "num_key_value_heads_per_layer": [p[1] for p in per]})
        return ("head counts kept in config.num_*_per_layer (the modules carry the shapes; reload with ls.load or llmslim.hf)",)


@dataclasses.dataclass
class Layers(StructuredBase):
    """Remove the ``n`` least important whole blocks (depth pruning).

    Args:
        n: Blocks to remove, >= 1; the model must keep at least one (a model with ``n`` or fewer
            blocks, or fewer than ``n`` targeted, is not one this pass applies to: TargetError).
        importance: ``"influence"`` (default: 1 - cosine similarity of a block's input and
            output hidden states on calibration data), ``"last"`` (the last ``n`` blocks) or a
            registered one.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> model = models.tiny("llama", layers=4)
        >>> batches = [{"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))}]
        >>> report = ls.compress_(model, Layers(n=2), calibration=batches, progress=False)
        >>> model.config.num_hidden_layers, [l.self_attn.layer_idx for l in model.model.layers]
        (2, [0, 1])
    """

    n: int = 1
    importance: str = "influence"

    group_kinds = ("block",)
    strategy_overrides: ClassVar[dict[str, Any]] = {"n": [1, 1, 2], "importance": ["influence", "last"]}

    def validate(self) -> None:
        super().validate()
        if self.n < 1:
            fail(self.label, "n", "an integer >= 1", self.n)

    def declares(self) -> dict[str, Any]:
        return {"fewer_params": True}  # at least one block always goes

    def decoder(self, model: nn.Module) -> Any:
        dec, chosen = super().decoder(model)
        if len(dec.blocks) <= self.n or len(chosen) < self.n:
            raise TargetError(f"pass {self.label!r}: removing {self.n} block(s) needs more than {self.n} blocks and "
                              f"at least {self.n} targeted (the model has {len(dec.blocks)}, {len(chosen)} targeted)")
        return dec, chosen

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Score the targeted blocks, then drop the ``n`` lowest and renumber the rest."""
        dec, chosen = self.decoder(model)
        groups = [g for g in block_groups(dec) if g.layer in chosen]
        scores = self.scores(groups, model, ctx)
        removed = sorted(chosen[k] for k in order(scores)[:self.n])
        keep = [i for i in range(len(dec.blocks)) if i not in removed]
        container = model.get_submodule(dec.container)
        start, before = time.perf_counter(), self.measure(container)
        with ctx.working_on(dec.container, container, in_place=False):
            cut_blocks_(model, dec, keep)
        config = getattr(model, "config", None)
        changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
        for key in ("layer_types", "intermediate_size_per_layer", "num_attention_heads_per_layer", "num_key_value_heads_per_layer"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, list) and len(value) == len(dec.blocks):
                changes[key] = [value[i] for i in keep]
        update_config_(model, changes)
        new = model.get_submodule(dec.container)
        row = self.row(dec.container, new, before, started=start,
                       **self.info(removed, scores, candidates=chosen, blocks_before=len(dec.blocks), blocks_after=len(keep)))
        return self.report([row], notes=(f"removed blocks {removed} of {len(dec.blocks)} ({self.importance} importance)",))
