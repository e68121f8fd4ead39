"""Context: what passes get besides the model (data, teacher, device, caches, progress)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._rollback import Journal
from .errors import ConfigError

__all__ = ["Context", "default_forward"]

T = TypeVar("T")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch``: a mapping as keywords, a tuple or list as positionals, else as is.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> default_forward(nn.Linear(3, 1), torch.ones(2, 3)).shape
        torch.Size([2, 1])
    """
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


class Context:
    """Everything a pass may need besides the model.

    Args:
        calibration: Calibration batches (any sequence; each batch goes through ``forward``).
        forward: ``forward(model, batch)``; the default calls ``model(**batch)`` for a mapping,
            ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise.
        teacher: A reference model, for distillation.
        device: Where passes compute; ``None`` keeps each module where it is.
        progress: Show progress bars (also off when the ``LLMSLIM_PROGRESS`` variable is ``0``).
        seed: Seed for anything random a pass does.
        rollback: Journal each pass so a failure restores the model (default). ``False`` saves
            the memory of in-place copies on models too large to hold twice; a failing pass then
            leaves the model as the error found it (``PassError.rolled_back`` is ``False``).
        weights: Calibrate from weights on disk: a
            :class:`~llmslim.calibration.ShardedWeights` or a path to safetensors shards. The
            model is then a skeleton built on ``meta``; each block is loaded just before it runs
            and released after, and the passes must form one calibration sweep.
        after_block: ``after_block(name, block)``, called by the calibration engine with each
            finished block (e.g. a :class:`llmslim.io.StreamingSave` writing it to disk).

    Attributes:
        step: Training steps completed (advanced by ``PassManager.step``).
        journal: The rollback journal of the pass now running (``None`` outside a manager).
        module: Qualified name of the module the running pass works on, for error messages.
        model: The model the running pass works on (set by the manager and the calibration
            engine), so code that sees only a submodule can swap it (``replace_module_``).
        original: While a manager applies passes of which one requires ``"original"`` and no
            ``teacher`` was given: a frozen copy of the model as it was before the first pass
            (on the CPU; see ``llmslim._original.frozen_copy``); ``None`` otherwise.
        applied: The passes the running manager applied before the current one, so a pass that
            trains (``distill``) can call their ``step`` after each optimizer step.

    Example:
        >>> import torch
        >>> ctx = Context(calibration=[torch.ones(1, 4)])
        >>> ctx.analysis("n", lambda: len(ctx.calibration))
        1
    """

    def __init__(
        self,
        calibration: Sequence[Any] | Iterable[Any] | None = None,
        *,
        forward: Callable[[nn.Module, Any], Any] = default_forward,
        teacher: nn.Module | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        seed: int = 0,
        rollback: bool = True,
        weights: Any = None,
        after_block: Callable[[str, nn.Module], None] | None = None,
    ) -> None:
        if calibration is not None and not isinstance(calibration, Sequence):
            if isinstance(calibration, (torch.Tensor, Mapping)) or not isinstance(calibration, Iterable):
                raise ConfigError(
                    f"Context: calibration must be a sequence of batches (got {type(calibration).__name__})"
                )
            calibration = list(calibration)
        if not callable(forward):
            raise ConfigError(f"Context: forward must be callable (got {forward!r})")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ConfigError(f"Context: teacher must be an nn.Module (got {type(teacher).__name__})")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"Context: seed must be an integer (got {seed!r})")
        try:
            self.device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"Context: device must be a torch device (got {device!r})") from None
        if weights is not None:
            from .calibration._weights import ShardedWeights  # the engine imports this module

            if isinstance(weights, (str, os.PathLike)):
                weights = ShardedWeights(weights)
            elif not isinstance(weights, ShardedWeights):
                raise ConfigError(f"Context: weights must be a ShardedWeights or a path to safetensors shards (got {type(weights).__name__})")
        if after_block is not None and not callable(after_block):
            raise ConfigError(f"Context: after_block must be callable (got {after_block!r})")
        self.weights = weights
        self.after_block = after_block
        self.calibration = calibration
        self.forward = forward
        self.teacher = teacher
        self.progress = bool(progress) and os.environ.get("LLMSLIM_PROGRESS", "1") != "0"
        self.seed = seed
        self.rollback = bool(rollback)
        self.step = 0
        self.journal: Journal | None = None
        self.module: str | None = None
        self.model: nn.Module | None = None
        self.original: nn.Module | None = None
        self.applied: tuple[Any, ...] = ()
        self._cache: dict[Hashable, Any] = {}

    def run(self, model: nn.Module, batch: Any) -> Any:
        """Move ``batch`` to :attr:`device` (when set) and call :attr:`forward`."""
        if self.device is not None:
            batch = _move(batch, self.device)
        return self.forward(model, batch)

    # -- analyses cache ----------------------------------------------------------------
    def analysis(self, key: Hashable, compute: Callable[[], T]) -> T:
        """Return the cached analysis ``key``, computing it on first use.

        The manager drops the cache whenever a pass reports it modified the model.
        """
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def invalidate(self, *keys: Hashable) -> None:
        """Drop the named cached analyses, or all of them when none is named."""
        if not keys:
            self._cache.clear()
        for key in keys:
            self._cache.pop(key, None)

    # -- helpers for passes --------------------------------------------------------------
    def progress_bar(self, iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
        """Wrap ``iterable`` in a tqdm bar unless progress is off.

        Returns the bar itself when it is shown (so a pass may call its ``set_postfix``), else an
        iterator over ``iterable``.
        """
        if not self.progress:
            return iter(iterable)
        from tqdm.auto import tqdm  # imported on first use: keeps `import llmslim` fast

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)

    @contextlib.contextmanager
    def working_on(self, name: str, module: nn.Module, *, in_place: bool = True) -> Iterator[None]:
        """Mark ``name`` as the module being edited; journal its tensors first if ``in_place``.

        With :attr:`weights` on disk nothing is copied: the values are on disk, and the
        journal's structural snapshot already restores the ``meta`` tensors the model had.
        """
        if in_place and self.journal is not None and self.weights is None:
            self.journal.save_(module)
        self.module = name
        yield

    def __repr__(self) -> str:
        n = "None" if self.calibration is None else f"{len(self.calibration)} batches"
        return (
            f"Context(calibration={n}, teacher={type(self.teacher).__name__ if self.teacher else None}, "
            f"device={self.device}, step={self.step})"
        )
