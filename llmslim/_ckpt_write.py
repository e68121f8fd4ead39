"""Writing a checkpoint folder: collect the tensors and the manifest, shard, write atomically."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._ckpt_kinds import module_kind
from ._ckpt_manifest import INDEX, MANIFEST, SINGLE, manifest_dict, sha256_file, shard_name
from ._ckpt_structure import structure_of
from .errors import CheckpointError

__all__ = ["collect", "write_folder", "publish_folder"]


def _check_final(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            held = ", ".join(module.parametrizations)  # type: ignore[union-attr]
            raise CheckpointError(
                f"module {name or '(root)'!r} has active parametrizations on {held} (training-time state such as a pruning "
                "mask or QAT fake quantization): finalize the passes before saving (ls.compress_ finalizes; in a training "
                "loop call PassManager.finalize)"
            )


def module_entry(name: str, kind: str, module: nn.Module, names: dict[int, str]) -> dict[str, Any]:
    """The manifest entry of one compressed module (``names``: qualified name by module id)."""
    cfg = module.checkpoint_config()  # type: ignore[operator]
    try:
        json.dumps(cfg, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{kind}.checkpoint_config() of {name!r} must return plain JSON data ({exc})") from None
    entry: dict[str, Any] = {"name": name, "kind": kind, "config": cfg}
    tie = getattr(module, "checkpoint_tied", None)
    owner = tie() if callable(tie) else None
    if owner is not None:
        if id(owner) not in names:
            raise CheckpointError(f"module {name!r} is tied to a module outside the model")
        entry["tied_to"] = names[id(owner)]
    return entry


def _kinds(model: nn.Module) -> tuple[list[dict[str, Any]], set[str]]:
    """Manifest entries of the modules of registered kinds, and their prefixes."""
    names = {id(m): n for n, m in model.named_modules()}
    entries: list[dict[str, Any]] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        kind = module_kind(module)
        if kind is None:
            continue
        if not name:
            raise CheckpointError(f"the root module is a {kind}: save a model that contains it instead")
        entries.append(module_entry(name, kind, module, names))
        inside.add(name + ".")
    return entries, inside


def collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, parts)``: every tensor to store, each once, and the manifest's module entries,
    aliases (tied tensors) and non-persistent buffers.

    Raises:
        CheckpointError: Active parametrizations, tensors on ``meta``, a kind with bad config.
    """
    _check_final(model)
    entries, inside = _kinds(model)
    state = dict(model.state_dict())
    extra: list[str] = []
    # non-persistent buffers of plain modules (rotary inv_freq ...): a skeleton built on meta has no values for them
    for name, module in model.named_modules():
        if any((name + ".").startswith(p) for p in inside):
            continue
        for b in sorted(module._non_persistent_buffers_set):
            t = module._buffers.get(b)
            if t is not None:
                key = f"{name}.{b}" if name else b
                state[key] = t.detach()
                extra.append(key)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state entry {key!r} is not a tensor ({type(t).__name__}): extra state cannot be saved")
        if t.device.type == "meta":
            raise CheckpointError(f"tensor {key!r} is on the meta device: it has no values to save")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]  # the same tensor under two names (tied weights): stored once
            continue
        if ident is not None:
            seen[ident] = key
        c = t.detach().to("cpu").contiguous()
        if c.untyped_storage().nbytes() != c.numel() * c.element_size():
            c = c.clone()  # a view into a larger storage: safetensors stores whole, unshared tensors
        tensors[key] = c
    return tensors, {"modules": entries, "aliases": aliases, "non_persistent": extra, "structure": structure_of(model)}


def _shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors file and flush it to disk (tests replace this to simulate a crash)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders: the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_folder(model: nn.Module, path: Path, *, recipe: dict[str, Any] | None, overwrite: bool, shard_bytes: int,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write the checkpoint of ``model`` to ``path`` atomically (see :func:`llmslim.save`)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists: pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    tensors, parts = collect(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    tmp.mkdir()
    try:
        groups = _shards(tensors, shard_bytes)
        files: dict[str, dict[str, Any]] = {}
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(groups, 1):
            fname = SINGLE if len(groups) == 1 else shard_name(i, len(groups))
            write_shard({k: tensors[k] for k in keys}, tmp / fname)
            files[fname] = {"sha256": sha256_file(tmp / fname), "bytes": (tmp / fname).stat().st_size, "tensors": len(keys)}
            weight_map.update(dict.fromkeys(keys, fname))
        if len(groups) > 1:  # the index other loaders read
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if extra is not None:
            extra(tmp)
        _write_json(tmp / MANIFEST, manifest_dict(parts, files=files, recipe=recipe))
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def publish_folder(tmp: Path, path: Path) -> None:
    """Move the complete folder ``tmp`` to ``path`` atomically; an existing ``path`` is removed
    only once ``tmp`` is in its place, and put back if the move fails."""
    _fsync_dir(tmp)
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    moved = False
    try:
        if path.exists():
            os.rename(path, old)
            moved = True
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if moved and not path.exists():
            os.rename(old, path)  # put the previous checkpoint back
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
