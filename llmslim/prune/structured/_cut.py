"""How to cut: remove the slices of chosen groups (one new, smaller module per layer, swapped in),
drop whole blocks, and keep the Hugging Face config and module attributes in step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..._ckpt_structure import fresh_config_, record_
from ..._targets import replace_module_
from ...errors import ConfigError
from ._groups import Decoder, Group, channel_groups, head_groups, kv_groups
from ._slicing import keep_of, sliceable

__all__ = ["removed_of", "remove_", "cut_mlp_", "cut_attention_", "cut_blocks_", "update_config_", "mlp_config"]


def removed_of(groups: Iterable[Group]) -> dict[tuple[str, int], set[int]]:
    """The logical rows (``dim=0``) and columns (``dim=1``) the slices of ``groups`` cover, per ``(module, dim)``.

    Example:
        >>> from llmslim.prune.structured import Slice
        >>> removed_of([Group("channel", 0, 1, (Slice("up", 0, 1, 2), Slice("down", 1, 1, 2)))])
        {('up', 0): {1}, ('down', 1): {1}}
    """
    out: dict[tuple[str, int], set[int]] = defaultdict(set)
    for g in groups:
        for s in g.slices:
            out[(s.module, s.dim)].update(range(s.start, s.stop))
    return dict(out)


def remove_(model: nn.Module, removed: Mapping[tuple[str, int], Iterable[int]]) -> dict[str, nn.Module]:
    """Cut logical rows/columns ``removed[(module, dim)]`` from each named layer, in place (module swap).

    Each layer is rebuilt once, smaller, by its registered :class:`~._slicing.Sliceable`; the
    old modules are returned by name (nothing else holds them, so a rollback journal can swap
    them back).

    Raises:
        ConfigError: A named module has no registered way to be cut, or an index is out of range.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> _ = remove_(model, {("0", 0): [1, 2], ("2", 1): [1, 2]})
        >>> model[0].out_features, model[2].in_features
        (2, 2)
    """
    by_module: dict[str, dict[int, set[int]]] = defaultdict(dict)
    for (name, dim), idx in removed.items():
        by_module[name].setdefault(dim, set()).update(int(i) for i in idx)
    old: dict[str, nn.Module] = {}
    for name, dims in by_module.items():
        module = model.get_submodule(name)
        spec = sliceable(module)
        if spec is None:
            raise ConfigError(f"module {name!r} ({type(module).__name__}) has no registered way to be cut (register_sliceable)")
        new = module
        for dim, gone in sorted(dims.items()):
            width = spec.width(new, dim)
            if gone and (min(gone) < 0 or max(gone) >= width):
                raise ConfigError(f"module {name!r}: cannot remove {'rows' if dim == 0 else 'columns'} {sorted(gone)[-1]} of {width}")
            new = spec.cut(new, dim, keep_of(width, gone))
        old[name] = replace_module_(model, name, new)
    return old


def cut_mlp_(model: nn.Module, dec: Decoder, i: int, keep: torch.Tensor) -> None:
    """Keep MLP channels ``keep`` (sorted indices) of block ``i``."""
    kept = {int(j) for j in keep}
    remove_(model, removed_of(g for g in channel_groups(dec, i) if g.index not in kept))
    _, mlp = dec.mlp(i)
    if isinstance(vars(mlp).get("intermediate_size"), int):
        mlp.intermediate_size = len(kept)


def cut_attention_(model: nn.Module, dec: Decoder, i: int, keep_heads: Sequence[int], keep_kv: Sequence[int]) -> None:
    """Keep query heads ``keep_heads`` and key/value heads ``keep_kv`` of block ``i`` (each kv
    group keeping the same number of query heads, which grouped-query attention needs)."""
    _, attn = dec.attn(i)
    d = dec.heads(i)[2]
    heads = [g for g in head_groups(dec, i) if g.index not in set(keep_heads)]
    kvs = [g for g in kv_groups(dec, i) if g.index not in set(keep_kv)]
    # slices of one layer merge (a fused q|k|v layer loses its q, k and v rows in one cut)
    remove_(model, removed_of([*heads, *kvs]))
    if dec.layout.set_heads is not None:
        dec.layout.set_heads(attn, len(keep_heads), len(keep_kv), d)


def cut_blocks_(model: nn.Module, dec: Decoder, keep: Sequence[int]) -> None:
    """Keep blocks ``keep`` (sorted) of the block list; renumber the kept blocks' ``layer_idx``."""
    parent_name, _, child = dec.container.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, nn.ModuleList(old[i] for i in keep))
    for new_idx, i in enumerate(keep):
        for module in old[i].modules():
            if isinstance(vars(module).get("layer_idx"), int):
                module.layer_idx = new_idx  # the KV cache is indexed by it
    record_(model, layers=(dec.container, len(old), list(keep)))


def update_config_(model: nn.Module, changes: dict[str, Any]) -> dict[str, Any]:
    """Set ``changes`` on a copy of the model's config (copy-on-write, so rollback restores it)
    and record them for checkpoints; return what was set (nothing without a config)."""
    if getattr(model, "config", None) is None:
        record_(model)
        return {}
    config = fresh_config_(model)
    for key, value in changes.items():
        if value is None:
            if key in vars(config):
                delattr(config, key)
            continue
        setattr(config, key, value)
    record_(model, config=dict(changes))  # None: the key is removed
    return changes


def mlp_config(model: nn.Module, dec: Decoder) -> dict[str, Any]:
    """The MLP width after a cut, under the layout's config key (``intermediate_size``, ``ffn_dim``,
    ``n_inner``): one int when every block agrees, else the largest (a model built from the config
    can hold every block) plus ``intermediate_size_per_layer``."""
    key = dec.layout.config_mlp
    if key is None:
        return {}
    sizes = [dec.mlp_width(i) for i in range(len(dec.blocks))]
    if len(set(sizes)) == 1:
        return {key: sizes[0], "intermediate_size_per_layer": None}
    return {key: max(sizes), "intermediate_size_per_layer": sizes}
