"""SmoothQuant: move activation outliers into the weights before int8 activation quantization.

Per-token int8 rounding of activations fails on LLMs because a few input channels are 100x
larger than the rest in every token. For a linear layer reading ``X`` and a positive factor per
input channel, ``X W^T = (X diag(s)^-1) (W diag(s))^T``: dividing the channel where it is
produced (the preceding norm's weight, or the preceding linear's output rows) and multiplying
the consumers' weight columns leaves the function unchanged and shifts the difficulty from
activations to weights, with ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._report import ModuleRow, Report
from .._targets import Target, select
from .._validate import check_range
from ..calibration import CalibrationPass, InputStats
from ._linear import float_weight
from ._smooth_map import Coupling, find_couplings, in_columns, out_rows, smooth_scales

__all__ = ["SmoothQuant"]


@dataclasses.dataclass
class SmoothQuant(CalibrationPass):
    """Migrate activation outliers into weights with per-channel factors; function unchanged.

    From calibration data (each layer input's per-channel ``max|x|``) it rescales every
    coupling it finds (see :mod:`llmslim.quant._smooth_map`): a pre-norm block's norm and the
    linears reading it, the value and output projections of attention, and a gated MLP's up and
    down projections. The model computes the same function (up to float rounding); its linear
    inputs have flatter channel ranges, so :class:`~llmslim.quant.W8A8` (per-token int8
    activations) loses much less. Layers without a known coupling are left as they are and
    named in the report's notes. Weights stay float: run ``w8a8`` after it.

    Args:
        alpha: Migration strength in ``[0, 1]``: 0 leaves activations' ranges alone (the
            factors only flatten the weights' columns), 1 moves all of it into the weights;
            0.5 suits most LLMs, 0.75-0.85 models with severe outliers.
        scope: ``"all"`` (norms, value->output projections, up->down projections) or ``"norms"``
            (only norm->linear couplings, the original method).
        targets / ignore: Which consumer linears may be smoothed (a coupling is smoothed only
            when all its consumers are targeted); ``lm_head`` is ignored.
        blocks, propagate: As :class:`~llmslim.calibration.CalibrationPass`.

    Raises:
        ConfigError: ``alpha`` outside ``[0, 1]``, an unknown ``scope``.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim.testing import make_model
        >>> model, batch = make_model("attention", seed=0)
        >>> before = model(batch)
        >>> report = ls.compress_(model, SmoothQuant(alpha=0.5), calibration=[batch], progress=False)
        >>> bool(torch.allclose(model(batch), before, atol=1e-4)), report.all_rows[0].info["coupling"]
        (True, 'norm')
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    ignore: tuple[Target, ...] = ("lm_head",)
    alpha: float = 0.5
    scope: Literal["all", "norms"] = "all"

    produces: ClassVar[frozenset[str]] = frozenset({"smoothed"})
    rejects_after: ClassVar[Mapping[str, str]] = {"packed": "smoothing rescales float weights; run it before quantizing"}
    accepts: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    edits_in_place: ClassVar[bool] = True
    strategy_overrides: ClassVar[Mapping[str, Any]] = {"blocks": [None], "alpha": [0.0, 0.25, 0.5, 0.85, 1.0]}

    def validate(self) -> None:
        check_range(self.label, "alpha", self.alpha, 0.0, 1.0)

    def declares(self) -> dict[str, Any]:
        return {}

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        couplings, notes = find_couplings(model, self.scope)
        present = {c.__name__ for m in model.modules() for c in type(m).__mro__}
        targets = tuple(t for t in self.targets if t != "Conv1D" or t in present) or self.targets
        chosen = dict(select(model, targets, self.ignore, accepts=self.accepts, owner=f"pass {self.label!r}", warn_unmatched=False))
        plan: dict[str, Coupling] = {}
        for c in couplings:
            if all(n in chosen for n in c.consumers):
                plan.update(dict.fromkeys(c.consumers, c))
            else:
                notes.append(f"not smoothed: {c.source} -> {', '.join(c.consumers)}: not every consumer is targeted")
        # state of one run, not configuration (no dataclass fields): the couplings, which are done, notes
        self._plan, self._done, self._notes = plan, set(), notes
        return [(n, m) for n, m in chosen.items() if n in plan]

    def statistics(self, name: str, module: nn.Module) -> set[str]:
        return {"absmax"}

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow | None:
        if ctx.model is None:
            raise RuntimeError("SmoothQuant.solve runs inside the calibration engine, which sets ctx.model")
        started, before = time.perf_counter(), self.measure(module)
        c = self._plan[name]
        info: dict[str, Any] = {"coupling": c.kind, "source": c.source}
        if c.source in self._done:
            return self.row(name, module, before, started=started, **info, smoothed=True)
        self._done.add(c.source)
        mods = dict(ctx.model.named_modules())
        source, consumers = mods[c.source], [mods[n] for n in c.consumers]
        if c.kind == "norm" and not _scales_with_weight(source):
            self._notes.append(f"not smoothed: {c.source} ({type(source).__name__}): its output does not scale with its weight")
            return self.row(name, module, before, started=started, **info, smoothed=False)
        x_absmax = stats.absmax.float()
        columns = x_absmax.numel()
        w_absmax = torch.stack([float_weight(m)[0].abs().amax(0).float() for m in consumers]).amax(0)
        channel = c.channel_of(columns).to(x_absmax.device)
        channels = channel.max().item() + 1
        # a source channel feeding several columns (grouped heads) takes the largest of them
        x_src = torch.zeros(channels, device=x_absmax.device).scatter_reduce_(0, channel, x_absmax, "amax")
        w_src = torch.zeros(channels, device=x_absmax.device).scatter_reduce_(0, channel, w_absmax.to(x_absmax.device), "amax")
        s = smooth_scales(x_src, w_src, self.alpha)
        with torch.no_grad():
            for m in (source, *consumers):
                if ctx.journal is not None:
                    ctx.journal.save_(m)
            _divide_source_(source, s, c.kind)
            for m in consumers:
                weight, dim = in_columns(m)
                shape = [1, 1]
                shape[dim] = columns
                weight.mul_(s[channel].reshape(shape).to(weight))
        after = x_absmax / s[channel]
        return self.row(name, module, before, started=started, **info, smoothed=True, alpha=self.alpha,
                        scale_min=float(s.min()), scale_max=float(s.max()),
                        outlier_ratio_before=_outlier_ratio(x_absmax), outlier_ratio_after=_outlier_ratio(after))

    def report(self, rows: list[ModuleRow] | tuple[ModuleRow, ...] = (), *, modified: bool = True, notes: tuple[str, ...] = ()) -> Report:
        mine = tuple(dict.fromkeys(getattr(self, "_notes", ())))
        return super().report(rows, modified=modified, notes=(*mine, *notes))


def _outlier_ratio(absmax: torch.Tensor) -> float:
    # largest channel range over the median one: ~1 for flat inputs, 100+ with LLM outliers
    median = absmax.median().item()
    return float(absmax.max().item() / median) if median > 0 else float("inf")


def _divide_source_(source: nn.Module, s: torch.Tensor, kind: str) -> None:
    if kind == "norm":
        params = [source.weight, getattr(source, "bias", None)]
        for p in params:
            if isinstance(p, torch.Tensor):
                p.div_(s.to(p))
        return
    weight, dim = out_rows(source)
    shape = [1, 1]
    shape[dim] = s.numel()
    weight.div_(s.reshape(shape).to(weight))
    bias = getattr(source, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias))


def _scales_with_weight(norm: nn.Module) -> bool:
    # A norm computing weight * normalized(x) + bias: doubling weight and bias doubles the output.
    # Catches variants that would not (e.g. Gemma's (1 + weight) * x); checked once on a probe.
    weight = norm.weight
    if weight.device.type == "meta":
        return True
    probe = torch.randn(2, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        for p in (twin.weight, getattr(twin, "bias", None)):
            if isinstance(p, torch.Tensor):
                p.mul_(2)
        return bool(torch.allclose(twin(probe).float(), 2 * norm(probe).float(), rtol=1e-3, atol=1e-5))
