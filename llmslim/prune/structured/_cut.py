"""How to cut: slice ``nn.Linear`` weights into new, smaller ``nn.Linear`` modules (module swap),
drop whole blocks, and keep the Hugging Face config and module attributes in step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..._ckpt_structure import fresh_config_, record_
from ..._targets import replace_module_
from ._groups import Decoder

__all__ = ["slice_linear", "cut_mlp_", "cut_attention_", "cut_blocks_", "update_config_"]


def slice_linear(linear: nn.Linear, dim: int, keep: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` holding only rows (``dim=0``, with their bias) or columns (``dim=1``) ``keep``.

    Example:
        >>> layer = nn.Linear(3, 4)
        >>> small = slice_linear(layer, 0, torch.tensor([0, 2]))
        >>> small.weight.shape, torch.equal(small.bias, layer.bias[[0, 2]])
        (torch.Size([2, 3]), True)
    """
    w = linear.weight.detach()
    keep = keep.to(w.device)
    fan_in, fan_out = (linear.in_features, len(keep)) if dim == 0 else (len(keep), linear.out_features)
    new = nn.Linear(fan_in, fan_out, bias=linear.bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.index_select(dim, keep).clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        b = linear.bias.detach()
        new.bias = nn.Parameter(b.index_select(0, keep).clone() if dim == 0 else b.clone(), requires_grad=linear.bias.requires_grad)
    new.train(linear.training)
    return new


def _swap(model: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    replace_module_(model, name, slice_linear(model.get_submodule(name), dim, keep))


def cut_mlp_(model: nn.Module, dec: Decoder, i: int, keep: torch.Tensor) -> None:
    """Keep MLP channels ``keep`` (sorted indices) of block ``i``."""
    name, mlp = dec.mlp(i)
    _swap(model, f"{name}.gate_proj", 0, keep)
    _swap(model, f"{name}.up_proj", 0, keep)
    _swap(model, f"{name}.down_proj", 1, keep)
    if isinstance(vars(mlp).get("intermediate_size"), int):
        mlp.intermediate_size = len(keep)


def cut_attention_(model: nn.Module, dec: Decoder, i: int, keep_heads: Sequence[int], keep_kv: Sequence[int]) -> None:
    """Keep query heads ``keep_heads`` and key/value heads ``keep_kv`` of block ``i`` (each kv
    group keeping the same number of query heads, which grouped-query attention needs)."""
    name, attn = dec.attn(i)
    _, _, d = dec.heads(i)

    def rows(heads: Sequence[int]) -> torch.Tensor:
        return torch.tensor([h * d + k for h in heads for k in range(d)], dtype=torch.long)

    _swap(model, f"{name}.q_proj", 0, rows(keep_heads))
    _swap(model, f"{name}.o_proj", 1, rows(keep_heads))
    _swap(model, f"{name}.k_proj", 0, rows(keep_kv))
    _swap(model, f"{name}.v_proj", 0, rows(keep_kv))
    # the attention forward reads these from the module (eager and SDPA repeat k/v by the groups)
    attn.num_key_value_groups = len(keep_heads) // len(keep_kv)
    for attr, value in (("num_heads", len(keep_heads)), ("num_key_value_heads", len(keep_kv))):
        if isinstance(vars(attn).get(attr), int):
            setattr(attn, attr, value)


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
    """``intermediate_size`` after an MLP cut: one int when every block agrees, else the largest
    (a model built from the config can hold every block) plus ``intermediate_size_per_layer``."""
    sizes = [dec.mlp(i)[1].down_proj.in_features for i in range(len(dec.blocks))]
    if len(set(sizes)) == 1:
        return {"intermediate_size": sizes[0], "intermediate_size_per_layer": None}
    return {"intermediate_size": max(sizes), "intermediate_size_per_layer": sizes}
