"""The built-in checks of the pass contract, registered in the order ``check_pass`` runs them.

Each check reads the shared :class:`~llmslim.testing._run.Run`, raises ``Violation`` with the
module and the amount when the pass breaks the contract, and ``Skip`` when it does not apply.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import torch

from .._manager import PassManager
from .._registry import build_pass, registered_name, to_spec
from .._report import Report
from ..errors import ConfigError, LlmslimError, PassError
from ._compare import (
    first_nonfinite,
    flatten_output,
    global_hook_counts,
    hook_counts,
    nonfinite,
    parametrized_modules,
    snapshot,
    snapshot_diff,
    split_name,
    structure_diff,
    tensor_diff,
)
from ._contract import Skip, Violation, register_check
from ._declared import Evidence, check_declared, declared_properties
from ._run import FailAfter, InjectedFailure, Measured, Run

__all__: list[str] = []


# -- runs, finite ----------------------------------------------------------------------------
@register_check("runs")
def check_runs(run: Run) -> None:
    """The pass applies, and the model still runs on the batch with the same output structure and shapes."""
    diff = structure_diff(run.reference, run.final_output())
    if diff is not None:
        raise Violation(diff)


@register_check("finite")
def check_finite(run: Run) -> None:
    """No NaN or Inf in the outputs, parameters or buffers after the pass."""
    broken = first_nonfinite(run.reference)
    if broken is not None:
        raise Skip(f"the model's {broken[0]} is already non-finite before the pass ({broken[1]})")
    for name, t in run.before.tensors.items():
        if nonfinite(t):
            raise Skip(f"tensor {name!r} is already non-finite before the pass ({nonfinite(t)})")
    for name, t in run.main.final.tensors.items():
        bad = nonfinite(t)
        if bad:
            module, leaf = split_name(name)
            raise Violation(f"module {module!r}: tensor {leaf!r} has {bad} after the pass", module=module)
    broken = first_nonfinite(run.final_output())
    if broken is not None:
        raise Violation(f"{broken[0]} has {broken[1]} after the pass")


# -- report ----------------------------------------------------------------------------------
def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or abs(a - b) <= 1e-9


def _check_rows(report: Report, measured: Measured, phase: str) -> None:
    for row in report.all_rows:
        got = measured.get(row.module)
        name = row.module
        if got is None:
            if row.params_after == 0 and row.bytes_after == 0:
                continue  # a module the pass removed, reported as such
            raise Violation(f"the {phase} report has a row for module {name!r}, which is not in the model", module=name)
        kind, stats = got
        if row.kind != kind:
            raise Violation(f"module {name!r} kind says {row.kind!r} but the module is a {kind}", module=name)
        if row.params_after != stats.params:
            raise Violation(f"module {name!r} params_after says {row.params_after} but the module has {stats.params}", module=name)
        if row.bytes_after != stats.bytes:
            raise Violation(f"module {name!r} bytes_after says {row.bytes_after} but the module stores {stats.bytes}", module=name)
        if not _close(row.sparsity, stats.sparsity):
            raise Violation(f"module {name!r} sparsity says {row.sparsity} but the module measures {stats.sparsity}", module=name)
        if not _close(row.bits, stats.bits):
            raise Violation(f"module {name!r} bits says {row.bits} but the module measures {stats.bits}", module=name)


def _check_totals(report: Report, totals: tuple[int, int], when: str) -> None:
    nbytes, params = totals
    if report.bytes_after is not None and report.bytes_after != nbytes:
        raise Violation(f"the report's bytes_after says {report.bytes_after} but the model stores {nbytes} {when}")
    if report.params_after is not None and report.params_after != params:
        raise Violation(f"the report's params_after says {report.params_after} but the model has {params} {when}")


@register_check("report")
def check_report(run: Run) -> None:
    """Report rows and totals equal a fresh measurement (module_stats, model_bytes) of the model."""
    main = run.main
    _check_rows(main.apply_report, main.apply_measured, "apply")
    _check_totals(main.apply_report, main.apply_totals, "after apply")
    if main.finalize_report.children:
        _check_rows(main.finalize_report, main.final_measured, "finalize")
        _check_totals(main.finalize_report, main.final_totals, "after finalize")
    elif main.final_totals != main.apply_totals:
        (b0, p0), (b1, p1) = main.apply_totals, main.final_totals
        raise Violation(
            f"finalize changed the model ({b0} -> {b1} bytes, {p0} -> {p1} parameters) but returned no Report, "
            "so the final report is out of date"
        )
    if not main.apply_report.modified:
        diff = snapshot_diff(run.before, main.after_apply)
        if diff is not None:
            module, what = diff
            raise Violation(f"the report says modified=False but the pass changed module {module!r}: {what}", module=module)


# -- declared --------------------------------------------------------------------------------
@register_check("declared")
def check_declared_properties(run: Run) -> None:
    """Properties the pass declares hold: sparsity, an N:M pattern, bits, fewer parameters."""
    props = declared_properties(run.pass_)
    if not props:
        raise Skip("the pass declares no property (no declares(), no sparsity/pattern/bits field, not structural)")
    evidence = Evidence(before=run.original, after=run.main.model, rows=run.main.apply_report.all_rows, atol=run.atol)
    check_declared(run.pass_, evidence)


# -- finalize --------------------------------------------------------------------------------
@register_check("finalize")
def check_finalize(run: Run) -> None:
    """After finalize no parametrization and no module hook is left that was not there before."""
    before = hook_counts(run.original)
    for name, counts in run.main.final.hooks.items():
        for kind, n in counts.items():
            had = before.get(name, {}).get(kind, 0)
            if n > had:
                raise Violation(f"module {name!r} still has {n} {kind}(s) after finalize ({had} before the pass)", module=name)
    for name in sorted(parametrized_modules(run.main.model) - parametrized_modules(run.original)):
        held = list(run.main.model.get_submodule(name).parametrizations.keys())
        raise Violation(f"module {name!r} still has parametrizations on {held} after finalize", module=name)
    now = global_hook_counts()
    for kind, n in now.items():
        if n > run.global_hooks.get(kind, 0):
            raise Violation(f"{n - run.global_hooks.get(kind, 0)} global module hook(s) ({kind}) are left registered")


# -- spec ------------------------------------------------------------------------------------
def _python_only(p: Any) -> bool:
    def walk(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(walk(x) for x in v)
        return isinstance(v, type) or (callable(v) and not isinstance(v, (str, bytes)))

    return dataclasses.is_dataclass(p) and any(walk(getattr(p, f.name)) for f in dataclasses.fields(p))


@register_check("spec")
def check_spec(run: Run) -> None:
    """build_pass(p.to_spec()) == p, directly and through JSON (registered passes only)."""
    p = run.pass_
    if registered_name(type(p)) is None:
        raise Skip(f"pass class {type(p).__name__} is not registered, so it has no recipe to round-trip")
    try:
        spec = to_spec(p)
    except ConfigError as exc:
        if _python_only(p):  # a type or predicate target given in Python: fine, just no recipe
            raise Skip(f"its configuration holds a type or callable, so it cannot be written to a recipe ({exc})") from None
        raise Violation(f"to_spec() failed: {exc}") from exc
    for how, data in (("", spec), (" through JSON", json.loads(json.dumps(spec)))):
        try:
            rebuilt = build_pass(data)
        except LlmslimError as exc:
            raise Violation(f"build_pass({data!r}){how} raised {type(exc).__name__}: {exc}") from exc
        if rebuilt != p:
            raise Violation(f"build_pass(to_spec(p)){how} gives {rebuilt!r}, which is not equal to {p!r} (spec {data!r})")


# -- rollback --------------------------------------------------------------------------------
def _injected(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, InjectedFailure):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _expect_rollback(action: Callable[[], Any], where: str) -> None:
    try:
        action()
    except PassError as exc:
        if not _injected(exc):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise Violation(
                f"with a failure injected {where}, the pass raised {type(cause).__name__}: {cause} instead", module=exc.module
            ) from exc
        if not exc.rolled_back:
            raise Violation(f"with a failure injected {where}, the manager's rollback itself raised", module=exc.module) from exc
    else:
        raise Violation(
            f"a failure injected {where} was swallowed: the pass caught it and carried on; "
            "let exceptions propagate so the manager can roll back"
        )


def _same_as(expected: Any, model: torch.nn.Module, where: str, was: str) -> None:
    diff = snapshot_diff(expected, snapshot(model))
    if diff is not None:
        module, what = diff
        raise Violation(
            f"after a failure injected {where}, the rolled-back model differs from the model {was}: module {module!r} {what}",
            module=module,
        )


@register_check("rollback")
def check_rollback(run: Run) -> None:
    """A failure injected mid-pass, after apply and after finalize rolls the model back bit for bit."""
    entered = run.main.entered
    points: list[tuple[int | None, str | None, str]] = []
    if len(entered) >= 2:
        points.append((len(entered) - 1, None, f"on entering module {entered[-1]!r} (the last of {len(entered)})"))
    else:
        run.notes.append(
            f"rollback: the pass entered {len(entered)} module(s) through ctx.working_on, so no failure was injected mid-pass"
        )
    points.append((None, "apply", "after apply() returned"))
    for fail_at, phase, where in points:
        model, p, ctx = run.fresh_model(), run.fresh_pass(), run.context(fail_at=fail_at)
        manager = PassManager([p if phase is None else FailAfter(p, phase)], name="check_pass")
        torch.manual_seed(run.seed)
        _expect_rollback(lambda: manager.apply(model, ctx), where)
        _same_as(run.before, model, where, "before the pass")
    if callable(getattr(run.pass_, "finalize", None)):
        model, p, ctx = run.fresh_model(), run.fresh_pass(), run.context()
        torch.manual_seed(run.seed)
        PassManager([p], name="check_pass").apply(model, ctx)
        after_apply = snapshot(model)
        manager = PassManager([FailAfter(p, "finalize")], name="check_pass")
        _expect_rollback(lambda: manager.finalize(model, ctx), "after finalize() returned")
        _same_as(after_apply, model, "after finalize() returned", "after apply")


# -- deterministic ---------------------------------------------------------------------------
@register_check("deterministic")
def check_deterministic(run: Run) -> None:
    """Two runs with the same seed give bit-identical models and outputs (or within atol/rtol)."""
    first = run.main
    first_output = run.final_output()
    try:
        second = run.execute()
    except Violation as exc:
        raise Violation(f"a second run with the same seed failed where the first did not: {exc.detail}", module=exc.module) from exc
    diff = snapshot_diff(first.final, second.final, atol=run.atol, rtol=run.rtol)
    if diff is not None:
        module, what = diff
        raise Violation(f"two runs with seed {run.seed} give different models: module {module!r} {what}", module=module)
    if second.output_error is not None:
        raise Violation(f"after a second run with seed {run.seed} the model fails: {second.output_error}")
    shape = structure_diff(first_output, second.output)
    if shape is not None:
        raise Violation(f"two runs with seed {run.seed} give differently shaped outputs: {shape}")
    b = dict(flatten_output(second.output))
    for path, x in flatten_output(first_output):
        if isinstance(x, torch.Tensor):
            what = tensor_diff(x, b[path], atol=run.atol, rtol=run.rtol)
            if what is not None:
                raise Violation(f"two runs with seed {run.seed} give different outputs: {path} {what}")


# -- save_load -------------------------------------------------------------------------------
@register_check("save_load")
def check_save_load(run: Run) -> None:
    """Save and load the compressed model; it must compute the same outputs (placeholder)."""
    raise Skip("checkpoint format arrives with issue 8")
