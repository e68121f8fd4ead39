"""The ``rtn`` pass: round-to-nearest weight-only quantization, data-free."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._pass import PassBase
from .._report import ModuleRow, Report
from .._targets import replace_module_, select
from ._embedding import QuantEmbedding
from ._functional import relative_error
from ._grid import GridFields
from ._linear import QuantLinear, float_weight
from ._sparse import sparse_note, sparse_or_packed

__all__ = ["RTN"]


@dataclasses.dataclass
class RTN(GridFields, PassBase):
    """Round each weight to the nearest point of a low-bit grid; swap in packed modules.

    Every targeted ``nn.Linear`` (and transformers ``Conv1D``) becomes a
    :class:`~llmslim.quant.QuantLinear` whose forward runs a real low-bit kernel where torch has
    one. No calibration data. Zeros stay exactly zero (both grids hold 0.0), so a pruned model
    keeps its sparsity; a pruning mask applied through a parametrization is quantized as the
    forward sees it. Modules are swapped, never edited, so a failure rolls back for free.

    Args:
        bits: Code width: 2, 3, 4 or 8.
        group_size: Input columns per scale (any size; a row that it does not divide gets a
            shorter last group), or ``None`` for one scale per output channel. For ``bits=8``
            use ``None``: the CPU int8 kernel wants per-channel scales.
        symmetric: Symmetric grid (``[-max|w|, max|w|]``, no zero points) or asymmetric
            (``[min, max]`` with an int8 zero point per group; usually more accurate at 4 bits).
        scale_dtype: ``"auto"`` (float32 at 8 bits and for tables, bfloat16 below: the CPU
            kernels' own dtype, stored once), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        clip: ``"minmax"`` (the full range), ``"mse"`` (search each group's clipping range for
            the lowest squared error) or ``"hqq"`` (half-quadratic refinement of each scale).
        storage: ``"packed"`` (every code stored, the int4/int8 CPU kernels serve the forward) or
            ``"sparse"``: a layer with zeros (a pruned model) stores only its non-zero codes and
            a bitmask or N:M indices (:class:`~llmslim.quant.SparseQuantLinear`, about 0.42
            bytes per weight at 50% int4 with groups of 64), where that is smaller than packed.
        embeddings: Also quantize ``nn.Embedding`` tables (int8, one scale per row). An output
            layer tied to a quantized table (``lm_head``) is quantized with it, sharing the
            packed table, even when ``ignore`` names it.
        targets / ignore / name: As :class:`~llmslim.PassBase`; the ``lm_head`` is ignored by
            default (it is the layer most sensitive to quantization).

    Raises:
        ConfigError: A bad setting (``bits=5``, ``group_size=0`` ...).

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        >>> report = ls.compress_(model, RTN(bits=4, group_size=32), progress=False)
        >>> row = report.all_rows[0]
        >>> row.kind, row.bits, row.info["kernel"]
        ('QuantLinear', 4.0, 'int4pack_mm')
    """

    clip: Literal["minmax", "mse", "hqq"] = "minmax"
    storage: Literal["packed", "sparse"] = "packed"
    embeddings: bool = False

    produces: ClassVar[frozenset[str]] = frozenset({"packed"})
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")
    # field values for generated configurations (llmslim.testing.strategies.passes): odd group sizes included
    strategy_overrides: ClassVar[Mapping[str, Any]] = {"group_size": [None, 1, 3, 8, 16, 32, 48, 64, 128]}

    def declares(self) -> dict[str, Any]:
        """Every reported module stores at most ``bits`` bits per weight (8 for tables)."""
        return {"bits": float(max(self.bits, 8) if self.embeddings else self.bits)}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        targets = (*self.targets, "Embedding") if self.embeddings else self.targets
        default = type(self).__dataclass_fields__["targets"].default  # covers several architectures: no warnings
        return select(model, targets, self.ignore, accepts=self.accepts, owner=f"pass {self.label!r}",
                      warn_unmatched=self.targets != default)

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        scale_dtype = self.scales_dtype()
        heads = _tied_heads(model)
        # output layers tied to a table this pass quantizes go with the table, wherever they come
        tables = {id(m.weight) for _, m in self.select(model) if _plain_embedding(m)}
        with_table = {head for key in tables for head, _ in heads.get(key, [])}
        rows: list[ModuleRow] = []
        notes: list[str] = []
        packed: list[str] = []  # storage="sparse" layers with too few zeros to gain from it
        for name, module in self.modules(model, ctx):
            if name in with_table:
                continue
            started, before = time.perf_counter(), self.measure(module)
            if isinstance(module, nn.Embedding):
                if not _plain_embedding(module):
                    # e.g. OPT's learned positions: a forward of its own that QuantEmbedding lacks
                    notes.append(f"{name} left as is: {type(module).__name__} has its own forward")
                    continue
                new = QuantEmbedding.from_float(module, scale_dtype=torch.float32 if self.scale_dtype == "auto" else scale_dtype)
                error = relative_error(module.weight.detach(), new.dequantize(torch.float32))
                replace_module_(model, name, new)
                rows.append(self.row(name, new, before, started=started, error=error, group_size=None, symmetric=True))
                for head_name, head in heads.get(id(module.weight), []):
                    head_before = self.measure(head)
                    tied = QuantLinear.tied(new, bias=head.bias)
                    replace_module_(model, head_name, tied)
                    rows.append(self.row(head_name, tied, head_before, error=error, group_size=None, kernel=tied.kernel,
                                         prefill=tied.prefill_kernel, tied_to=name))
                    notes.append(f"{head_name} is tied to {name}: quantized with it (int8 per row), one packed table for both")
                continue
            w, _ = float_weight(module)
            new = QuantLinear.from_float(module, bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                                         scale_dtype=scale_dtype, clip=self.clip)
            error = relative_error(w, new.dequantize(torch.float32))
            stored = "packed"
            if self.storage == "sparse":
                new, sparse = sparse_or_packed(new)
                stored = new.format if sparse else "packed"
                if not sparse:
                    packed.append(name)
            replace_module_(model, name, new)
            rows.append(self.row(name, new, before, started=started, error=error, group_size=new.group_size,
                                 symmetric=self.symmetric, kernel=new.kernel, prefill=new.prefill_kernel,
                                 storage=stored))
        if packed:
            notes.append(sparse_note(packed))
        if self.bits == 8 and self.group_size is not None:
            notes.append("bits=8 with group_size set has no CPU kernel (dequantize-and-GEMM); group_size=None uses int8pack_mm")
        return self.report(rows, notes=tuple(dict.fromkeys(notes)))


def _plain_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward


def _tied_heads(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    # output layers whose weight *is* an embedding's table, by the table's id
    heads: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and isinstance(module._parameters.get("weight"), nn.Parameter):
            heads.setdefault(id(module.weight), []).append((name, module))
    return heads
