"""Find a model's repeated blocks (decoder or encoder layers)."""

from __future__ import annotations

from torch import nn

from ..errors import CalibrationError

__all__ = ["find_blocks"]


def _lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def find_blocks(model: nn.Module, blocks: str | None = None) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks, in execution order, as ``[(qualified_name, block)]``.

    Generically the longest ``nn.ModuleList`` whose members are all of one type (the decoder
    layers of LLaMA, Qwen2, Mistral, OPT, GPT-2, the encoder layers of BERT). A model without
    repeated blocks is one block: ``[("", model)]``.

    Args:
        model: The model.
        blocks: Qualified name of the ``nn.ModuleList`` (or ``nn.Sequential``) holding the
            blocks, to choose them yourself (e.g. ``"model.layers"``).

    Raises:
        CalibrationError: ``blocks`` names no module, or one that is not a list of modules.

    Example:
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Linear(4, 4)
        ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        >>> [name for name, _ in find_blocks(Net())]
        ['layers.0', 'layers.1', 'layers.2']
        >>> find_blocks(nn.Linear(2, 2))[0][0]
        ''
    """
    if blocks is not None:
        try:
            container = model.get_submodule(blocks)
        except AttributeError:
            found = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in _lists(model)) or "none"
            raise CalibrationError(f"blocks={blocks!r} names no module of {type(model).__name__}; its module lists: {found}") from None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise CalibrationError(f"blocks={blocks!r} must name a non-empty nn.ModuleList or nn.Sequential (got {type(container).__name__})")
        prefix = f"{blocks}." if blocks else ""
        return [(f"{prefix}{i}", m) for i, m in enumerate(container)]
    best: tuple[str, nn.ModuleList] | None = None
    for name, container in _lists(model):
        if len({type(m) for m in container}) == 1 and (best is None or len(container) > len(best[1])):
            best = (name, container)
    if best is None:
        return [("", model)]
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", m) for i, m in enumerate(best[1])]
