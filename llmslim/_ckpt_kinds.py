"""Module kinds a checkpoint may name: llmslim's compressed layers plus explicitly registered ones.

A manifest names a replaced module by a short *kind* (``"QuantLinear"``), never by an import path:
loading looks the kind up here and refuses anything else, so a tampered manifest cannot make
:func:`llmslim.load` import or build an arbitrary class.

The protocol a kind's class keeps (see :class:`ModuleKind`):

* ``checkpoint_config(self) -> dict``: plain JSON data (numbers, strings, booleans, ``None``,
  lists) enough to rebuild the module *empty*: shapes, bit widths, dtypes by name;
* ``from_checkpoint_config(cls, cfg, *, tied=None) -> module``: that empty module, its tensors
  of the right shapes on the ``meta`` device; ``load_state_dict(..., assign=True)`` fills them;
* optionally ``checkpoint_tied(self) -> nn.Module | None``: another module whose tensors this one
  reads instead of holding its own (a tied ``lm_head``); the loader passes it back as ``tied``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import CheckpointError, RegistryError

__all__ = ["ModuleKind", "register_module_kind", "module_kind", "kind_class", "known_kinds", "dtype_name", "dtype_from_name"]

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
               torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
}

# llmslim's own kinds: "module:attribute", imported on first use (quant and prune are heavy)
_BUILTIN: dict[str, str] = {
    "QuantLinear": "llmslim.quant._linear:QuantLinear",
    "QuantEmbedding": "llmslim.quant._embedding:QuantEmbedding",
    "SparseQuantLinear": "llmslim.quant._sparse:SparseQuantLinear",
    "FP8Linear": "llmslim.quant._fp8:FP8Linear",
    "Int8DynamicLinear": "llmslim.quant._w8a8:Int8DynamicLinear",
    "SparseLinear": "llmslim.prune._storage:SparseLinear",
}
_registered: dict[str, type] = {}
_lock = threading.Lock()


@runtime_checkable
class ModuleKind(Protocol):
    """What a module class needs to be saved and rebuilt by :func:`llmslim.save`/:func:`llmslim.load`."""

    def checkpoint_config(self) -> dict[str, Any]: ...

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> nn.Module: ...


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (how a manifest spells dtypes).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any) -> torch.dtype:
    """The dtype a manifest names; only plain numeric dtypes are accepted.

    Raises:
        CheckpointError: Not one of them.

    Example:
        >>> dtype_from_name("float16")
        torch.float16
    """
    if not isinstance(name, str) or name not in _DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(sorted(_DTYPES))} (got {name!r})")
    return _DTYPES[name]


def _builtin(name: str) -> type:
    import importlib

    module, _, attr = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def register_module_kind(name: str, cls: type) -> None:
    """Allow ``cls`` in checkpoints under the kind ``name`` (for plugins' own compressed modules).

    Raises:
        RegistryError: ``name`` is malformed or already names another class, or ``cls`` lacks the
            protocol (``checkpoint_config`` and the ``from_checkpoint_config`` classmethod).

    Example:
        >>> register_module_kind("QuantLinear", kind_class("QuantLinear"))  # the same pair again: no-op
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistryError(f"module kind name must be an identifier (got {name!r})")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RegistryError(f"module kind {name!r}: class must be an nn.Module subclass (got {cls!r})")
    if not (callable(getattr(cls, "checkpoint_config", None)) and callable(getattr(cls, "from_checkpoint_config", None))):
        raise RegistryError(f"module kind {name!r}: {cls.__name__} must define checkpoint_config() and the classmethod from_checkpoint_config(cfg)")
    with _lock:
        current = _builtin(name) if name in _BUILTIN else _registered.get(name)
        if current is not None and current is not cls:
            raise RegistryError(f"module kind {name!r} is already registered for {current.__module__}.{current.__qualname__}")
        if current is None:
            _registered[name] = cls


def known_kinds() -> list[str]:
    """Every kind name a checkpoint may use.

    Example:
        >>> "QuantLinear" in known_kinds()
        True
    """
    return sorted({*_BUILTIN, *_registered})


def kind_class(name: Any) -> type:
    """The class registered under kind ``name``.

    Raises:
        CheckpointError: No such kind (the manifest names a class outside the allow-list).
    """
    if isinstance(name, str) and name in _BUILTIN:
        return _builtin(name)
    if isinstance(name, str) and name in _registered:
        return _registered[name]
    raise CheckpointError(
        f"module kind {name!r} is not allowed: a checkpoint may only name llmslim's own module kinds "
        f"and ones registered with llmslim.io.register_module_kind ({', '.join(known_kinds())})"
    )


def module_kind(module: nn.Module) -> str | None:
    """The kind name of ``module``'s exact class, or ``None`` for a class that is not a kind.

    Example:
        >>> module_kind(nn.Linear(2, 2)) is None
        True
    """
    cls = type(module)
    if cls.__module__.startswith("llmslim."):
        for name in _BUILTIN:
            if cls.__name__ == name and _builtin(name) is cls:
                return name
    for name, registered in _registered.items():
        if registered is cls:
            return name
    return None
