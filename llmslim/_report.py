"""The Report: a frozen tree, one node per pass and one row per module touched."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["ModuleRow", "Report"]


@dataclasses.dataclass(frozen=True)
class ModuleRow:
    """What a pass did to one module.

    Attributes:
        module: Qualified module name.
        kind: Class name of the module after the pass.
        params_before / params_after: Parameter counts.
        bytes_before / bytes_after: True storage bytes of parameters and buffers.
        sparsity: Fraction of zero weights after the pass, if it applies.
        bits: Bits per weight after the pass (32.0 for float32), if it applies.
        error: An error measure the pass computed (e.g. relative output error), or ``None``.
        seconds: Time spent on this module.
        info: Anything else the pass wants to show (kernel path, pattern, ...).
    """

    module: str
    kind: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    sparsity: float | None = None
    bits: float | None = None
    error: float | None = None
    seconds: float = 0.0
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Report:
    """A frozen tree: the root for a manager, one child per pass, rows per module touched.

    Whole-model totals (``bytes_before`` ...) are measured by the manager around each pass; the
    root's are the first child's "before" and the last child's "after".

    Example:
        >>> r = Report("demo", rows=(ModuleRow("fc", "Linear", 8, 8, 32, 16, bits=16.0),))
        >>> r.to_dict()["rows"][0]["bytes_after"]
        16
    """

    name: str
    rows: tuple[ModuleRow, ...] = ()
    children: tuple[Report, ...] = ()
    seconds: float = 0.0
    params_before: int | None = None
    params_after: int | None = None
    bytes_before: int | None = None
    bytes_after: int | None = None
    modified: bool = True
    notes: tuple[str, ...] = ()

    def walk(self):
        """Yield this node and every descendant, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    @property
    def all_rows(self) -> tuple[ModuleRow, ...]:
        """Every row of this node and its descendants, in order."""
        return tuple(row for node in self.walk() for row in node.rows)

    @property
    def compression(self) -> float | None:
        """``bytes_before / bytes_after`` for the whole model, where both are known."""
        if not self.bytes_before or not self.bytes_after:
            return None
        return self.bytes_before / self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict; :meth:`from_dict` reverses it."""
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Rebuild a Report from :meth:`to_dict` output."""
        data = dict(data)
        data["rows"] = tuple(ModuleRow(**row) for row in data.get("rows", ()))
        data["children"] = tuple(cls.from_dict(c) for c in data.get("children", ()))
        data["notes"] = tuple(data.get("notes", ()))
        return cls(**data)

    # -- rendering ---------------------------------------------------------------------
    _HEAD = ("pass / module", "kind", "params", "bytes before", "bytes after", "ratio", "sparsity", "bits", "error", "seconds")

    def _lines(self, depth: int = 0) -> list[tuple[str, ...]]:
        pad = "  " * depth
        lines = [
            (
                pad + self.name,
                "",
                _num(self.params_after),
                _num(self.bytes_before),
                _num(self.bytes_after),
                _ratio(self.bytes_before, self.bytes_after),
                "",
                "",
                "",
                f"{self.seconds:.2f}",
            )
        ]
        for r in self.rows:
            lines.append(
                (
                    pad + "  " + r.module,
                    r.kind,
                    _num(r.params_after),
                    _num(r.bytes_before),
                    _num(r.bytes_after),
                    _ratio(r.bytes_before, r.bytes_after),
                    "" if r.sparsity is None else f"{r.sparsity:.1%}",
                    "" if r.bits is None else f"{r.bits:g}",
                    "" if r.error is None else f"{r.error:.3g}",
                    f"{r.seconds:.2f}",
                )
            )
        for c in self.children:
            lines.extend(c._lines(depth + 1))
        return lines

    def __str__(self) -> str:
        lines = [self._HEAD, *self._lines()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self._HEAD))]
        out = []
        for line in lines:
            cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1])]
            cells += [cell.rjust(w) for cell, w in zip(line[2:], widths[2:])]
            out.append("  ".join(cells).rstrip())
        out.extend(f"note: {n}" for node in self.walk() for n in node.notes)
        return "\n".join(out)

    def to_markdown(self) -> str:
        """The table of ``str()`` as GitHub Markdown."""
        lines = self._lines()
        out = ["| " + " | ".join(self._HEAD) + " |", "|" + "---|" * 2 + "---:|" * (len(self._HEAD) - 2)]
        for line in lines:
            name = line[0]
            indent = len(name) - len(name.lstrip(" "))
            cells = ["&nbsp;" * indent + name.strip(), *line[1:]]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(out)


def _num(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


def _ratio(before: int | None, after: int | None) -> str:
    if not before or not after:
        return ""
    return f"{before / after:.2f}x"
