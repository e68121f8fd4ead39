"""Capture the inputs of the first block: run each batch up to it, then stop the forward."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._context import Context
from ..errors import CalibrationError

__all__ = ["BlockInput", "capture_inputs", "replace_hidden", "first_tensor", "token_mask", "to_device", "without_cache"]


class _Stop(Exception):
    """Raised by the capture hook to end the forward at the first block."""


@dataclasses.dataclass
class BlockInput:
    """One batch's positional and keyword inputs to a block, and its padding mask."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # [batch, seq] with 1 for real tokens, or None

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states: the first positional input, or ``hidden_states=``."""
        value = self.args[0] if self.args else self.kwargs.get("hidden_states")
        if not isinstance(value, torch.Tensor):
            raise CalibrationError("a block's inputs must carry the hidden states first or as hidden_states=")
        return value


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def token_mask(batch: Any) -> torch.Tensor | None:
    """The 2-D attention mask of a batch (1 for real tokens), if it has one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden states a block returns: the tensor itself, or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise CalibrationError(f"a block must return a tensor or a tuple starting with one (got {type(out).__name__})")


def replace_hidden(inp: BlockInput, hidden: torch.Tensor) -> BlockInput:
    """The same inputs with the hidden states (first positional, or ``hidden_states``) replaced."""
    if inp.args:
        return BlockInput((hidden, *inp.args[1:]), inp.kwargs, inp.mask)
    if "hidden_states" in inp.kwargs:
        return BlockInput(inp.args, {**inp.kwargs, "hidden_states": hidden}, inp.mask)
    raise CalibrationError("a block's inputs must carry the hidden states first or as hidden_states=")


def without_cache(model: nn.Module, batch: Any) -> Any:
    # Caches are disabled during calibration: a block must not append to a KV cache.
    if isinstance(batch, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        return {**batch, "use_cache": False}
    return batch


def capture_inputs(
    model: nn.Module, first_block: nn.Module, batches: list[Any], ctx: Context, *, store: torch.device
) -> list[BlockInput]:
    """Run every batch up to ``first_block`` and return what it would have received.

    Args:
        model: The model.
        first_block: The first block; a forward pre-hook records its inputs and stops the forward.
        batches: Calibration batches, each run through ``ctx.run``.
        ctx: Gives the forward adapter and the device.
        store: Where captured activations are kept (CPU to bound device memory).

    Raises:
        CalibrationError: No batches, a batch the model cannot run, a forward that never reaches
            the block, or NaN/Inf in a captured activation.
    """
    if not batches:
        raise CalibrationError("calibration needs at least one batch (got none)")
    captured: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(BlockInput(to_device(args, store), to_device(dict(kwargs), store), None))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                before = len(captured)
                try:
                    ctx.run(model, without_cache(model, batch))
                except _Stop:
                    pass
                except Exception as exc:
                    raise CalibrationError(
                        f"calibration batch {i} does not fit the model {type(model).__name__}: {type(exc).__name__}: {exc}"
                    ) from exc
                if len(captured) == before:
                    raise CalibrationError(f"calibration batch {i}: the forward finished without reaching the first block")
                mask = token_mask(batch)
                captured[-1].mask = None if mask is None else mask.to(store)
                if captured[-1].hidden.device.type == "meta":
                    raise CalibrationError(f"calibration batch {i}: the inputs of the first block are on the meta device "
                                           "(a tensor before the blocks was never loaded)")
                if not torch.isfinite(captured[-1].hidden).all():
                    raise CalibrationError(f"calibration batch {i}: the inputs of the first block contain NaN or Inf")
    finally:
        handle.remove()
    return captured
