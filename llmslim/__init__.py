"""llmslim: compression passes (quantization, pruning, distillation) for any PyTorch model.

Example:
    >>> import llmslim as ls
    >>> sorted(ls.__all__)[:3]
    ['Context', 'ModuleRow', 'Pass']
"""

from __future__ import annotations

import importlib
from typing import Any

from . import errors
from ._context import Context, default_forward
from ._manager import PassManager, compress_
from ._measure import model_bytes
from ._pass import Pass, PassBase, Stepped, pass_name
from ._registry import available_passes, build_pass, get_pass, register, to_spec
from ._report import ModuleRow, Report
from ._targets import replace_module_, select
from .io import load, save

__version__ = "0.1.0"

__all__ = [
    "Context",
    "ModuleRow",
    "Pass",
    "PassBase",
    "PassManager",
    "Report",
    "Stepped",
    "__version__",
    "available_passes",
    "build_pass",
    "compress_",
    "default_forward",
    "distill",
    "errors",
    "get_pass",
    "load",
    "model_bytes",
    "pass_name",
    "prune",
    "quant",
    "register",
    "replace_module_",
    "save",
    "select",
    "testing",
    "to_spec",
]

# Subpackages that pull in optional or heavy dependencies load on first attribute access.
_LAZY = {"testing", "prune", "quant", "distill", "hf"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'llmslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
