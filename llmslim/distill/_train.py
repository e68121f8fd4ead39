"""The pieces of the recovery loop: batches from data, optimizers, learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["stack_batches", "batch_stream", "make_optimizer", "lr_factor", "with_labels", "mean_parts"]


def stack_batches(batches: Sequence[Any], owner: str) -> Any:
    """Concatenate batches of one structure along their first dimension (one bigger batch).

    Example:
        >>> stack_batches([{"input_ids": torch.zeros(1, 4)}, {"input_ids": torch.ones(1, 4)}], "x")["input_ids"].shape
        torch.Size([2, 4])
    """
    first = batches[0]
    if len(batches) == 1:
        return first
    try:
        if isinstance(first, torch.Tensor):
            return torch.cat(list(batches))
        if isinstance(first, Mapping):
            return {k: stack_batches([b[k] for b in batches], owner) for k in first}
        if isinstance(first, (tuple, list)):
            return type(first)(stack_batches([b[i] for b in batches], owner) for i in range(len(first)))
    except (RuntimeError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{owner}: batch_size > 1 joins batches, which must have one structure and shape (got {exc})") from None
    return first  # anything else (a flag, a string) is shared


def batch_stream(data: Iterable[Any], *, batch_size: int, seed: int, owner: str) -> Iterator[Any]:
    """Endless stream of batches: ``batch_size`` data items joined, reshuffled each epoch (sequences only)."""
    items = list(data) if isinstance(data, Sequence) else None
    if items is not None and not items:
        raise ConfigError(f"{owner}: training data must hold at least one batch (got an empty sequence)")
    g = torch.Generator().manual_seed(seed)
    pending: list[Any] = []
    while True:
        if items is not None:
            epoch: Iterable[Any] = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
        else:
            epoch = data
        count = 0
        for item in epoch:
            count += 1
            pending.append(item)
            if len(pending) == batch_size:
                yield stack_batches(pending, owner)
                pending = []
        if count == 0:
            raise ConfigError(f"{owner}: training data yielded no batch")


def with_labels(batch: Any) -> Any:
    """A Hugging Face batch with ``labels`` (the input ids, padding as -100) added when it has none."""
    if isinstance(batch, Mapping) and "labels" not in batch and isinstance(batch.get("input_ids"), torch.Tensor):
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            labels = labels.masked_fill(mask == 0, -100)
        return {**batch, "labels": labels}
    return batch


def make_optimizer(kind: str, params: list[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9."""
    if kind == "adamw":
        try:  # one fused kernel per step: several times faster than the loop on CPU
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def lr_factor(step: int, *, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then ``constant``, ``linear`` or ``cosine`` decay towards 0.

    Example:
        >>> [round(lr_factor(t, steps=4, warmup=1, schedule="linear"), 3) for t in range(4)]
        [0.5, 1.0, 0.667, 0.333]
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def mean_parts(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average named loss parts (tensors or numbers) over micro-batches, as floats."""
    keys = sorted({k for p in parts for k in p})
    return {k: sum(float(p[k]) for p in parts if k in p) / max(1, sum(k in p for p in parts)) for k in keys}
