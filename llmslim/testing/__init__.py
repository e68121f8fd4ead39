"""A kit to property-test compression passes: the pass contract and hypothesis strategies.

* :func:`check_pass` runs a pass on copies of a model and checks the contract every pass keeps
  (it runs, stays finite, reports the truth, keeps what it declares, cleans up in finalize,
  round-trips its spec, rolls back, is deterministic); a broken check raises
  :class:`ContractError` naming the check, the module and by how much.
* :mod:`llmslim.testing.strategies` (needs ``hypothesis``): small models with batches (MLPs,
  convnets with batch norm, attention blocks, tiny Hugging Face models), weights with
  pathologies, and valid and invalid configurations of a pass class.
* :func:`make_model`: the same models from a fixed seed, without hypothesis.
* :func:`register_profiles`: hypothesis profiles ``"ci"`` and ``"thorough"``.

``import llmslim.testing`` needs only torch; ``strategies`` imports hypothesis when first used.

Example:
    >>> import torch
    >>> import llmslim as ls
    >>> from llmslim.testing import ContractError, check_pass, make_model
    >>> class Shrink:
    ...     '''Replaces the last layer with a narrower one: breaks the output shape.'''
    ...     def apply(self, model, ctx):
    ...         model[-1] = torch.nn.Linear(model[-1].in_features, 1)
    ...         return ls.Report("drop")
    >>> model, batch = make_model("mlp", seed=0)
    >>> try:
    ...     check_pass(Shrink(), model, batch)
    ... except ContractError as exc:
    ...     print(exc.check)
    runs
"""

from __future__ import annotations

import importlib
from typing import Any

from . import _checks  # noqa: F401  (registers the built-in checks)
from ._contract import ContractError, ContractResult, available_checks, check_pass
from ._models import MODEL_KINDS, PATHOLOGIES, make_model, make_weight
from ._profiles import register_profiles

__all__ = [
    "MODEL_KINDS",
    "PATHOLOGIES",
    "ContractError",
    "ContractResult",
    "available_checks",
    "check_pass",
    "make_model",
    "make_weight",
    "register_profiles",
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # imports hypothesis: only on first use
        module = importlib.import_module(".strategies", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'llmslim.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"strategies"})
