"""Running a model for distillation: hidden states by module name (forward hooks), logits from any
output, batches moved to a model's device and precision, padding masks."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["capture", "logits_of", "first_tensor", "resolve", "width_of", "placement", "place", "position_mask", "Pair", "pairs"]

Pair = tuple[str, str]


def first_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor in a module's output (a tensor, a tuple, or a mapping such as ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return None


def logits_of(out: Any, owner: str) -> torch.Tensor:
    """A model output's logits: ``.logits`` when present, else its (first) tensor.

    Raises:
        ConfigError: No tensor in the output.
    """
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        logits = first_tensor(out)
    if logits is None:
        raise ConfigError(f"{owner}: the model must return a tensor or an output with .logits (got {type(out).__name__})")
    return logits


def resolve(model: nn.Module, names: Sequence[str], owner: str, role: str) -> list[nn.Module]:
    """The submodules named ``names``; a name that does not exist is a :class:`ConfigError` quoting real ones."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules:
            near = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5) or [n for n in modules if n][:3]
            raise ConfigError(f"{owner}: hidden layer {name!r} is not a module of the {role} (got {name!r}; e.g. {near})")
        out.append(modules[name])
    return out


def pairs(layers: Sequence[Any], owner: str) -> list[Pair]:
    """``(student_name, teacher_name)`` pairs from names, ``"student=teacher"`` strings or 2-tuples."""
    out: list[Pair] = []
    for item in layers:
        if isinstance(item, str):
            parts = item.split("=")
            if len(parts) == 1:
                parts = [item, item]
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            parts = list(item)
        else:
            parts = []
        if len(parts) != 2 or not all(isinstance(p, str) for p in parts) or (parts[0] == "" and parts[1] == ""):
            raise ConfigError(f"{owner}: hidden layers must be names, 'student=teacher' strings or (student, teacher) pairs (got {item!r})")
        out.append((parts[0], parts[1]))
    return out


def width_of(module: nn.Module) -> int | None:
    """The feature width of ``module``'s output, read from its weights: its own, or those of its
    last submodule that has one (a decoder layer's last norm, an MLP's down projection).
    ``None`` when nothing tells."""
    for m in reversed(list(module.modules())):
        for attr in ("out_features", "embedding_dim", "nf"):
            value = getattr(m, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        shape = getattr(m, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            return int(shape[-1])
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not list(m.children()):
            return int(weight.shape[0])  # RMSNorm-like
    return None


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], owner: str, role: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named submodule during the block (hooks removed on exit)."""
    out: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: Any, output: Any) -> None:
            value = first_tensor(output)
            if value is None:
                raise ConfigError(f"{owner}: hidden layer {name!r} of the {role} returned no tensor (got {type(output).__name__})")
            out[name] = value

        return fn

    try:
        for name, module in zip(names, resolve(model, names, owner, role)):
            handles.append(module.register_forward_hook(hook(name)))
        yield out
    finally:
        for h in handles:
            h.remove()


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    """Device and floating dtype of ``model``'s first floating parameter (CPU, ``None`` without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    p = next(iter(model.parameters()), None)
    return (p.device if p is not None else torch.device("cpu")), None


def place(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with its tensors on ``device``, floating ones in ``dtype`` (when given)."""
    if isinstance(batch, torch.Tensor):
        cast = dtype if dtype is not None and batch.is_floating_point() else None
        return batch.to(device=device, dtype=cast) if (batch.device != device or cast not in (None, batch.dtype)) else batch
    if isinstance(batch, Mapping):
        return {k: place(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(place(v, device, dtype) for v in batch)
    return batch


def position_mask(batch: Any) -> torch.Tensor | None:
    """The padding mask of a Hugging Face batch (``attention_mask``, 1 = a real token), else ``None``."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None
