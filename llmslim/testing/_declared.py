"""Declared properties: what a pass promises about the model it leaves, checked generically.

A pass declares properties in one of two ways:

* it defines ``declares(self) -> Mapping[str, Any]``, ``{property: value}`` (return ``{}`` to
  declare nothing, e.g. when a ``sparsity`` field means something else for this pass);
* otherwise they are read from fields with well-known names: a numeric ``sparsity`` field, an
  ``"N:M"`` string ``pattern`` field, a numeric ``bits`` field, and ``"structural"`` in
  ``produces``.

Known properties (later pass families register more with :func:`register_property`):

* ``sparsity`` (float): every module in the report's rows has measured sparsity at least the
  value, less one weight row's share (``rows / numel``, the rounding slack of per-row pruning);
* ``pattern`` (``"N:M"``): in every full group of M consecutive weights along the input
  dimension (the weight flattened to ``(out, -1)``; Hugging Face ``Conv1D``'s transposed) at
  least ``M - N`` are zero;
* ``bits`` (number): every module in the report's rows measures at most this many bits;
* ``fewer_params`` (``True``): the model has fewer parameters after the pass than before.

Modules are read from the model after finalize, at the names in the apply report's rows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._measure import count_params, module_stats
from .._report import ModuleRow
from ._contract import Violation

__all__ = ["Evidence", "register_property", "declared_properties", "check_declared", "known_properties"]


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What a property check may look at.

    Attributes:
        before: The model before the pass.
        after: The model after apply and finalize.
        rows: Rows of the pass's apply report (the modules it says it worked on).
        atol: Extra absolute slack granted by the caller.
    """

    before: nn.Module
    after: nn.Module
    rows: tuple[ModuleRow, ...]
    atol: float

    def modules(self, prop: str) -> list[tuple[str, nn.Module]]:
        """The reported modules as they are after the pass (a module that vanished is an error)."""
        if not self.rows:
            raise Violation(f"the pass declares {prop!r} but its report has no module rows to check it on")
        out = []
        removed = {row.module for row in self.rows if row.params_after == 0 and row.bytes_after == 0}
        for name in dict.fromkeys(row.module for row in self.rows):
            try:
                out.append((name, self.after.get_submodule(name)))
            except AttributeError:
                if name not in removed:  # a module the pass removed, reported as such, has no property
                    raise Violation(f"the report names module {name!r}, which is not in the model after the pass", module=name) from None
        return out


PropertyCheck = Callable[[Any, Evidence], None]
_PROPERTIES: dict[str, PropertyCheck] = {}


def register_property(name: str) -> Callable[[PropertyCheck], PropertyCheck]:
    """Decorator registering ``fn(value, evidence)`` as the check of declared property ``name``.

    The function raises :class:`~llmslim.testing._contract.Violation` when the property fails.

    Example:
        >>> @register_property("doc-nothing")
        ... def _nothing(value, evidence):
        ...     pass
        >>> "doc-nothing" in known_properties()
        True
        >>> del _PROPERTIES["doc-nothing"]
    """

    def deco(fn: PropertyCheck) -> PropertyCheck:
        if name in _PROPERTIES:
            raise ValueError(f"declared property {name!r} is already registered")
        _PROPERTIES[name] = fn
        return fn

    return deco


def known_properties() -> tuple[str, ...]:
    """Names of the properties a pass may declare."""
    return tuple(_PROPERTIES)


_PATTERN = re.compile(r"(\d+):(\d+)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def declared_properties(p: Any) -> dict[str, Any]:
    """The properties pass ``p`` declares: ``p.declares()``, or read from well-known fields.

    Raises:
        Violation: ``declares()`` returned something other than a mapping.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Prune:
        ...     sparsity: float = 0.5
        ...     pattern: str = "2:4"
        ...     def apply(self, model, ctx): ...
        >>> declared_properties(Prune())
        {'sparsity': 0.5, 'pattern': '2:4'}
    """
    declares = getattr(p, "declares", None)
    if callable(declares):
        out = declares()
        if not isinstance(out, Mapping):
            raise Violation(f"declares() must return a mapping {{property: value}} (got {out!r})")
        return dict(out)
    props: dict[str, Any] = {}
    sparsity = getattr(p, "sparsity", None)
    if _number(sparsity):
        props["sparsity"] = float(sparsity)
    pattern = getattr(p, "pattern", None)
    if isinstance(pattern, str) and _PATTERN.fullmatch(pattern):
        props["pattern"] = pattern
    bits = getattr(p, "bits", None)
    if _number(bits):
        props["bits"] = float(bits)
    if "structural" in (getattr(p, "produces", ()) or ()):
        props["fewer_params"] = True
    return props


def check_declared(p: Any, evidence: Evidence) -> dict[str, Any]:
    """Check every property ``p`` declares; return them.

    Raises:
        Violation: A property fails, or is unknown.
    """
    props = declared_properties(p)
    for name, value in props.items():
        fn = _PROPERTIES.get(name)
        if fn is None:
            raise Violation(f"the pass declares unknown property {name!r}; known properties: {', '.join(_PROPERTIES)}")
        fn(value, evidence)
    return props


def _weight(name: str, module: nn.Module, prop: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise Violation(f"declared {prop!r} cannot be checked: module has no floating-point 'weight'", module=name)
    return w.detach()


def _output_rows(module: nn.Module, w: torch.Tensor) -> int:
    from ..prune._mask import rows_view

    return rows_view(module, w).shape[0]


# -- the known properties ---------------------------------------------------------------------
@register_property("sparsity")
def _sparsity(value: Any, ev: Evidence) -> None:
    if not _number(value) or not 0.0 <= value <= 1.0:
        raise Violation(f"declared sparsity must be a number in [0, 1] (got {value!r})")
    if value == 0.0:
        return
    for name, module in ev.modules("sparsity"):
        measured = module_stats(module).sparsity
        if measured is None:
            raise Violation(f"declares sparsity {value:g} but the module's sparsity cannot be measured", module=name)
        w = getattr(module, "weight", None)
        # one weight per output row (rows as pruning sees them: GPT-2's Conv1D stores [in, out])
        slack = (_output_rows(module, w) / w.numel()) if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.numel() else 0.0
        if measured < value - slack - ev.atol - 1e-12:
            raise Violation(
                f"module {name!r} has sparsity {measured:.4f}, below the declared {value:g} "
                f"(short by {value - measured:.4f}; allowed slack {slack + ev.atol:.4f})",
                module=name,
            )


@register_property("pattern")
def _pattern(value: Any, ev: Evidence) -> None:
    match = _PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match.group(2)) or int(match.group(1)) > int(match.group(2)):
        raise Violation(f"declared pattern must be 'N:M' with N <= M (got {value!r})")
    n, m = int(match.group(1)), int(match.group(2))
    for name, module in ev.modules("pattern"):
        w = _weight(name, module, "pattern")
        if w.dim() == 2 and any(c.__name__ == "Conv1D" for c in type(module).__mro__):
            w = w.t()  # Hugging Face Conv1D (GPT-2) stores its weight as (in, out)
        flat = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
        full = flat.shape[1] // m * m
        if full == 0:
            continue
        groups = flat[:, :full].reshape(flat.shape[0], -1, m)
        nonzero = (groups != 0).sum(dim=-1)
        bad = nonzero > n
        if bool(bad.any()):
            row, group = (int(i) for i in bad.nonzero()[0])
            raise Violation(
                f"module {name!r} breaks the declared {value} pattern in {int(bad.sum())} of {bad.numel()} groups "
                f"(e.g. row {row}, columns {group * m}..{group * m + m - 1} hold {int(nonzero[row, group])} nonzeros)",
                module=name,
            )


@register_property("bits")
def _bits(value: Any, ev: Evidence) -> None:
    if not _number(value) or value <= 0:
        raise Violation(f"declared bits must be a number > 0 (got {value!r})")
    for name, module in ev.modules("bits"):
        measured = module_stats(module).bits
        if measured is None:
            raise Violation(f"declares {value:g} bits but the module's bits cannot be measured", module=name)
        if measured > value + 1e-9:
            raise Violation(
                f"module {name!r} stores {measured:g} bits per weight, more than the declared {value:g}", module=name
            )


@register_property("fewer_params")
def _fewer_params(value: Any, ev: Evidence) -> None:
    if value is not True:
        return
    before, after = count_params(ev.before), count_params(ev.after)
    if after >= before:
        raise Violation(f"the pass is structural but the model has {after} parameters after it, {before} before")
