"""Load a model's weights one block at a time from safetensors shards (skeleton on ``meta``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CalibrationError

__all__ = ["ShardedWeights"]


def _is_loaded(module: nn.Module, key: str, weights: "ShardedWeights") -> bool:
    # A tensor came from the checkpoint when this module's tensor of that name was loaded.
    return (id(module), key) in weights._loaded


class ShardedWeights:
    """Tensors of a checkpoint folder (``*.safetensors``, optionally with an index), read lazily.

    Build the model on the ``meta`` device (``with torch.device("meta"): ...``) so its float
    weights are never materialised, then let the calibration engine call :meth:`load_` on each
    block just before it runs and :meth:`release_` right after.

    Args:
        path: A ``.safetensors`` file or a folder of them (``model.safetensors.index.json`` is
            used when present).

    Raises:
        CalibrationError: No safetensors file at ``path``.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> folder = tempfile.mkdtemp()
        >>> save_file({"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}, f"{folder}/model.safetensors")
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> ShardedWeights(folder).load_(model[0], "0.", "cpu")
        >>> model[0].weight.sum().item()
        4.0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if path.is_file():
            files = [path]
        elif index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CalibrationError(f"no .safetensors file at {str(path)!r}")
        from safetensors import safe_open

        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        self._loaded: set[tuple[int, str]] = set()
        self._where = {key: f for f, h in self._handles.items() for key in h.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor by its state-dict name."""
        if key not in self._where:
            raise CalibrationError(f"tensor {key!r} is not in the checkpoint")
        return self._handles[self._where[key]].get_tensor(key)

    def load_(self, module: nn.Module, prefix: str, device: torch.device | str, *, recurse: bool = True, strict: bool = True) -> None:
        """Give ``module``'s parameters and persistent buffers their values from the checkpoint.

        Args:
            module: The module (typically a block on ``meta``).
            prefix: Its qualified name plus ``"."`` (``""`` for the root).
            device: Where the tensors go.
            recurse: Also load submodules.
            strict: Raise for a ``meta`` tensor missing from the checkpoint (else leave it on ``meta``).

        Raises:
            CalibrationError: A tensor on ``meta`` is missing from the checkpoint, or has
                another shape there.
        """
        for name, sub in module.named_modules() if recurse else [("", module)]:
            base = f"{prefix}{name}." if name else prefix
            for key, p in list(sub._parameters.items()):
                if p is not None and (strict or base + key in self._where):
                    sub._parameters[key] = nn.Parameter(self._tensor(base + key, p, device), requires_grad=p.requires_grad)
                    self._loaded.add((id(sub), key))
            for key, b in list(sub._buffers.items()):
                if b is None:
                    continue
                full = base + key
                if full in self._where:
                    sub._buffers[key] = self._tensor(full, b, device)
                    self._loaded.add((id(sub), key))
                elif b.device.type == "meta" and strict:
                    raise CalibrationError(
                        f"buffer {full!r} is on the meta device and not in the checkpoint: build the modules outside "
                        "the blocks on a real device (non-persistent buffers such as rotary frequencies are not saved)"
                    )

    def _tensor(self, key: str, like: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        if key not in self._where:
            if like.device.type != "meta":
                return like.to(device)
            raise CalibrationError(f"tensor {key!r} is on the meta device and missing from the checkpoint")
        t = self.get(key)
        if tuple(t.shape) != tuple(like.shape):
            raise CalibrationError(f"tensor {key!r} has shape {tuple(t.shape)} in the checkpoint, the model expects {tuple(like.shape)}")
        return t.to(device=device, dtype=like.dtype)

    def release_(self, module: nn.Module) -> None:
        """Drop ``module``'s checkpoint tensors back to ``meta`` (frees their memory).

        Tensors the checkpoint does not hold (non-persistent buffers built on a real device)
        stay, so the module can be loaded and run again.
        """
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, t in list(store.items()):
                    if t is not None and t.device.type != "meta" and _is_loaded(sub, key, self):
                        store[key] = t.to("meta") if not isinstance(t, nn.Parameter) else nn.Parameter(t.to("meta"), requires_grad=t.requires_grad)
