"""Rollback journal: restore a model to its state before a pass, cheaply.

Two layers, so that only what a pass replaces is kept:

* a *structural snapshot* taken before the pass: for every module, its class and a shallow copy
  of its attribute dicts (parameters, buffers, submodules, hooks, plain attributes). That is only
  references, yet it undoes module swaps, replaced parameters, added parametrizations and hooks,
  and changed attributes such as ``in_features``;
* *copy-on-write* tensor saves for passes that edit tensor values in place: the pass (or
  ``PassBase.modules``) calls :meth:`Journal.save_` on a module just before editing it, so only
  the modules actually edited are copied, one at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Journal"]

_MISSING = object()


class Journal:
    """Records a model's state so :meth:`rollback` can restore it bit for bit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(2, 2)
        >>> before = m.weight.detach().clone()
        >>> j = Journal(m)
        >>> j.save_(m)
        >>> with torch.no_grad():
        ...     _ = m.weight.mul_(0)
        >>> j.rollback()
        >>> torch.equal(m.weight, before)
        True
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, type, dict[str, Any]]] = []
        for module in model.modules():
            attrs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(module).items()}
            self._modules.append((module, type(module), attrs))
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        # torch.nn.utils.parametrize gives a parametrized module a class of its own and edits
        # that class in place (remove_parametrizations deletes its properties): keep its dict.
        self._classes = {
            cls: dict(vars(cls)) for _, cls, _ in self._modules if getattr(cls, "__module__", "") == "torch.nn.utils.parametrize"
        }

    def save_(self, module: nn.Module) -> None:
        """Copy the values of ``module``'s tensors (recursively) before an in-place edit.

        Tensors already saved are not copied again.
        """
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in self._tensors:
                self._tensors[id(t)] = (t, t.detach().clone(), t.requires_grad)

    @property
    def saved_bytes(self) -> int:
        """Bytes of tensor copies held for in-place edits."""
        return sum(c.numel() * c.element_size() for _, c, _ in self._tensors.values())

    def rollback(self) -> None:
        """Restore every module recorded at construction, and every saved tensor's values."""
        with torch.no_grad():
            for t, copy, requires_grad in self._tensors.values():
                t.data = copy
                t.requires_grad_(requires_grad)
        for cls, attrs in self._classes.items():
            for key in [k for k in vars(cls) if k not in attrs]:
                delattr(cls, key)
            for key, value in attrs.items():
                if key not in ("__dict__", "__weakref__") and vars(cls).get(key, _MISSING) is not value:
                    setattr(cls, key, value)
        for module, cls, attrs in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            current = vars(module)
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if isinstance(value, dict):
                    target = current.get(key)
                    if not isinstance(target, dict):
                        current[key] = target = type(value)()
                    target.clear()
                    target.update(value)
                else:
                    current[key] = value
        self._tensors.clear()
