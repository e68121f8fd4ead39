"""The structural passes ``heads`` (attention heads) and ``layers`` (depth); ``channels`` is in :mod:`._channels`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..._context import Context
from ..._report import ModuleRow, Report
from ..._validate import check_range, fail
from ...errors import TargetError
from ._base import StructuredBase, order
from ._channels import Channels, keep_count
from ._cut import cut_attention_, cut_blocks_, update_config_
from ._groups import Decoder, block_groups, head_groups, kv_groups

__all__ = ["Channels", "Heads", "Layers", "keep_count"]


@dataclasses.dataclass
class Heads(StructuredBase):
    """Remove attention heads, grouped-query aware: query heads within each key/value group, or whole groups.

    Every targeted block keeps the same number of heads (so one config value describes them).

    Args:
        ratio: Share to remove, in [0, 1): of the query heads of each kv group (``unit="query"``,
            rounded to whole heads, at least one kept per group) or of the kv groups
            (``unit="kv"``, each with its query heads; at least one group kept). With plain
            multi-head attention (OPT, GPT-2, BERT, or as many kv heads as query heads) each
            query head has its own key/value head, and goes with it.
        unit: ``"query"`` or ``"kv"``.
        importance: ``"l2"`` (default), ``"l1"``, ``"activation"``, ``"taylor"`` (calibration)
            or a registered one.

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
        "importance": ["l2", "l1", "activation", "taylor"],
    }

    def validate(self) -> None:
        super().validate()
        check_range(self.label, "ratio", self.ratio, 0.0, 1.0, hi_open=True)

    def decoder(self, model: nn.Module) -> tuple[Decoder, list[int]]:
        dec, chosen = super().decoder(model)
        dec.attn(chosen[0])  # TargetError for a layout without attention rules
        return dec, chosen

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Score the heads (or kv groups) of the targeted blocks, then cut q/k/v/o of each."""
        dec, chosen = self.decoder(model)
        # plain multi-head attention (one query head per key/value head): a query head goes with its key and value
        by_kv = {i: self.unit == "kv" or dec.heads(i)[0] == dec.heads(i)[1] for i in chosen}
        groups = [kv_groups(dec, i) if by_kv[i] else head_groups(dec, i) for i in chosen]
        flat = self.scores([g for gs in groups for g in gs], model, ctx)
        scores = list(torch.split(flat, [len(gs) for gs in groups]))
        rows: list[ModuleRow] = []
        for i, s in zip(chosen, scores):
            name, attn = dec.attn(i)
            nq, nkv, _ = dec.heads(i)
            per = nq // nkv
            start, before = time.perf_counter(), self.measure(attn)
            if not by_kv[i]:
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

    def _config(self, model: nn.Module, dec: Decoder) -> tuple[str, ...]:
        counts = {dec.heads(i)[:2] for i in range(len(dec.blocks))}
        head_dim = dec.heads(0)[2]
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if len(counts) == 1 and dec.layout.config_heads:
            nq, nkv = next(iter(counts))
            if not isinstance(hidden, int) or hidden % nq == 0:
                update_config_(model, {"num_attention_heads": nq, "num_key_value_heads": nkv, "head_dim": head_dim})
                return ()
        # blocks differ, the config derives head_dim from the head count (OPT, GPT-2, BERT), or
        # transformers would refuse the count (hidden_size % heads): the modules and the checkpoint
        # manifest carry the shapes, the config keeps its counts and lists the new ones per block
        per = [dec.heads(i)[:2] for i in range(len(dec.blocks))]
        changes: dict[str, Any] = {"num_attention_heads_per_layer": [p[0] for p in per], "num_key_value_heads_per_layer": [p[1] for p in per]}
        if dec.layout.config_heads:
            changes["head_dim"] = head_dim
        update_config_(model, changes)
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
    strategy_overrides: ClassVar[dict[str, Any]] = {"n": [1, 1, 2], "importance": ["influence", "last", "taylor"]}

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
        if getattr(getattr(model, "config", None), "scale_attn_by_inverse_layer_idx", False):
            # GPT-2 option: each block's attention scale depends on its index, which a rebuilt model recomputes
            raise TargetError(f"pass {self.label!r}: blocks scaled by their index (scale_attn_by_inverse_layer_idx) cannot be renumbered")
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
        widths = changes.get("intermediate_size_per_layer")
        if dec.layout.config_mlp and widths and len(set(widths)) == 1:  # the kept blocks agree again
            changes.update({dec.layout.config_mlp: widths[0], "intermediate_size_per_layer": None})
        update_config_(model, changes)
        new = model.get_submodule(dec.container)
        row = self.row(dec.container, new, before, started=start,
                       **self.info(removed, scores, candidates=chosen, blocks_before=len(dec.blocks), blocks_after=len(keep)))
        return self.report([row], notes=(f"removed blocks {removed} of {len(dec.blocks)} ({self.importance} importance)",))
