"""PassManager: chains passes, and is itself a pass; ``compress_``: the one-liner."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ._context import Context
from .calibration._pass import CalibrationPass, Sweep, sweeps
from ._measure import count_params, model_bytes
from ._original import frozen_copy, original_dtype
from ._pass import pass_name
from ._recipe import read_recipe, write_recipe
from ._registry import build_pass, to_spec
from ._report import Report
from ._rollback import Journal
from .errors import CalibrationError, ConfigError, OrderError, PassError

__all__ = ["PassManager", "compress_"]

log = logging.getLogger("llmslim")


class PassManager:
    """Runs passes in order; itself a ``Pass`` and ``Stepped``, so managers nest (and flatten).

    Before any work the plan is checked: each pass's ``requires`` is met by the Context, and no
    pass follows one whose ``produces`` tags it ``rejects_after``. A pass that raises is rolled
    back and reported as :class:`~llmslim.errors.PassError`; the passes before it stay applied.

    Args:
        passes: Passes, pass specs (``{"pass": name, ...}``), names, or other managers.
        name: Label of the root Report node.

    Example:
        >>> import dataclasses, torch
        >>> import llmslim as ls
        >>> @dataclasses.dataclass
        ... class Touch(ls.PassBase):
        ...     def apply(self, model, ctx):
        ...         return self.report([self.row(n, m, self.measure(m)) for n, m in self.modules(model, ctx)])
        >>> pm = ls.PassManager([Touch(name="a"), ls.PassManager([Touch(name="b")])])
        >>> [ls.pass_name(p) for p in pm.passes]
        ['a', 'b']
        >>> report = pm.apply(torch.nn.Linear(2, 2), ls.Context(progress=False))
        >>> [c.name for c in report.children]
        ['a', 'b']
    """

    def __init__(self, passes: Iterable[Any] = (), *, name: str = "pipeline") -> None:
        if isinstance(passes, (str, Mapping)) or callable(getattr(passes, "apply", None)):
            passes = [passes]
        if not isinstance(name, str) or not name:
            raise ConfigError(f"PassManager: name must be a non-empty string (got {name!r})")
        flat: list[Any] = []
        for p in passes:
            p = build_pass(p)
            flat.extend(p.passes if isinstance(p, PassManager) else [p])
        self.passes: tuple[Any, ...] = tuple(flat)
        self.name = name

    def __iter__(self) -> Iterator[Any]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PassManager) and (self.passes, self.name) == (other.passes, other.name)

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(map(repr, self.passes))}])"

    # -- plan -------------------------------------------------------------------------
    def check(self, ctx: Context | None = None) -> None:
        """Reject a bad chain before any work; with ``ctx``, also check required inputs.

        Raises:
            OrderError: A pass cannot run after an earlier one; names both.
            CalibrationError: A pass needs calibration data and ``ctx`` has none.
            ConfigError: A pass needs a teacher and ``ctx`` has none, or ``ctx`` streams the
                model block by block (``weights`` or ``after_block``) and the passes are not one
                calibration sweep.
        """
        if ctx is not None and (getattr(ctx, "weights", None) is not None or getattr(ctx, "after_block", None) is not None):
            _check_streamed(self.passes)
        produced: dict[str, str] = {}
        for p in self.passes:
            label = pass_name(p)
            for tag, reason in dict(getattr(p, "rejects_after", {})).items():
                if tag in produced:
                    raise OrderError(f"pass {label!r} cannot run after pass {produced[tag]!r}: {reason}")
            needs = frozenset(getattr(p, "requires", ()))
            if ctx is not None and "calibration" in needs and not ctx.calibration:
                raise CalibrationError(
                    f"pass {label!r} needs calibration data: pass calibration=[batch, ...] to compress_ or Context"
                )
            if ctx is not None and "teacher" in needs and ctx.teacher is None:
                raise ConfigError(f"pass {label!r} needs a teacher model: pass teacher=... to compress_ or Context")
            for tag in getattr(p, "produces", ()):
                produced.setdefault(tag, label)

    # -- the Pass and Stepped contract ----------------------------------------------------
    def apply(self, model: nn.Module, ctx: Context | None = None) -> Report:
        """Check the plan, then apply every pass in order; return the Report tree.

        When a pass requires ``"original"`` and ``ctx`` has no teacher, a frozen copy of the
        model as it is now is kept in ``ctx.original`` (on the CPU, see :func:`frozen_copy`)
        until this call returns. While each pass runs, ``ctx.applied`` holds the passes before
        it, so a pass that trains can ``step`` them.
        """
        ctx = Context() if ctx is None else ctx
        start = time.perf_counter()
        self.check(ctx)
        wanting = [p for p in self.passes if "original" in frozenset(getattr(p, "requires", ()) or ())]
        kept = bool(wanting) and ctx.original is None and ctx.teacher is None
        if kept:
            ctx.original = frozen_copy(model, dtype=original_dtype(wanting))
        children: list[Report] = []
        applied: list[Any] = []
        try:
            for unit in sweeps(self.passes):  # consecutive calibration passes share one sweep
                ctx.applied = tuple(applied)
                report = self._run(unit, "apply", model, ctx, [c.name for c in children])
                children.extend(_spliced(report) if isinstance(unit, Sweep) else [report])
                applied.extend(unit.passes if isinstance(unit, Sweep) else [unit])
        finally:
            ctx.applied = ()
            if kept:
                ctx.original = None
        return _root(self.name, children, start)

    def step(self, model: nn.Module, ctx: Context) -> None:
        """Call ``step`` on every pass that has one, then advance ``ctx.step``. No rollback here."""
        for p in self.passes:
            fn = getattr(p, "step", None)
            if callable(fn):
                ctx.module = None
                try:
                    fn(model, ctx)
                except Exception as exc:
                    raise PassError(pass_name(p), exc, module=ctx.module, rolled_back=False, phase="step") from exc
        ctx.step += 1

    def finalize(self, model: nn.Module, ctx: Context | None = None) -> Report:
        """Call ``finalize`` on every pass that has one (each rolled back if it raises)."""
        ctx = Context() if ctx is None else ctx
        start = time.perf_counter()
        children: list[Report] = []
        done: list[str] = []
        for p in self.passes:
            if callable(getattr(p, "finalize", None)):
                report = self._run(p, "finalize", model, ctx, done)
                if report is not None:
                    children.append(dataclasses.replace(report, name=f"{report.name}.finalize"))
            done.append(pass_name(p))
        return _root(f"{self.name}.finalize", children, start)

    @staticmethod
    def _run(p: Any, phase: str, model: nn.Module, ctx: Context, done: Sequence[str]) -> Report | None:
        label = pass_name(p)
        bytes_before, params_before = model_bytes(model), count_params(model)
        journal = Journal(model) if ctx.rollback else None
        ctx.journal, ctx.module, ctx.model = journal, None, model
        log.info("%s: %s started (after: %s)", label, phase, ", ".join(done) or "nothing")
        start = time.perf_counter()
        try:
            report = getattr(p, phase)(model, ctx)
            if report is not None and not isinstance(report, Report):
                raise TypeError(f"{phase}() must return a Report (got {type(report).__name__})")
        except BaseException as exc:
            rolled_back = False
            if journal is not None:
                try:
                    journal.rollback()
                    rolled_back = True
                except Exception:  # keep the pass's error; say the model may be modified
                    log.exception("%s: rollback failed", label)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends: model restored, error unchanged
            # the name now: a shared sweep names the pass that was solving
            raise PassError(pass_name(p), exc, module=ctx.module, completed=done, rolled_back=rolled_back, phase=phase) from exc
        finally:
            ctx.journal = None
        if report is None:
            return None
        if report.modified:
            ctx.invalidate()
        seconds, bytes_after = time.perf_counter() - start, model_bytes(model)
        log.info("%s: %s done in %.2fs, model bytes %d -> %d", label, phase, seconds, bytes_before, bytes_after)
        return dataclasses.replace(
            report,
            name=label,
            seconds=seconds,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            params_before=params_before,
            params_after=count_params(model),
        )

    # -- recipes --------------------------------------------------------------------------
    def to_recipe(self) -> dict[str, Any]:
        """This chain as data: ``{"passes": [spec, ...]}`` (plus ``name`` when not the default)."""
        recipe: dict[str, Any] = {"passes": [to_spec(p) for p in self.passes]}
        if self.name != "pipeline":
            recipe["name"] = self.name
        return recipe

    @classmethod
    def from_recipe(cls, source: Mapping[str, Any] | str | os.PathLike[str]) -> PassManager:
        """Build a manager from a recipe dict or a ``.json``/``.toml`` file.

        Raises:
            ConfigError: Malformed recipe or pass fields.
            RegistryError: Unknown pass name or broken plugin.
        """
        recipe = read_recipe(source)
        return cls(recipe["passes"], name=recipe.get("name", "pipeline"))

    def save_recipe(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_recipe` to a ``.json`` or ``.toml`` file atomically."""
        return write_recipe(self.to_recipe(), path)


def _spliced(report: Report) -> list[Report]:
    # A shared sweep's passes are reported one by one, each with the sweep's whole-model totals.
    totals = {k: getattr(report, k) for k in ("seconds", "bytes_before", "bytes_after", "params_before", "params_after")}
    return [dataclasses.replace(child, **totals) for child in report.children]


def _root(name: str, children: list[Report], start: float) -> Report:
    return Report(
        name,
        children=tuple(children),
        seconds=time.perf_counter() - start,
        params_before=children[0].params_before if children else None,
        params_after=children[-1].params_after if children else None,
        bytes_before=children[0].bytes_before if children else None,
        bytes_after=children[-1].bytes_after if children else None,
        modified=any(c.modified for c in children),
    )


def _check_streamed(passes: Sequence[Any]) -> None:
    # Each block is loaded from disk (and/or handed to after_block, e.g. written) once: a second
    # sweep or a pass working on the whole model would see meta tensors or change written blocks.
    units = sweeps(passes)
    if len(units) != 1 or not isinstance(units[0], (CalibrationPass, Sweep)):
        names = ", ".join(repr(pass_name(p)) for p in passes) or "none"
        raise ConfigError(
            "a Context with weights on disk or after_block runs the model block by block once: the passes must be "
            f"calibration passes sharing one sweep (same blocks and propagate); got {names}"
        )


def compress_(
    model: nn.Module,
    *passes: Any,
    calibration: Sequence[Any] | None = None,
    teacher: nn.Module | None = None,
    ctx: Context | None = None,
    device: Any = None,
    progress: bool = True,
    finalize: bool = True,
) -> Report:
    """Compress ``model`` in place with ``passes`` (then finalize them); return the Report.

    Args:
        model: Any ``nn.Module``; edited in place.
        *passes: Passes, specs, names or managers (a single list works too).
        calibration: Calibration batches, for passes that need data.
        teacher: Teacher model, for distillation.
        ctx: A ready Context instead of ``calibration``/``teacher``/``device``/``progress``.
        device: Compute device for the passes.
        progress: Show progress bars.
        finalize: Also call ``finalize`` (turn masks and fake quantization into final form).

    Raises:
        ConfigError: Both ``ctx`` and context arguments were given, or a pass is misconfigured.
        OrderError: The chain is invalid (before any work).
        PassError: A pass raised; the model is as it was before that pass.

    Example:
        >>> import dataclasses, torch
        >>> import llmslim as ls
        >>> @dataclasses.dataclass
        ... class Zero(ls.PassBase):
        ...     edits_in_place = True
        ...     def apply(self, model, ctx):
        ...         rows = []
        ...         for name, m in self.modules(model, ctx):
        ...             before = self.measure(m)
        ...             with torch.no_grad():
        ...                 m.weight.zero_()
        ...             rows.append(self.row(name, m, before))
        ...         return self.report(rows)
        >>> report = ls.compress_(torch.nn.Linear(4, 4), Zero(), progress=False)
        >>> report.all_rows[0].sparsity
        1.0
    """
    start = time.perf_counter()
    if len(passes) == 1 and isinstance(passes[0], (list, tuple)):
        passes = tuple(passes[0])
    if ctx is not None and (calibration is not None or teacher is not None or device is not None):
        raise ConfigError("compress_: give either ctx or calibration/teacher/device, not both")
    ctx = ctx or Context(calibration, teacher=teacher, device=device, progress=progress)
    manager = PassManager(passes, name="compress_")
    report = manager.apply(model, ctx)
    if not finalize:
        return report
    done = manager.finalize(model, ctx)
    return _root("compress_", [*report.children, *done.children], start)
