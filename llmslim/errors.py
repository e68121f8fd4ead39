"""The exception tree: one flat family, every class also a builtin exception.

Catch :class:`LlmslimError` for anything llmslim raises on purpose, or the builtin
(``ValueError``, ``LookupError``, ``RuntimeError``) where the caller already does.

Example:
    >>> import llmslim as ls
    >>> try:
    ...     ls.build_pass({"pass": "no-such-pass"})
    ... except ls.errors.RegistryError as exc:
    ...     print(type(exc).__name__)
    RegistryError
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "LlmslimError",
    "ConfigError",
    "TargetError",
    "TraceError",
    "RegistryError",
    "OrderError",
    "PassError",
    "CalibrationError",
    "CheckpointError",
    "FetchError",
    "MissingDependencyError",
]


class LlmslimError(Exception):
    """Base of every error llmslim raises on purpose."""


class ConfigError(LlmslimError, ValueError):
    """A configuration value is invalid: a pass field, a recipe, a Context argument."""


class TargetError(LlmslimError, LookupError):
    """A module selection (``targets``/``ignore``) matched nothing or is malformed."""


class TraceError(TargetError):
    """The generic structured-pruning tracer cannot prove that cutting a model's channels is safe.

    A :class:`TargetError` (the pass does not apply to this model); raised before anything changes.

    Attributes:
        model: Class name of the model.
        problems: ``(where, why)`` for every place found: a module's qualified name or a graph
            node, and the reason (an operation it cannot map channels through, a grouped
            convolution, a flatten it cannot map exactly ...).
    """

    def __init__(self, model: str, problems: Sequence[tuple[str, str]], hint: str = "") -> None:
        self.model = model
        self.problems = tuple((str(w), str(y)) for w, y in problems)
        shown = "; ".join(f"{w}: {y}" for w, y in self.problems[:6])
        more = f"; and {len(self.problems) - 6} more" if len(self.problems) > 6 else ""
        self.hint = hint
        super().__init__(f"cannot prune the channels of {model} safely: {shown}{more}{hint}")

    def __reduce__(self):  # picklable: rebuilt from its parts
        return (TraceError, (self.model, self.problems, self.hint))


class RegistryError(LlmslimError, LookupError):
    """A pass name is unknown, registered twice, or its plugin failed to import."""


class OrderError(LlmslimError, ValueError):
    """A chain of passes is invalid as a whole: a pass cannot run after another one."""


class CalibrationError(LlmslimError, RuntimeError):
    """Calibration data is missing or does not fit the model."""


class CheckpointError(LlmslimError, OSError):
    """A checkpoint is missing, corrupted, from an unknown format version or unsafe."""


class FetchError(LlmslimError, OSError):
    """A model or data file could not be fetched, or failed its checksum."""


class MissingDependencyError(LlmslimError, ImportError):
    """An optional dependency a feature needs is not installed; the message says which extra."""


class PassError(LlmslimError, RuntimeError):
    """A pass raised while it ran; the model was rolled back to its state before that pass.

    Attributes:
        pass_name: The pass that failed.
        module: Qualified name of the module it was working on, or ``None`` if unknown.
        completed: Names of the passes that had completed before it, in order.
        rolled_back: Whether the model was restored to its state before the pass.

    The original exception is chained as ``__cause__``.
    """

    def __init__(
        self,
        pass_name: str,
        cause: BaseException,
        *,
        module: str | None = None,
        completed: Sequence[str] = (),
        rolled_back: bool = True,
        phase: str = "apply",
    ) -> None:
        self.pass_name = pass_name
        self.module = module
        self.completed = tuple(completed)
        self.rolled_back = rolled_back
        self.phase = phase
        where = f" on module {module!r}" if module is not None else ""
        after = ", ".join(repr(n) for n in self.completed) if self.completed else "nothing"
        state = "model rolled back" if rolled_back else "model NOT rolled back, it may be partly modified"
        super().__init__(
            f"pass {pass_name!r} failed in {phase}{where} "
            f"(completed before it: {after}; {state}): {type(cause).__name__}: {cause}"
        )

    def __reduce__(self):  # picklable across processes: the message and attributes travel
        return (_rebuild_pass_error, (self.args, dict(vars(self))))


def _rebuild_pass_error(args: tuple, attrs: dict) -> PassError:
    exc = PassError.__new__(PassError)
    Exception.__init__(exc, *args)
    vars(exc).update(attrs)
    return exc
