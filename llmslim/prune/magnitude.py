"""Magnitude pruning: the smallest ``|w|`` go first (registered as ``"magnitude"``)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .._context import Context
from ._base import PruneBase

__all__ = ["Magnitude"]


@dataclasses.dataclass
class Magnitude(PruneBase):
    """Prune the weights of smallest magnitude, once or gradually, unstructured or N:M.

    Every option is :class:`~llmslim.prune.PruneBase`'s; this class adds only the score,
    ``|w|``. A new pruning method is a subclass overriding :meth:`score` the same way.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim.prune import Magnitude
        >>> ls.get_pass("magnitude") is Magnitude
        True
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> report = ls.compress_(model, Magnitude(pattern="2:4"), progress=False)
        >>> [row.sparsity for row in report.children[0].rows]
        [0.5, 0.5]
        >>> Magnitude(sparsity=0.7, pattern="2:4")
        Traceback (most recent call last):
        ...
        llmslim.errors.ConfigError: magnitude: sparsity must be None or 0.5 (1 - N/M) with pattern '2:4' (got 0.7)
    """

    def score(self, name: str, module: nn.Module, ctx: Context) -> torch.Tensor:
        """``|w|`` of the weight the forward sees."""
        return module.weight.detach().abs()
