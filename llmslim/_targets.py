"""Module targeting: which modules of a model a pass works on.

A target is one of:

* a glob on the qualified module name (``"model.layers.*.mlp.*"``);
* ``"re:<pattern>"``, a regular expression that must match the whole qualified name;
* a bare CamelCase word, a class name matched against the module's class and its bases
  (``"Linear"`` also matches subclasses of ``nn.Linear``);
* in Python only: a module type, or a ``(name, module) -> bool`` predicate.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from torch import nn

from .errors import TargetError

__all__ = ["Target", "matches", "select", "replace_module_"]

log = logging.getLogger("llmslim")

Target = Union[str, type, Callable[[str, nn.Module], bool]]

_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")
_GLOB_CHARS = set("*?[")


def _compile(target: Target) -> Callable[[str, nn.Module], bool]:
    if isinstance(target, str):
        if target.startswith("re:"):
            try:
                rx = re.compile(target[3:])
            except re.error as exc:
                raise TargetError(f"target {target!r} must be a valid regular expression ({exc})") from None
            return lambda name, module: rx.fullmatch(name) is not None
        if _CLASS_NAME.fullmatch(target) and not _GLOB_CHARS & set(target):
            return lambda name, module: any(c.__name__ == target for c in type(module).__mro__)
        return lambda name, module: fnmatch.fnmatchcase(name, target)
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TargetError(f"target type must be a subclass of nn.Module (got {target!r})")
        return lambda name, module: isinstance(module, target)
    if callable(target):
        return lambda name, module: bool(target(name, module))
    raise TargetError(f"target must be a string, an nn.Module type or a callable (got {target!r})")


def matches(targets: Iterable[Target], name: str, module: nn.Module) -> bool:
    """Whether ``(name, module)`` is selected by any of ``targets``.

    Example:
        >>> from torch import nn
        >>> matches(["Linear"], "fc", nn.Linear(2, 2)), matches(["re:fc\\\\d"], "fc", nn.Linear(2, 2))
        (True, False)
    """
    return any(_compile(t)(name, module) for t in targets)


def select(
    model: nn.Module,
    targets: Sequence[Target],
    ignore: Sequence[Target] = (),
    *,
    accepts: Sequence[str] = (),
    owner: str = "pass",
    warn_unmatched: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Return ``[(qualified_name, module)]`` in model order that ``targets`` select.

    Args:
        model: The model to search; the root module has the name ``""``.
        targets: What to select (see the module docstring).
        ignore: What to drop from the selection, same syntax.
        accepts: Class names the caller can handle; selected modules of other kinds are skipped.
        owner: Who asks, for error messages.
        warn_unmatched: Log a warning for a target that matches nothing while others match
            (off for a pass's default targets, which cover several architectures).

    Returns:
        The selected modules, each once, in ``model.named_modules()`` order.

    Raises:
        TargetError: A target is malformed, or the selection is empty.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> [n for n, _ in select(m, ["Linear"], ignore=["2"])]
        ['0']
    """
    if isinstance(targets, (str, type)) or callable(targets):
        targets = [targets]  # type: ignore[list-item]
    if isinstance(ignore, (str, type)) or callable(ignore):
        ignore = [ignore]  # type: ignore[list-item]
    want = [(t, _compile(t)) for t in targets]
    drop = [_compile(t) for t in ignore]
    hits = {id(t): 0 for t, _ in want}
    out: list[tuple[str, nn.Module]] = []
    kinds_skipped: set[str] = set()
    for name, module in model.named_modules():
        if ".parametrizations." in f".{name}.":
            continue  # parametrization containers belong to their owner module
        chosen = False
        for t, fn in want:
            if fn(name, module):
                hits[id(t)] += 1
                chosen = True
        if not chosen or any(fn(name, module) for fn in drop):
            continue
        if accepts and not any(c.__name__ in accepts for c in type(module).__mro__):
            kinds_skipped.add(type(module).__name__)
            continue
        out.append((name, module))
    for t, _ in want:
        if hits[id(t)] == 0 and out and warn_unmatched:
            log.warning("%s: target %r matched no module", owner, t)
    if not out:
        names = [n for n, _ in model.named_modules() if n and ".parametrizations" not in n]
        shown = names if len(names) <= 6 else names[:3] + ["..."] + names[-3:]
        sample = ", ".join(shown) or "(no submodules)"
        why = (
            f"; it matched only modules of kinds {sorted(kinds_skipped)}, and {owner} accepts {list(accepts)}"
            if kinds_skipped
            else ""
        )
        raise TargetError(
            f"{owner}: targets {list(targets)!r} (ignore {list(ignore)!r}) matched no module of "
            f"{type(model).__name__}{why}; its modules include: {sample}"
        )
    return out


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at qualified ``name`` for ``new`` in place; return the old one.

    Raises:
        TargetError: ``name`` is the root (``""``) or no such submodule exists.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> type(replace_module_(m, "0", nn.Identity())).__name__
        'Linear'
    """
    if not name:
        raise TargetError("cannot replace the root module in place; replace it in your own code")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
    except AttributeError:
        raise TargetError(f"no submodule named {name!r} in {type(model).__name__}") from None
    setattr(parent, child, new)
    return old
