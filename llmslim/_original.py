"""A frozen copy of a model as it was before compression: the default teacher for distillation.

The manager keeps one only when a pass ``requires`` ``"original"`` and the Context has no
teacher. It lives on the CPU, parameters optionally in a lower precision (bfloat16 halves a
float32 model), so keeping it costs host memory, never accelerator memory; it is dropped when the
manager's ``apply`` returns.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["frozen_copy", "original_dtype"]


def frozen_copy(model: nn.Module, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A deep copy of ``model`` in eval mode without gradients, its parameters on ``device`` in ``dtype``.

    Each tensor is copied straight into its new place and precision (no transient full-precision
    copy). Floating parameters take ``dtype``, and so do the floating buffers of modules that have
    floating parameters (BatchNorm statistics); the buffers of modules without (rotary
    frequencies) keep theirs. Tied parameters stay tied.

    Args:
        model: The model to copy (unchanged).
        dtype: Precision of the floating parameters; ``None`` keeps each one's own.
        device: Where the copy lives.

    Returns:
        The copy, in eval mode, with ``requires_grad=False`` everywhere.

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> ref = frozen_copy(lin, dtype=torch.bfloat16)
        >>> ref.weight.dtype, ref.weight.requires_grad, ref.weight.data_ptr() != lin.weight.data_ptr()
        (torch.bfloat16, False, True)
    """
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for module in model.modules():
            params = [t for t in module.parameters(recurse=False)]
            # buffers follow their module's weights (BatchNorm statistics); a module without
            # weights keeps its buffers' precision (rotary frequencies stay float32)
            together = any(t.is_floating_point() for t in params)
            for t in itertools.chain(params, module.buffers(recurse=False)):
                if id(t) in memo:
                    continue
                cast = dtype if (dtype is not None and t.is_floating_point() and together) else None
                value = t.detach().to(device=device, dtype=cast, copy=True)
                memo[id(t)] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        out = copy.deepcopy(model, memo)
    return out.eval().requires_grad_(False)


def original_dtype(passes: Iterable[Any]) -> torch.dtype | None:
    """The precision to keep the original in: the one every asking pass agrees on, else ``None``.

    A pass states it with an ``original_dtype`` attribute (a ``torch.dtype`` or ``None`` for
    the model's own).

    Example:
        >>> class Ask:
        ...     original_dtype = torch.bfloat16
        >>> original_dtype([Ask(), Ask()]), original_dtype([Ask(), object()])
        (torch.bfloat16, None)
    """
    wanted = {getattr(p, "original_dtype", None) for p in passes}
    return wanted.pop() if len(wanted) == 1 else None
