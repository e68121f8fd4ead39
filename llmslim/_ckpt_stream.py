"""Streaming a checkpoint to disk block by block, while the calibration engine compresses it.

:class:`StreamingSave` is the engine's ``after_block``: each finished block's tensors are written
to the current shard at once (and, by default, released to ``meta``), so a model calibrated from
its shards on disk is never whole in memory, neither float nor compressed. The tensors outside
the blocks are written when the ``with`` statement ends, copied one at a time from the source
shards where the skeleton has them on ``meta``. The folder is the one :func:`llmslim.save`
writes (same files, manifest, checksums and aliases) and appears atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ._ckpt_kinds import module_kind
from ._ckpt_manifest import INDEX, MANIFEST, SINGLE, manifest_dict, shard_name
from ._ckpt_write import _check_final, _write_json, module_entry, publish_folder
from .errors import CheckpointError, ConfigError

__all__ = ["StreamingSave"]

_TAGS = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_CHUNK = 1 << 20


class _Shards:
    """safetensors files written tensor by tensor: the bytes go to a part file as they come, and
    a shard is finished (header, then the bytes copied and hashed) once it reaches its size limit:
    a safetensors header lists every tensor and comes first, so it can only be written last."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.done: list[dict[str, Any]] = []  # per finished shard: path, sha256, bytes, keys
        self._part: Any = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._size = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        if t.dtype not in _TAGS:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        if self._entries and self._size + nbytes > self.limit:
            self.close()
        if self._part is None:
            self._part = open(self.folder / f".part-{len(self.done)}", "wb")  # noqa: SIM115 (closed in close())
        if nbytes:
            raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._part.write(memoryview(raw.numpy()))
        self._entries[key] = {"dtype": _TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [self._size, self._size + nbytes]}
        self._size += nbytes

    def close(self) -> None:
        """Finish the current shard (an empty one when nothing was ever written)."""
        if self._part is None and self.done:
            return
        part = self.folder / f".part-{len(self.done)}"
        if self._part is None:
            part.touch()
        else:
            self._part.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        final = self.folder / f".shard-{len(self.done)}.safetensors"
        digest = hashlib.sha256()
        with open(final, "wb") as out, open(part, "rb") as src:
            for chunk in (struct.pack("<Q", len(header)), header):
                digest.update(chunk)
                out.write(chunk)
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        part.unlink()
        self.done.append({"path": final, "sha256": digest.hexdigest(), "bytes": final.stat().st_size, "keys": list(self._entries),
                          "size": self._size})
        self._part, self._entries, self._size = None, {}, 0

    def abort(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None


def _to_meta_(module: nn.Module) -> None:
    # Once written, a block's tensors (float or packed) are dropped: the checkpoint holds them.
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, t in list(store.items()):
                if t is not None and t.device.type != "meta":
                    m = t.detach().to("meta")
                    store[key] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m


def _ties(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        ties.update({name: first[id(t)]} if id(t) in first else {})
        first.setdefault(id(t), name)
    return ties


class StreamingSave:
    """Save ``model`` to the folder ``path`` block by block, as the calibration engine finishes them.

    Use it as the engine's ``after_block`` (``ls.Context(batches, weights=..., after_block=saver)``):
    each finished block is written to disk at once and then released to ``meta``. When the
    ``with`` statement ends, the tensors outside the blocks (embedding, final norm, output head)
    are written too, taken from the model or, where the skeleton still has them on ``meta``, copied
    one at a time from ``source``; then the manifest, and the folder is renamed into place. The
    result is the folder :func:`llmslim.save` would write for the compressed model: load it with
    :func:`llmslim.load`. If the ``with`` body raises, nothing is left at ``path``.

    Blocks must not share tensors with each other or with the rest of the model (tied tensors
    are found within a block and within the rest).

    Args:
        model: The model being compressed (typically a skeleton built on ``meta``).
        path: The folder to create.
        source: Where the tensors left on ``meta`` come from: a
            :class:`~llmslim.calibration.ShardedWeights` or a path to safetensors shards.
        recipe: The recipe that produced the model, recorded (also settable as ``.recipe``).
        overwrite: Replace an existing folder (only once the new one is complete).
        shard_bytes: Largest tensor bytes per file before a new shard starts.
        release: Drop each block's tensors to ``meta`` once written; defaults to ``True`` when a
            ``source`` is given (calibrating from disk), else ``False`` (the model stays usable).

    Raises:
        CheckpointError: ``path`` exists (without ``overwrite``); on exit, a tensor on ``meta``
            that ``source`` does not hold, a block handed over twice, training-time
            parametrizations.
        ConfigError: A bad ``shard_bytes`` or ``source``.

    Example:
        >>> import tempfile, torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> from safetensors.torch import save_model
        >>> tmp = tempfile.mkdtemp()
        >>> save_model(models.tiny("llama"), f"{tmp}/model.safetensors")  # stands in for a downloaded model
        >>> def skeleton():
        ...     with torch.device("meta"):  # no float weights are allocated
        ...         model = models.tiny("llama")
        ...     model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # not in the shards: real
        ...     return model
        >>> model, batches = skeleton(), [torch.randint(0, 128, (1, 16)) for _ in range(4)]
        >>> with StreamingSave(model, f"{tmp}/int4", source=f"{tmp}/model.safetensors") as saver:
        ...     ctx = ls.Context(batches, weights=f"{tmp}/model.safetensors", after_block=saver, progress=False)
        ...     _ = ls.compress_(model, ls.quant.GPTQ(bits=4, group_size=32), ctx=ctx)
        >>> saver.blocks
        ['model.layers.0', 'model.layers.1']
        >>> loaded = ls.load(f"{tmp}/int4", skeleton())
        >>> type(loaded.model.layers[1].mlp.down_proj).__name__
        'QuantLinear'
    """

    def __init__(self, model: nn.Module, path: str | os.PathLike[str], *, source: Any = None, recipe: dict[str, Any] | None = None,
                 overwrite: bool = False, shard_bytes: int = 2**31, release: bool | None = None) -> None:
        if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
            raise ConfigError(f"shard_bytes must be a positive integer (got {shard_bytes!r})")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module (got {type(model).__name__})")
        if source is not None:
            from .calibration._weights import ShardedWeights

            if isinstance(source, (str, os.PathLike)):
                source = ShardedWeights(source)
            elif not isinstance(source, ShardedWeights):
                raise ConfigError(f"source must be a ShardedWeights or a path to safetensors shards (got {type(source).__name__})")
        self.model, self.path, self.source, self.recipe = model, Path(path).expanduser().absolute(), source, recipe
        self.overwrite, self.shard_bytes = bool(overwrite), shard_bytes
        self.release = source is not None if release is None else bool(release)
        self.blocks: list[str] = []  # written so far, in order
        # tied tensors as built: loading a block from disk and releasing it gives its tensors new
        # meta objects, which would untie a skeleton's meta tensors
        self._ties = _ties(model)
        self._stored: set[str] = set()
        self._tmp: Path | None = None
        self._shards: _Shards | None = None
        self._entries: list[dict[str, Any]] = []
        self._aliases: dict[str, str] = {}
        self._extra: list[str] = []

    # -- the with statement ------------------------------------------------------------
    def __enter__(self) -> StreamingSave:
        if self._tmp is not None:
            raise CheckpointError("this StreamingSave is already open")
        if self.path.exists() and not self.overwrite:
            raise CheckpointError(f"{self.path} already exists: pass overwrite=True to replace it")
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path} exists and is not a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        self._shards = _Shards(self._tmp, self.shard_bytes)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._shards is not None:
                self._shards.abort()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)  # gone already after a successful rename
            self._tmp = self._shards = None

    # -- the engine's after_block --------------------------------------------------------
    def __call__(self, name: str, block: nn.Module) -> None:
        """Write the finished block ``name`` (looked up in the model: a pass may have swapped it)."""
        if self._shards is None:
            raise CheckpointError("StreamingSave writes only inside its with statement")
        if not name:
            raise CheckpointError("the whole model is one block: save it with llmslim.save instead")
        if name in self.blocks:
            raise CheckpointError(f"block {name!r} was handed over twice: a model is written block by block in one calibration sweep")
        module = self.model.get_submodule(name)
        _check_final(module)
        self._write_tree(module, name + ".", skip=set(), seen={})
        self.blocks.append(name)
        if self.release:
            _to_meta_(module)

    # -- internals -----------------------------------------------------------------------
    def _write_tree(self, module: nn.Module, prefix: str, *, skip: set[str], seen: dict[Any, tuple[str, torch.Tensor]]) -> None:
        kind = module_kind(module)
        if kind is not None:
            if not prefix:
                raise CheckpointError(f"the root module is a {kind}: save a model that contains it instead")
            self._entries.append(self._entry(prefix[:-1], kind, module))
            for key, t in module.state_dict(prefix=prefix).items():
                self._put(key, t, seen, extra=False)
            return
        for key, p in module._parameters.items():
            if p is not None:
                self._put(prefix + key, p, seen, extra=False)
        for key, b in module._buffers.items():
            if b is not None:
                self._put(prefix + key, b, seen, extra=key in module._non_persistent_buffers_set)
        for key, child in module._modules.items():
            if child is not None and f"{prefix}{key}" not in skip:
                self._write_tree(child, f"{prefix}{key}.", skip=skip, seen=seen)

    def _entry(self, name: str, kind: str, module: nn.Module) -> dict[str, Any]:
        return module_entry(name, kind, module, {id(m): n for n, m in self.model.named_modules()})

    def _put(self, key: str, t: torch.Tensor, seen: dict[Any, tuple[str, torch.Tensor]], *, extra: bool) -> None:
        meta = t.device.type == "meta"
        if meta and self._ties.get(key) in self._stored:
            self._aliases[key] = self._ties[key]
            return
        # meta tensors have no storage: one tensor under two names (tied weights) is one object
        ident = ("meta", id(t)) if meta else (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None)
        if ident is not None and ident in seen:
            self._aliases[key] = seen[ident][0]
            return
        if ident is not None:
            # the tensor stays referenced: a temporary (a packed_state() result) freed here could
            # give its address to the next one, which would then pass for an alias
            seen[ident] = (key, t)
        assert self._shards is not None
        self._shards.add(key, self._from_source(key, t) if meta else t)
        self._stored.add(key)
        if extra:
            self._extra.append(key)

    def _from_source(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if self.source is None or key not in self.source:
            where = "the source shards do not hold it" if self.source is not None else "no source= was given to copy it from"
            raise CheckpointError(f"tensor {key!r} is on the meta device and {where}: it has no values to save")
        t = self.source.get(key)
        if tuple(t.shape) != tuple(like.shape):
            raise CheckpointError(f"tensor {key!r} has shape {tuple(t.shape)} in the source, the model expects {tuple(like.shape)}")
        return t.to(like.dtype)  # the dtype the skeleton (and so a model loaded from the source) has

    def _finish(self) -> None:
        assert self._shards is not None and self._tmp is not None
        _check_final(self.model)
        self._write_tree(self.model, "", skip=set(self.blocks), seen={})
        self._shards.close()
        done = self._shards.done
        files: dict[str, dict[str, Any]] = {}
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(done, 1):
            fname = SINGLE if len(done) == 1 else shard_name(i, len(done))
            os.rename(shard["path"], self._tmp / fname)
            files[fname] = {"sha256": shard["sha256"], "bytes": shard["bytes"], "tensors": len(shard["keys"])}
            weight_map.update(dict.fromkeys(shard["keys"], fname))
        if len(done) > 1:  # the index other loaders read
            _write_json(self._tmp / INDEX, {"metadata": {"total_size": sum(s["size"] for s in done)}, "weight_map": weight_map})
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        entries = sorted(self._entries, key=lambda e: order.get(e["name"], len(order)))
        parts = {"modules": entries, "aliases": self._aliases, "non_persistent": self._extra}
        _write_json(self._tmp / MANIFEST, manifest_dict(parts, files=files, recipe=self.recipe))
        publish_folder(self._tmp, self.path)
