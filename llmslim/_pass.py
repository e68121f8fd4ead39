"""The pass contract: ``Pass`` (one method), ``Stepped`` (training-time), ``PassBase`` (convenience)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn

from ._context import Context
from ._measure import Stats, module_stats
from ._registry import registered_name, to_spec
from ._report import ModuleRow, Report
from ._targets import Target, select
from ._validate import check_fields
from .errors import ConfigError

__all__ = ["Pass", "Stepped", "PassBase", "pass_name"]


@runtime_checkable
class Pass(Protocol):
    """Anything that compresses a model in place and says what it did.

    Example:
        >>> import llmslim as ls
        >>> class Nothing:
        ...     def apply(self, model, ctx):
        ...         return ls.Report("nothing", modified=False)
        >>> isinstance(Nothing(), ls.Pass)
        True
    """

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Edit ``model`` in place and return a :class:`Report`."""
        ...


@runtime_checkable
class Stepped(Protocol):
    """A pass that also acts during training: ``step`` each training step, then ``finalize``.

    ``finalize`` turns training-time state (masks, fake quantization) into the end product and
    may return a Report of what it did.
    """

    def step(self, model: nn.Module, ctx: Context) -> None:
        """Called once per training step, after the optimizer step."""
        ...

    def finalize(self, model: nn.Module, ctx: Context) -> Report | None:
        """Bake training-time state into the final model."""
        ...


def pass_name(p: Any) -> str:
    """A display name for any pass: its ``name`` attribute, else its registered name or class."""
    name = getattr(p, "name", None)
    if isinstance(name, str) and name:
        return name
    return registered_name(type(p)) or type(p).__name__


_RESERVED = frozenset(
    {"label", "select", "modules", "measure", "row", "report", "apply", "step", "finalize", "to_spec", "validate",
     "requires", "produces", "rejects_after", "accepts", "edits_in_place"}
)


@dataclasses.dataclass
class PassBase:
    """Dataclass convenience base for passes: targets, ignore, name, checks and spec round-trip.

    Subclasses are dataclasses whose public fields are configuration only; every field is checked
    against its annotation at construction ("must be X (got Y)"), and ``validate`` adds the
    pass's own rules. Class attributes declare what the plan check needs to know:

    * ``requires``: inputs needed from the Context (``"calibration"``, ``"teacher"``), or
      ``"original"``: a reference model, the Context's teacher if it has one, else a frozen
      copy of the model as it was before the manager's first pass, which the manager keeps in
      ``ctx.original`` while it applies (on the CPU, floating parameters in the pass's
      ``original_dtype`` when it has one);
    * ``produces``: tags this pass leaves on the model (``"packed"``, ``"masks"``, ``"structural"``);
    * ``rejects_after``: ``{tag: reason}``, tags of earlier passes this pass cannot follow;
    * ``accepts``: class names of the modules it can handle (``()`` means any);
    * ``edits_in_place``: whether it changes tensor values in place (then ``modules`` journals
      each module before yielding it, so rollback can restore it).

    Args:
        targets: Which modules to work on (globs, ``re:`` expressions, class names, types,
            predicates).
        ignore: Modules to leave alone, same syntax.
        name: Label in reports and errors; defaults to the registered name.

    Example:
        >>> import dataclasses, torch
        >>> import llmslim as ls
        >>> @dataclasses.dataclass
        ... class Halve(ls.PassBase):
        ...     factor: float = 0.5
        ...     edits_in_place = True
        ...     def apply(self, model, ctx):
        ...         rows = []
        ...         for name, module in self.modules(model, ctx):
        ...             before = self.measure(module)
        ...             with torch.no_grad():
        ...                 module.weight.mul_(self.factor)
        ...             rows.append(self.row(name, module, before))
        ...         return self.report(rows)
        >>> report = ls.compress_(torch.nn.Linear(4, 4), Halve(), progress=False)
        >>> report.children[0].rows[0].module
        ''
    """

    targets: tuple[Target, ...] = ("Linear",)
    ignore: tuple[Target, ...] = ()
    name: str | None = None

    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    rejects_after: ClassVar[Mapping[str, str]] = {}
    accepts: ClassVar[tuple[str, ...]] = ()
    edits_in_place: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        annotations = cls.__dict__.get("__annotations__", {})
        clash = sorted(n for n in set(annotations) & _RESERVED if "ClassVar" not in str(annotations[n]))
        if clash:
            raise ConfigError(
                f"{cls.__name__}: field name(s) {clash} must not shadow PassBase attributes; choose other names"
            )

    def __post_init__(self) -> None:
        owner = self.label
        for field in ("targets", "ignore"):
            value = getattr(self, field)
            if isinstance(value, (str, type)) or (callable(value) and not isinstance(value, (list, tuple))):
                value = (value,)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{owner}: {field} must be a sequence of targets (got {value!r})")
            for t in value:
                if not (isinstance(t, str) or callable(t)):
                    raise ConfigError(f"{owner}: {field} must be strings, module types or predicates (got {t!r})")
            object.__setattr__(self, field, tuple(value))
        if not self.targets:
            raise ConfigError(f"{owner}: targets must not be empty (got ())")
        check_fields(self, owner, skip=lambda n: n in ("targets", "ignore"))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise :class:`ConfigError`. Default: none."""

    @property
    def label(self) -> str:
        """The name shown in reports and errors."""
        return pass_name(self)

    # -- the contract ----------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Edit ``model`` in place; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(model, ctx)")

    def step(self, model: nn.Module, ctx: Context) -> None:
        """Training-step hook; does nothing by default."""

    def finalize(self, model: nn.Module, ctx: Context) -> Report | None:
        """Bake training-time state; does nothing by default."""
        return None

    def to_spec(self) -> dict[str, Any]:
        """This pass as a recipe entry; ``build_pass(p.to_spec()) == p``."""
        return to_spec(self)

    # -- helpers for subclasses --------------------------------------------------------
    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules this pass targets, in model order (raises TargetError when none)."""
        default = self.__dataclass_fields__["targets"].default
        return select(
            model, self.targets, self.ignore, accepts=self.accepts, owner=f"pass {self.label!r}",
            warn_unmatched=self.targets != default,
        )

    def modules(self, model: nn.Module, ctx: Context, *, desc: str | None = None) -> Iterator[tuple[str, nn.Module]]:
        """Iterate the targets with a progress bar, marking (and journaling) each one."""
        chosen = self.select(model)
        for name, module in ctx.progress_bar(chosen, desc=desc or self.label, total=len(chosen)):
            with ctx.working_on(name, module, in_place=self.edits_in_place):
                yield name, module

    @staticmethod
    def measure(module: nn.Module) -> Stats:
        """Measure a module before changing it (pass the result to :meth:`row`)."""
        return module_stats(module)

    def row(
        self,
        name: str,
        module: nn.Module,
        before: Stats,
        *,
        started: float | None = None,
        error: float | None = None,
        **info: Any,
    ) -> ModuleRow:
        """A report row for ``module`` (as it is now) against its ``before`` measurement."""
        after = module_stats(module)
        return ModuleRow(
            module=name,
            kind=type(module).__name__,
            params_before=before.params,
            params_after=after.params,
            bytes_before=before.bytes,
            bytes_after=after.bytes,
            sparsity=after.sparsity,
            bits=after.bits,
            error=error,
            seconds=0.0 if started is None else time.perf_counter() - started,
            info=info,
        )

    def report(self, rows: list[ModuleRow] | tuple[ModuleRow, ...] = (), *, modified: bool = True, notes: tuple[str, ...] = ()) -> Report:
        """This pass's Report node."""
        return Report(self.label, rows=tuple(rows), modified=modified, notes=tuple(notes))
