"""The state one ``check_pass`` call shares between its checks.

:class:`Run` holds a pristine eval copy of the caller's model and runs the pass on fresh deep
copies, lazily: the main run (apply, then finalize, through a ``PassManager``) happens once, on
first use, and every check reads what it recorded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._context import Context
from .._manager import PassManager
from .._measure import Stats, count_params, model_bytes, module_stats
from .._pass import pass_name
from .._report import Report
from ..errors import ConfigError, LlmslimError, PassError
from ._compare import Snapshot, first_nonfinite, global_hook_counts, snapshot, snapshot_diff
from ._contract import Refused, Violation

__all__ = ["InjectedFailure", "ProbeContext", "FailAfter", "Applied", "Run"]


class InjectedFailure(Exception):
    """The failure ``check_pass`` injects into a pass to test rollback."""


class ProbeContext(Context):
    """A Context that records the modules a pass enters, and can fail on entering the k-th.

    Args:
        fail_at: Raise :class:`InjectedFailure` on entering the module with this index (0-based)
            through :meth:`working_on`; ``None`` never fails.
        **kwargs: Passed to :class:`~llmslim.Context`.

    Example:
        >>> import torch
        >>> ctx = ProbeContext(fail_at=1, progress=False)
        >>> with ctx.working_on("a", torch.nn.Linear(1, 1)):
        ...     pass
        >>> try:
        ...     with ctx.working_on("b", torch.nn.Linear(1, 1)):
        ...         pass
        ... except InjectedFailure as exc:
        ...     print(exc)
        failure injected by check_pass on entering module 'b' (module #2)
    """

    def __init__(self, *args: Any, fail_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered: list[str] = []
        self.fail_at = fail_at

    @contextlib.contextmanager
    def working_on(self, name: str, module: nn.Module, *, in_place: bool = True) -> Iterator[None]:
        index = len(self.entered)
        self.entered.append(name)
        if self.fail_at is not None and index == self.fail_at:
            self.module = name
            raise InjectedFailure(f"failure injected by check_pass on entering module {name!r} (module #{index + 1})")
        with super().working_on(name, module, in_place=in_place):
            yield


class FailAfter:
    """Wraps a pass; ``phase`` (``"apply"`` or ``"finalize"``) raises after the real one returned.

    Every other attribute (``requires``, ``produces``, ...) is the wrapped pass's.
    """

    def __init__(self, inner: Any, phase: str) -> None:
        self._inner = inner
        self._phase = phase

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def name(self) -> str:
        return pass_name(self._inner)

    def apply(self, model: nn.Module, ctx: Context) -> Any:
        report = self._inner.apply(model, ctx)
        if self._phase == "apply":
            raise InjectedFailure("failure injected by check_pass after apply() returned")
        return report

    def finalize(self, model: nn.Module, ctx: Context) -> Any:
        report = self._inner.finalize(model, ctx)
        if self._phase == "finalize":
            raise InjectedFailure("failure injected by check_pass after finalize() returned")
        return report


Measured = dict[str, "tuple[str, Stats] | None"]


@dataclasses.dataclass
class Applied:
    """What one run of the pass (apply, then finalize) left behind.

    Attributes:
        model: The model after finalize.
        apply_report / finalize_report: The manager's root Reports of both phases.
        after_apply / final: Snapshots after apply and after finalize.
        apply_measured / final_measured: ``{row module: (class name, fresh Stats)}`` for every
            row of the phase's report, measured right after that phase (``None``: no such module).
        apply_totals / final_totals: ``(model_bytes, parameter count)`` after each phase.
        entered: Modules entered through ``ctx.working_on`` during apply, in order.
        output: The model's output on the batch after finalize (``None`` if it raised).
        output_error: The forward's exception as text, or ``None``.
    """

    model: nn.Module
    apply_report: Report
    finalize_report: Report
    after_apply: Snapshot
    final: Snapshot
    apply_measured: Measured
    final_measured: Measured
    apply_totals: tuple[int, int]
    final_totals: tuple[int, int]
    entered: tuple[str, ...]
    output: Any
    output_error: str | None


def _measure_rows(model: nn.Module, report: Report) -> Measured:
    out: Measured = {}
    for row in report.all_rows:
        try:
            module = model.get_submodule(row.module)
        except AttributeError:
            out[row.module] = None
        else:
            out[row.module] = (type(module).__name__, module_stats(module))
    return out


def _totals(model: nn.Module) -> tuple[int, int]:
    return model_bytes(model), count_params(model)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, PassError) and exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {cause}"


class Run:
    """One ``check_pass`` call: the inputs, and runs of the pass on fresh copies of the model.

    Attributes:
        pass_: The caller's pass (never run itself: each run gets a deep copy).
        original: An eval-mode deep copy of the caller's model (never given to a pass).
        batch, seed, atol, rtol, forward: As given to ``check_pass``.
        notes: Remarks the checks add to the result.
        global_hooks: Global module hook counts before any run.
    """

    def __init__(
        self,
        *,
        pass_: Any,
        model: nn.Module,
        batch: Any,
        calibration: Sequence[Any] | None,
        teacher: nn.Module | None,
        forward: Callable[[nn.Module, Any], Any],
        seed: int,
        atol: float,
        rtol: float,
    ) -> None:
        self.pass_ = pass_
        self.label = pass_name(pass_)
        try:
            self.original = copy.deepcopy(model).eval()
            self.batch = copy.deepcopy(batch)
        except Exception as exc:
            raise ConfigError(
                f"check_pass works on copies: model and batch must support copy.deepcopy ({type(exc).__name__}: {exc})"
            ) from exc
        self.forward = forward
        self.seed = seed
        self.atol = atol
        self.rtol = rtol
        self.notes: list[str] = []
        self.global_hooks = global_hook_counts()
        needs = frozenset(getattr(pass_, "requires", ()) or ())
        if calibration is None and "calibration" in needs:
            calibration = [self.batch]
        self._calibration = None if calibration is None else list(calibration)
        if teacher is None and "teacher" in needs:
            teacher = self.original
        self._teacher = teacher

    # -- building blocks -------------------------------------------------------------------
    def fresh_model(self) -> nn.Module:
        """A new deep copy of the original model."""
        return copy.deepcopy(self.original)

    def fresh_pass(self) -> Any:
        """A new deep copy of the pass under test."""
        return copy.deepcopy(self.pass_)

    def context(self, *, fail_at: int | None = None) -> ProbeContext:
        """A new Context (a :class:`ProbeContext`) with copies of the calibration and teacher."""
        return ProbeContext(
            None if self._calibration is None else copy.deepcopy(self._calibration),
            teacher=None if self._teacher is None else copy.deepcopy(self._teacher).eval(),
            forward=self.forward,
            progress=False,
            seed=self.seed,
            rollback=True,
            fail_at=fail_at,
        )

    def output(self, model: nn.Module) -> Any:
        """Run ``model`` on a copy of the batch, without gradients."""
        with torch.no_grad():
            return self.forward(model, copy.deepcopy(self.batch))

    @functools.cached_property
    def reference(self) -> Any:
        """The original model's output on the batch."""
        try:
            return self.output(self.original)
        except Exception as exc:
            raise Violation(
                f"the model does not run on the batch even before the pass ({type(exc).__name__}: {exc}); "
                "give check_pass a batch (and forward) the model accepts",
                check="runs",
            ) from exc

    @functools.cached_property
    def before(self) -> Snapshot:
        """Snapshot of the original model."""
        return snapshot(self.original)

    @functools.cached_property
    def main(self) -> Applied:
        """The main run of the pass (done once, on first use)."""
        self.reference  # noqa: B018  (a model that never ran is the caller's problem, said first)
        return self.execute()

    def execute(self) -> Applied:
        """Apply, then finalize, the pass on a fresh copy, seeded; record everything."""
        model, p, ctx = self.fresh_model(), self.fresh_pass(), self.context()
        manager = PassManager([p], name="check_pass")
        torch.manual_seed(self.seed)
        try:
            applied = manager.apply(model, ctx)
        except LlmslimError as exc:
            self._refusal(model, exc)
            where = f" (module {exc.module!r})" if isinstance(exc, PassError) and exc.module else ""
            raise Violation(
                f"the pass raised on this model{where}: {_describe(exc)}",
                module=getattr(exc, "module", None),
                check="runs",
            ) from exc
        after_apply, apply_measured, apply_totals = snapshot(model), _measure_rows(model, applied), _totals(model)
        entered = tuple(ctx.entered)
        try:
            finalized = manager.finalize(model, ctx)
        except LlmslimError as exc:
            raise Violation(
                f"finalize raised on this model: {_describe(exc)}", module=getattr(exc, "module", None), check="runs"
            ) from exc
        final, final_measured, final_totals = snapshot(model), _measure_rows(model, finalized), _totals(model)
        output, error = None, None
        try:
            output = self.output(model)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Applied(
            model=model,
            apply_report=applied,
            finalize_report=finalized,
            after_apply=after_apply,
            final=final,
            apply_measured=apply_measured,
            final_measured=final_measured,
            apply_totals=apply_totals,
            final_totals=final_totals,
            entered=entered,
            output=output,
            output_error=error,
        )

    def _refusal(self, model: nn.Module, exc: LlmslimError) -> None:
        """Raise ``Refused`` when the pass refused a model already non-finite before it and left it as it was."""
        broken = first_nonfinite(self.reference)
        if broken is None or snapshot_diff(self.before, snapshot(model)) is not None:
            return  # a finite model must not be refused; a refusal must leave the model as it was
        raise Refused(f"the model's {broken[0]} ({broken[1]}) is non-finite before the pass, which refused it cleanly: {_describe(exc)}")

    def final_output(self) -> Any:
        """The output after the main run; a ``runs`` violation when the model no longer runs."""
        main = self.main
        if main.output_error is not None:
            raise Violation(f"the model no longer runs on the batch after the pass: {main.output_error}", check="runs")
        return main.output
