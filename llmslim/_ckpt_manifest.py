"""The checkpoint manifest ``llmslim.json``: its fields, version rules, validation and checksums.

Compatibility promise: a loader reads every format version up to its own :data:`FORMAT_VERSION`;
a newer one is refused with a message saying which llmslim wrote it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "SINGLE", "INDEX", "manifest_dict", "read_manifest", "sha256_file", "shard_name", "verify_files"]

FORMAT = "llmslim-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "llmslim.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_CHUNK = 1 << 20


def shard_name(i: int, n: int) -> str:
    """``model-00001-of-00003.safetensors``, the Hugging Face spelling.

    Example:
        >>> shard_name(2, 3)
        'model-00002-of-00003.safetensors'
    """
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_dict(parts: dict[str, Any], *, files: dict[str, dict[str, Any]], recipe: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest written next to the tensors."""
    from . import __version__

    if recipe is not None:
        try:
            recipe = json.loads(json.dumps(recipe, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"recipe must be plain JSON data, e.g. PassManager.to_recipe() ({exc})") from None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "llmslim_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "recipe": recipe,
        "modules": parts["modules"],
        "aliases": parts["aliases"],
        "non_persistent": parts["non_persistent"],
        # structural passes (fewer layers, heads, channels): shapes and config changes, or None
        "structure": parts.get("structure"),
        "files": files,
    }


def _need(cond: bool, where: Path, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: malformed manifest: {what}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and validate ``folder/llmslim.json``.

    Raises:
        CheckpointError: Missing, not JSON, another format, a newer format version, bad fields.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no such folder)")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not an llmslim checkpoint: {MANIFEST} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the manifest ({exc})") from None
    _need(isinstance(data, dict) and data.get("format") == FORMAT, path, f"'format' must be {FORMAT!r}")
    version = data.get("format_version")
    _need(isinstance(version, int) and not isinstance(version, bool) and version >= 1, path, f"format_version must be a positive integer (got {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this llmslim reads (up to {FORMAT_VERSION}); "
            f"it was written by llmslim {data.get('llmslim_version', '?')}: upgrade llmslim to load it"
        )
    modules = data.get("modules")
    _need(isinstance(modules, list), path, "'modules' must be a list")
    for m in modules:
        _need(isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"] and isinstance(m.get("kind"), str)
              and isinstance(m.get("config"), dict), path, f"module entry must have name, kind and config (got {m!r})")
        _need(isinstance(m.get("tied_to", ""), str), path, f"tied_to must be a module name (got {m.get('tied_to')!r})")
    aliases = data.get("aliases")
    _need(isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()), path,
          "'aliases' must map tensor names to tensor names")
    extra = data.get("non_persistent")
    _need(isinstance(extra, list) and all(isinstance(k, str) for k in extra), path, "'non_persistent' must be a list of names")
    from ._ckpt_structure import check_structure

    check_structure(data.get("structure"), path)
    files = data.get("files")
    _need(isinstance(files, dict) and bool(files), path, "'files' must name at least one tensor file")
    for name, info in files.items():
        _need(isinstance(name, str) and "/" not in name and "\\" not in name and name not in ("", ".", "..") and name.endswith(".safetensors"),
              path, f"file names must be plain *.safetensors names in the folder (got {name!r})")
        _need(isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int), path,
              f"file entry {name!r} must have sha256 and bytes")
    return data


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every tensor file's size and sha256 against the manifest.

    Raises:
        CheckpointError: A file is missing, truncated or corrupted (named).
    """
    for name, info in manifest["files"].items():
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: tensor file is missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{path}: file is {size} bytes, the manifest says {info['bytes']} (truncated or replaced)")
        if sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"{path}: sha256 does not match the manifest (the file is corrupted or was modified)")
