"""The pass contract runner: ``check_pass``, its result, its error and the check registry.

A check is a small function ``fn(run) -> None`` registered under a name; it raises
:class:`Violation` when the pass breaks the contract and :class:`Skip` when it does not apply.
:func:`check_pass` runs the registered checks in order and turns a violation into a
:class:`ContractError` naming the check, the module and the amount.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._context import default_forward
from .._pass import pass_name
from ..errors import ConfigError, LlmslimError

__all__ = ["ContractError", "ContractResult", "Violation", "Skip", "Check", "register_check", "available_checks", "check_pass"]


class ContractError(LlmslimError, AssertionError):
    """A pass broke its contract; an ``AssertionError``, so test runners show it as a failure.

    Attributes:
        check: Name of the check that failed (``"report"``, ``"rollback"``, ...).
        module: Qualified name of the module concerned, or ``None``.
        detail: What was wrong, and by how much.
        pass_name: The pass under test.
    """

    def __init__(self, check: str, detail: str, *, module: str | None = None, pass_name: str | None = None) -> None:
        self.check = check
        self.module = module
        self.detail = detail
        self.pass_name = pass_name
        suffix = f" [pass {pass_name!r}]" if pass_name else ""
        super().__init__(f"check {check!r}: {detail}{suffix}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, e.g. across worker processes
        return (_rebuild, (self.check, self.detail, self.module, self.pass_name))


def _rebuild(check: str, detail: str, module: str | None, pass_name: str | None) -> ContractError:
    return ContractError(check, detail, module=module, pass_name=pass_name)


class Violation(Exception):
    """Raised by a check function: the pass broke the contract (``check_pass`` adds the check name)."""

    def __init__(self, detail: str, *, module: str | None = None, check: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.module = module
        self.check = check  # set when the failure belongs to another check (the pass did not run)


class Skip(Exception):
    """Raised by a check function that does not apply to this pass; the message is the reason."""


class Refused(Skip):
    """The pass refused, with an llmslim error and the model untouched, a model whose own output is
    already non-finite: a clean refusal of broken input, after which no other check applies."""


@dataclasses.dataclass(frozen=True)
class Check:
    """A registered check: its name, its function and a one-line summary."""

    name: str
    fn: Callable[[Any], None]
    summary: str


_CHECKS: dict[str, Check] = {}


def register_check(name: str, *, before: str | None = None) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Decorator adding a check to the contract, run after the existing ones (or ``before`` one).

    The function receives the :class:`~llmslim.testing._run.Run` of the pass under test, raises
    :class:`Violation` on a broken contract and :class:`Skip` when it does not apply. Its
    docstring's first line is the check's summary.

    Raises:
        ConfigError: ``name`` is taken or ``before`` names no check.

    Example:
        >>> @register_check("doc-example")
        ... def _always_fine(run):
        ...     '''Never fails.'''
        >>> "doc-example" in available_checks()
        True
        >>> del _CHECKS["doc-example"]
    """

    def deco(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        if name in _CHECKS:
            raise ConfigError(f"check name {name!r} is already registered")
        if before is not None and before not in _CHECKS:
            raise ConfigError(f"register_check: before must name a check (got {before!r}); checks: {list(_CHECKS)}")
        summary = ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        item = Check(name, fn, summary)
        if before is None:
            _CHECKS[name] = item
        else:
            items = list(_CHECKS.items())
            at = [k for k, _ in items].index(before)
            items.insert(at, (name, item))
            _CHECKS.clear()
            _CHECKS.update(items)
        return fn

    return deco


def available_checks() -> tuple[str, ...]:
    """Names of the contract's checks, in the order ``check_pass`` runs them.

    Example:
        >>> import llmslim.testing as lt
        >>> lt.available_checks()[:3]
        ('runs', 'finite', 'report')
    """
    from . import _checks  # noqa: F401  (registers the built-in checks)

    return tuple(_CHECKS)


@dataclasses.dataclass(frozen=True)
class ContractResult:
    """What :func:`check_pass` did.

    Attributes:
        pass_name: The pass under test.
        passed: Checks that ran and held, in order.
        skipped: ``{check: reason}`` for checks switched off by the caller or not applicable.
        notes: Remarks from the checks (e.g. where failures were injected).
        seconds: Wall time of the whole contract.
    """

    pass_name: str
    passed: tuple[str, ...]
    skipped: Mapping[str, str]
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"pass {self.pass_name!r}: {len(self.passed)} check(s) held in {self.seconds:.2f}s"]
        lines += [f"  ok    {name}" for name in self.passed]
        lines += [f"  skip  {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  note  {n}" for n in self.notes]
        return "\n".join(lines)


def _check_skip(skip: Any, known: Sequence[str]) -> dict[str, str]:
    if skip is None:
        return {}
    if not isinstance(skip, Mapping):
        raise ConfigError(f"check_pass: skip must be a mapping {{check: reason}} (got {skip!r})")
    out: dict[str, str] = {}
    for name, reason in skip.items():
        if name not in known:
            raise ConfigError(f"check_pass: skip names an unknown check {name!r}; checks are: {', '.join(known)}")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigError(f"check_pass: skip[{name!r}] must be a non-empty reason (got {reason!r})")
        out[name] = reason
    return out


def _check_tolerance(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"check_pass: {name} must be a finite number >= 0 (got {value!r})")
    return float(value)


def check_pass(
    pass_: Any,
    model: nn.Module,
    batch: Any,
    *,
    calibration: Sequence[Any] | None = None,
    teacher: nn.Module | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    skip: Mapping[str, str] | None = None,
    seed: int = 0,
    atol: float = 0.0,
    rtol: float = 0.0,
) -> ContractResult:
    """Check that ``pass_`` keeps the pass contract on ``model``; raise at the first broken check.

    Works on deep copies (in eval mode): neither ``model`` nor ``pass_`` is changed. The pass
    runs through :class:`~llmslim.PassManager` (apply, then finalize) as ``compress_`` runs it.
    The checks, in order (see :func:`available_checks`): ``runs``, ``finite``, ``report``,
    ``declared``, ``finalize``, ``spec``, ``rollback``, ``deterministic``, ``save_load``.

    Args:
        pass_: The pass under test (anything with ``apply(model, ctx)``).
        model: A model the pass applies to.
        batch: One input batch for ``forward``.
        calibration: Calibration batches; default ``[batch]`` when the pass ``requires``
            ``"calibration"``.
        teacher: Teacher model; default a deep copy of ``model`` when the pass requires one.
        forward: ``forward(model, batch)``; default :func:`~llmslim.default_forward`.
        skip: ``{check: reason}``: checks to switch off, each with the reason why.
        seed: Seed for ``torch.manual_seed`` and ``Context(seed=...)`` before each run.
        atol: Absolute tolerance of the ``deterministic`` comparison (default bitwise) and
            extra slack for declared sparsity.
        rtol: Relative tolerance of the ``deterministic`` comparison.

    Returns:
        A :class:`ContractResult` listing the checks that held and those skipped (with reasons).
        A pass that raises, or a model that no longer runs after it, fails check ``runs`` even
        when ``runs`` is skipped: no other check can be made without it. The one exception is a
        clean refusal: the pass raised an llmslim error on a model whose own output is already
        NaN or Inf and left it unchanged; every check is then skipped with that reason.

    Raises:
        ContractError: A check failed; ``.check`` names it.
        ConfigError: A bad argument, e.g. a skip without a reason or naming no check.

    Example:
        >>> import dataclasses, torch
        >>> import llmslim as ls
        >>> from llmslim.testing import check_pass, make_model
        >>> @dataclasses.dataclass
        ... class Scale(ls.PassBase):
        ...     factor: float = 0.5
        ...     edits_in_place = True
        ...     def apply(self, model, ctx):
        ...         rows = []
        ...         for name, m in self.modules(model, ctx):
        ...             before = self.measure(m)
        ...             with torch.no_grad():
        ...                 m.weight.mul_(self.factor)
        ...             rows.append(self.row(name, m, before))
        ...         return self.report(rows)
        >>> model, batch = make_model("mlp", seed=0)
        >>> result = check_pass(Scale(), model, batch)
        >>> result.passed
        ('runs', 'finite', 'report', 'finalize', 'rollback', 'deterministic')
        >>> sorted(result.skipped)  # each with its reason
        ['declared', 'save_load', 'spec']
        >>> result.skipped["spec"]
        'pass class Scale is not registered, so it has no recipe to round-trip'
    """
    from ._run import Run

    start = time.perf_counter()
    if not callable(getattr(pass_, "apply", None)):
        raise ConfigError(f"check_pass: pass_ must have apply(model, ctx) (got {type(pass_).__name__})")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"check_pass: model must be an nn.Module (got {type(model).__name__})")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"check_pass: seed must be an integer (got {seed!r})")
    if forward is not None and not callable(forward):
        raise ConfigError(f"check_pass: forward must be callable (got {forward!r})")
    names = available_checks()
    skipped = _check_skip(skip, names)
    label = pass_name(pass_)
    run = Run(
        pass_=pass_,
        model=model,
        batch=batch,
        calibration=calibration,
        teacher=teacher,
        forward=forward or default_forward,
        seed=seed,
        atol=_check_tolerance("atol", atol),
        rtol=_check_tolerance("rtol", rtol),
    )
    passed: list[str] = []
    with torch.random.fork_rng(devices=[]):
        for name in names:
            if name in skipped:
                continue
            try:
                _CHECKS[name].fn(run)
            except Refused as exc:
                skipped.update({n: str(exc) for n in names[names.index(name):] if n not in skipped})
                break
            except Skip as exc:
                skipped[name] = str(exc)
            except Violation as exc:
                raise ContractError(exc.check or name, exc.detail, module=exc.module, pass_name=label) from exc.__cause__
            else:
                passed.append(name)
    return ContractResult(label, tuple(passed), skipped, tuple(run.notes), time.perf_counter() - start)
