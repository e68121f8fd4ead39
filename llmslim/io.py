"""Compressed checkpoints: a folder of safetensors files plus ``llmslim.json``, no pickle anywhere.

:func:`save` writes the model's tensors as stored (packed low-bit codes, compressed sparse values,
scales, untouched float weights) and a manifest naming, for every module llmslim replaced, its
kind and the config that rebuilds it. :func:`load` takes a freshly built *uncompressed* model (on
CPU, or on the ``meta`` device so the float weights are never allocated), replays the module swaps
and fills the tensors module by module from the files. :class:`StreamingSave` writes the same
folder block by block while a model is calibrated from its shards on disk. See
docs/checkpoints.md for the format.

Example:
    >>> import tempfile, torch
    >>> import llmslim as ls
    >>> build = lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    >>> torch.manual_seed(0) and None
    >>> model = build()
    >>> _ = ls.compress_(model, ls.quant.RTN(bits=4, group_size=32), progress=False)
    >>> x = torch.randn(2, 64)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = ls.save(model, f"{tmp}/ckpt")
    ...     with torch.device("meta"):
    ...         skeleton = build()
    ...     loaded = ls.load(f"{tmp}/ckpt", skeleton)
    >>> type(loaded[0]).__name__, torch.equal(loaded(x), model(x))
    ('QuantLinear', True)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ._ckpt_kinds import ModuleKind, known_kinds, register_module_kind
from ._ckpt_manifest import FORMAT_VERSION, MANIFEST, read_manifest
from ._ckpt_stream import StreamingSave
from .errors import CheckpointError, ConfigError

__all__ = ["save", "load", "StreamingSave", "read_manifest", "register_module_kind", "known_kinds", "ModuleKind", "FORMAT_VERSION", "MANIFEST"]


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    shard_bytes: int = 2**31,
    _extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save a (compressed) model to the folder ``path``, atomically.

    The folder holds ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` shards and
    ``model.safetensors.index.json`` above ``shard_bytes``) and the manifest ``llmslim.json``. It
    is written into a temporary sibling folder and renamed into place: an interrupted save leaves
    no partial folder and any previous checkpoint at ``path`` intact.

    Args:
        model: The model, finalized (no active parametrizations), tensors on any device.
        path: The folder to create.
        recipe: The recipe that produced the model (e.g. ``PassManager.to_recipe()``), recorded.
        overwrite: Replace an existing folder (the old one is removed only once the new one is
            in place).
        shard_bytes: Largest tensor bytes per file before sharding.

    Returns:
        The folder's absolute path.

    Raises:
        CheckpointError: ``path`` exists (without ``overwrite``), the model has training-time
            parametrizations (finalize first), or tensors on ``meta``.
        ConfigError: ``shard_bytes`` is not a positive integer.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = save(torch.nn.Linear(4, 2), f"{tmp}/ckpt")
        ...     sorted(p.name for p in folder.iterdir())
        ['llmslim.json', 'model.safetensors']
    """
    from ._ckpt_write import write_folder

    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"shard_bytes must be a positive integer (got {shard_bytes!r})")
    return write_folder(model, Path(path), recipe=recipe, overwrite=bool(overwrite), shard_bytes=shard_bytes, extra=_extra)


def load(path: str | os.PathLike[str], model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Load the checkpoint folder ``path`` into ``model``, a freshly built uncompressed model.

    Build ``model`` as the original was built before compression, on CPU or under
    ``with torch.device("meta"):`` (then the float weights are never allocated, and memory stays
    near the checkpoint's size). The compressed modules named in the manifest are rebuilt and
    swapped in, then every tensor is read from the files module by module and assigned, tied
    tensors are re-tied, and nothing may be left on ``meta``.

    Args:
        path: A folder written by :func:`save`.
        model: The skeleton to fill, in place.
        verify: Check every file's sha256 against the manifest first (reads the files once).

    Returns:
        ``model``, loaded.

    Raises:
        CheckpointError: A newer format version, a module kind outside llmslim's own and the
            registered ones, a missing, truncated or corrupted file, a missing, extra or
            mis-shaped tensor (each named). ``model`` is then restored to its state before the
            call (the modules swapped back, its own tensors in place).

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = save(torch.nn.Linear(4, 2), f"{tmp}/ckpt")
        ...     with torch.device("meta"):
        ...         skeleton = torch.nn.Linear(4, 2)
        ...     load(f"{tmp}/ckpt", skeleton).weight.device.type
        'cpu'
    """
    from ._ckpt_read import load_folder

    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be an nn.Module to load into (got {type(model).__name__})")
    return load_folder(Path(path), model, verify=verify)
