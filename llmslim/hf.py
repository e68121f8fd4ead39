"""Hugging Face models with compressed modules: a checkpoint folder that also holds ``config.json``
(and the tokenizer), so the ``transformers`` class can be rebuilt without the original weights.

The folder is an :func:`llmslim.save` checkpoint plus what ``transformers`` writes for the config,
generation config and tokenizer; :func:`from_pretrained` builds the model class from the config on
the ``meta`` device and :func:`llmslim.load` fills it. Structural changes (fewer layers, heads or
channels) are rebuilt from the manifest's ``structure`` entry and the saved config.

Example:
    >>> import tempfile, torch
    >>> import llmslim as ls
    >>> from llmslim import models
    >>> model = models.tiny("llama")
    >>> _ = ls.compress_(model, ls.quant.RTN(bits=4, group_size=32), progress=False)
    >>> ids = torch.randint(0, 128, (1, 8))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_pretrained(model, None, f"{tmp}/tiny")
    ...     again = from_pretrained(f"{tmp}/tiny")
    >>> type(again).__name__, torch.equal(again(ids).logits, model(ids).logits)
    ('LlamaForCausalLM', True)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .io import load, save

__all__ = ["save_pretrained", "from_pretrained", "load_tokenizer"]


def save_pretrained(model: nn.Module, tokenizer: Any, path: str | os.PathLike[str], *, recipe: dict[str, Any] | None = None,
                    overwrite: bool = False, shard_bytes: int = 2**31) -> Path:
    """Save a compressed ``transformers`` model with its config (and ``tokenizer`` unless ``None``).

    Written atomically like :func:`llmslim.save`: the config and tokenizer files go into the same
    temporary folder before it is renamed into place.

    Returns:
        The folder's absolute path.

    Raises:
        CheckpointError: ``model`` has no ``config`` with ``save_pretrained``, or as :func:`llmslim.save`.
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "save_pretrained", None)):
        raise CheckpointError(f"save_pretrained needs a transformers model with a config (got {type(model).__name__}); use llmslim.save")

    def extra(folder: Path) -> None:
        if not getattr(config, "architectures", None):  # as transformers' own save_pretrained records it
            config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and callable(getattr(generation, "save_pretrained", None)):
            generation.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return save(model, path, recipe=recipe, overwrite=overwrite, shard_bytes=shard_bytes, _extra=extra)


def from_pretrained(path: str | os.PathLike[str]) -> nn.Module:
    """The ``transformers`` model saved by :func:`save_pretrained`, compressed modules in place, in eval mode.

    The class comes from ``config.json`` (a causal LM when its ``architectures`` says so, else the
    base model); it is built on the ``meta`` device, so the float weights are never allocated.

    Raises:
        CheckpointError: No ``config.json``, or as :func:`llmslim.load`.
        MissingDependencyError: transformers is not installed.
    """
    from .models import _transformers

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: config.json is missing: not a folder written by llmslim.hf.save_pretrained")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    # the class transformers itself would pick: one of its own model classes, by name
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names)
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return load(folder, model).eval()


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved next to the model, or ``None`` when there is none."""
    from .models import _transformers

    folder = Path(path).expanduser()
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return _transformers().AutoTokenizer.from_pretrained(folder)
