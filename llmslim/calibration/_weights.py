"""Load a model's weights one block at a time from safetensors shards (skeleton on ``meta``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CalibrationError

__all__ = ["ShardedWeights"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


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
        self._index: dict[str, tuple[Path, int, str, tuple[int, ...], int, int]] = {}
        for f in files:
            self._read_header(f)
        self._where = {key: entry[0] for key, entry in self._index.items()}
        self._loaded: set[tuple[int, str]] = set()

    def _read_header(self, path: Path) -> None:
        # The safetensors layout: an 8-byte little-endian header length, a JSON header
        # {name: {dtype, shape, data_offsets}}, then the raw bytes. Reading with plain file reads
        # (no mmap) keeps resident memory to the tensors actually copied out.
        try:
            with path.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in _DTYPES:
                raise CalibrationError(f"tensor {key!r} in {path.name} has unsupported dtype {meta['dtype']!r}")
            begin, end = meta["data_offsets"]
            self._index[key] = (path, 8 + size, meta["dtype"], tuple(meta["shape"]), begin, end)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor by its state-dict name, read into fresh memory."""
        if key not in self._index:
            raise CalibrationError(f"tensor {key!r} is not in the checkpoint")
        path, base, dtype, shape, begin, end = self._index[key]
        buf = bytearray(end - begin)
        with path.open("rb") as fh:
            fh.seek(base + begin)
            if fh.readinto(buf) != len(buf):
                raise CalibrationError(f"tensor {key!r} is truncated in {path.name}")
        if not buf:
            return torch.empty(shape, dtype=_DTYPES[dtype])
        return torch.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape)

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
