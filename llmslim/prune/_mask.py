"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations, and baking them in.

The weight a forward sees is ``where(mask, weight, 0)``; the mask is a boolean buffer of the
parametrization module, so it travels with ``state_dict`` and ``.to()``. Gradients reach only
kept weights, and :func:`zero_pruned_` also zeroes the stored original where the mask is
``False``, so weight decay and momentum cannot leave a non-zero behind in the baked weight.

Every edit here is either in place on a tensor (the caller journals the module first) or a
swap of dict entries and classes, which the rollback journal undoes for free; nothing calls
``remove_parametrizations``, whose ``set_`` and class-attribute deletions the journal cannot see.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError

__all__ = ["Mask", "is_transposed", "rows_view", "from_rows", "get_mask", "set_mask_", "zero_pruned_", "bake_", "masked_modules"]


class Mask(nn.Module):
    """Parametrization ``weight -> where(mask, weight, 0)``.

    Args:
        keep: Boolean tensor shaped like the weight; ``True`` keeps the weight.
        sparsity: The target sparsity this mask was computed for (read back by schedules and
            reports).

    Example:
        >>> import torch
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(2, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", Mask(torch.tensor([[True, False], [False, True]])))
        >>> (layer.weight == 0).sum().item()
        2
    """

    def __init__(self, keep: torch.Tensor, sparsity: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mask", keep.to(torch.bool))
        self.sparsity = float(sparsity)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where, not multiply: an Inf or NaN in a pruned original still gives an exact zero
        return torch.where(self.mask, weight, 0.0)

    def extra_repr(self) -> str:
        kept = int(self.mask.sum())
        return f"kept={kept}/{self.mask.numel()}, sparsity={self.sparsity:g}"


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as ``[in, out]`` (Hugging Face ``Conv1D``, GPT-2).

    Example:
        >>> is_transposed(torch.nn.Linear(2, 3))
        False
    """
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__)


def rows_view(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``module``'s weight) as rows ``[out, in]``: one row per output unit,
    the input dimension along it (convolution kernels flattened into it, ``Conv1D`` transposed).

    Example:
        >>> rows_view(torch.nn.Conv2d(3, 4, 2), torch.zeros(4, 3, 2, 2)).shape
        torch.Size([4, 12])
    """
    if is_transposed(module):
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def from_rows(module: nn.Module, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`rows_view`: rows back to the weight's own layout (contiguous)."""
    if is_transposed(module):
        return rows.t().contiguous()
    return rows.reshape(shape).contiguous()


def get_mask(module: nn.Module) -> Mask | None:
    """The :class:`Mask` on ``module.weight``, or ``None``."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, Mask):
            return p
    return None


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The tensor ``module``'s weight lives in: the parametrization's original when masked.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> stored_weight(layer) is layer.weight
        True
    """
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def _original(module: nn.Module) -> torch.Tensor:
    return module.parametrizations["weight"].original


def _only_mask(module: nn.Module, name: str) -> Mask:
    # One Mask, first in the chain: parametrizations after it (QAT's fake quantization) see the
    # masked weight, and baking removes the mask alone.
    chain = list(module.parametrizations["weight"])
    if not chain or not isinstance(chain[0], Mask) or any(isinstance(p, Mask) for p in chain[1:]):
        kinds = [type(p).__name__ for p in chain]
        raise ConfigError(f"module {name!r}: weight parametrizations must be a pruning Mask alone or first (got {kinds})")
    return chain[0]


def set_mask_(module: nn.Module, keep: torch.Tensor, sparsity: float, name: str = "") -> Mask:
    """Mask ``module.weight`` with ``keep`` (intersected with any mask already there); zero pruned originals.

    The original weight is zeroed in place where pruned: journal the module first when this
    runs inside a pass that must roll back.

    Raises:
        ConfigError: ``keep`` is not shaped like the weight, or the weight carries other
            parametrizations.

    Example:
        >>> layer = torch.nn.Linear(3, 1, bias=False)
        >>> _ = set_mask_(layer, torch.tensor([[True, False, True]]), 1 / 3)
        >>> (layer.weight == 0).sum().item(), (get_mask(layer).mask == 0).sum().item()
        (1, 1)
    """
    weight = module.weight
    if keep.shape != weight.shape:
        raise ConfigError(f"module {name!r}: mask must be shaped like the weight {tuple(weight.shape)} (got {tuple(keep.shape)})")
    keep = keep.to(device=weight.device, dtype=torch.bool)
    mask = get_mask(module)
    if mask is None:
        if parametrize.is_parametrized(module, "weight"):
            _only_mask(module, name)  # raises: another parametrization owns this weight
        mask = Mask(keep, sparsity)
        parametrize.register_parametrization(module, "weight", mask)
    else:
        _only_mask(module, name)
        mask.mask = keep & mask.mask  # a new buffer, not an in-place edit: monotone and journal-free
        mask.sparsity = max(float(sparsity), mask.sparsity)
    zero_pruned_(module)
    return mask


@torch.no_grad()
def zero_pruned_(module: nn.Module) -> None:
    """Zero the stored original weight where ``module``'s mask prunes it (in place)."""
    mask = get_mask(module)
    if mask is not None:
        _original(module).masked_fill_(~mask.mask, 0)


def bake_(module: nn.Module, name: str = "") -> torch.Tensor:
    """Bake the mask into the weight and remove the parametrization; return the weight.

    The weight stays the same ``Parameter`` object (an optimizer built before pruning keeps
    training it), zeroed in place where pruned; parametrizations after the mask (QAT's fake
    quantization) stay on it, over the zeroed original; journal the module first inside a pass. The
    parametrization is removed by swapping dict entries and the class back, which the rollback
    journal undoes by itself.

    Raises:
        ConfigError: No mask, or the weight carries other parametrizations before it.

    Example:
        >>> layer = torch.nn.Linear(2, 1, bias=False)
        >>> _ = set_mask_(layer, torch.tensor([[False, True]]), 0.5)
        >>> w = bake_(layer)
        >>> type(layer).__name__, w is layer.weight, layer.weight[0, 0].item()
        ('Linear', True, 0.0)
    """
    if get_mask(module) is None:
        raise ConfigError(f"module {name!r} has no pruning mask to bake")
    mask = _only_mask(module, name)
    original = _original(module)
    with torch.no_grad():
        original.masked_fill_(~mask.mask, 0)
    holder = module._modules["parametrizations"]
    if len(holder._modules["weight"]) > 1:  # e.g. fake quantization after the mask: keep the rest
        del holder._modules["weight"][0]
        return original
    del holder._modules["weight"]
    cls = type(module)
    if not holder._modules:  # nothing else parametrized: back to the plain class
        del module._modules["parametrizations"]
        module.__class__ = cls.__bases__[0]
    else:  # other tensors stay parametrized: a copy of the class without the weight property
        attrs = {k: v for k, v in vars(cls).items() if k not in ("weight", "__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, attrs)
    store = module._parameters if isinstance(original, nn.Parameter) else module._buffers
    store["weight"] = original
    return original


def masked_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``(name, module)`` of ``model`` whose weight carries a pruning :class:`Mask`."""
    return [(n, m) for n, m in model.named_modules() if ".parametrizations." not in f".{n}." and get_mask(m) is not None]
