"""Exact rules for Hugging Face transformer blocks: where each family keeps its MLP and attention weights.

A :class:`Layout` names, relative to one block, the layers whose outputs are the MLP channels, the
layers reading them, the query/key/value/output projections (separate, or fused into one layer
whose output is ``q | k | v``), and how to tell the attention module its new head counts.
Built in: ``llama`` (LLaMA, Qwen2, Mistral and relatives), ``opt``, ``gpt2`` (``Conv1D``, fused
``c_attn``) and ``bert`` (encoder). :func:`register_layout` adds one for a custom block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from ...errors import RegistryError

__all__ = ["Layout", "register_layout", "layouts", "LLAMA", "OPT", "GPT2", "BERT"]


def _no_check(block: nn.Module) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family of transformer blocks keeps its weights (every name relative to the block).

    Attributes:
        name: The family's name, shown in errors.
        mlp_in: Layers whose output rows are the MLP's intermediate channels (gate and up).
        mlp_out: Layers whose input columns are those channels (down).
        mlp: The module reported as "the MLP" (``""``: the block itself).
        attn: The attention module (reported, and given the new head counts); ``None`` when
            the layout has no attention rules (then only ``channels`` and ``layers`` apply).
        q, k, v, o: Query, key, value and output projections. ``q == k == v`` means one fused
            layer whose outputs are the query, key and value rows one after the other (GPT-2).
        head_dim: Attribute path, on the attention module, of the per-head width.
        set_heads: ``set_heads(attn, n_query, n_kv, head_dim)``: update the attention module's
            attributes after heads are removed (its projections are already swapped).
        config_mlp: Config key of the MLP width (``intermediate_size``, ``ffn_dim``, ``n_inner``).
        config_heads: Whether the config can state a pruned head count: it has a ``head_dim``
            entry, so ``num_attention_heads`` no longer fixes the head width (LLaMA family).
            Otherwise (OPT, GPT-2, BERT derive ``head_dim = hidden_size / num_attention_heads``)
            the config keeps its counts and lists the new ones per layer.
        check: ``check(block)``: why a matching block still cannot be pruned, or ``None``.
    """

    name: str
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    mlp: str = ""
    attn: str | None = None
    q: str = ""
    k: str = ""
    v: str = ""
    o: str = ""
    head_dim: str = "head_dim"
    set_heads: Callable[[nn.Module, int, int, int], None] | None = None
    config_mlp: str | None = None
    config_heads: bool = False
    check: Callable[[nn.Module], str | None] = _no_check

    @property
    def fused(self) -> bool:
        """Whether q, k and v are one layer."""
        return self.attn is not None and self.q == self.k == self.v

    def names(self) -> tuple[str, ...]:
        """Every layer the layout names (each once)."""
        attn = (self.q, self.k, self.v, self.o) if self.attn is not None else ()
        return tuple(dict.fromkeys((*self.mlp_in, *self.mlp_out, *attn)))


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout, *, replace: bool = False) -> None:
    """Add ``layout`` to the rules tried (in registration order) on a model's blocks.

    Raises:
        RegistryError: A layout of that name exists (without ``replace``).

    Example:
        >>> mine = Layout("doc-mlp-only", mlp_in=("ffn.w_in",), mlp_out=("ffn.w_out",), mlp="ffn")
        >>> register_layout(mine)
        >>> layouts()[-1].names(), mine.attn is None
        (('ffn.w_in', 'ffn.w_out'), True)
        >>> del _LAYOUTS["doc-mlp-only"]
    """
    if layout.name in _LAYOUTS and not replace:
        raise RegistryError(f"layout {layout.name!r} is already registered; pass replace=True to replace it")
    _LAYOUTS[layout.name] = layout


def layouts() -> tuple[Layout, ...]:
    """The registered layouts, in the order they are tried.

    Example:
        >>> [layout.name for layout in layouts()][:4]
        ['llama', 'opt', 'gpt2', 'bert']
    """
    return tuple(_LAYOUTS.values())


# -- built-ins ------------------------------------------------------------------------------
def _set_llama(attn: nn.Module, nq: int, nkv: int, d: int) -> None:
    # the forward reshapes with head_dim and -1 heads, and repeats k/v by num_key_value_groups
    attn.num_key_value_groups = nq // nkv
    for attr, value in (("num_heads", nq), ("num_key_value_heads", nkv)):
        if isinstance(vars(attn).get(attr), int):
            setattr(attn, attr, value)


def _check_llama(block: nn.Module) -> str | None:
    attn = block.get_submodule("self_attn")
    if not isinstance(getattr(attn, "head_dim", None), int) or not isinstance(getattr(attn, "num_key_value_groups", None), int):
        return "self_attn has no integer head_dim and num_key_value_groups"
    return None


def _set_opt(attn: nn.Module, nq: int, nkv: int, d: int) -> None:
    attn.num_heads = nq  # OPTAttention views q/k/v as [batch, seq, num_heads, head_dim]


def _set_gpt2(attn: nn.Module, nq: int, nkv: int, d: int) -> None:
    attn.num_heads = nq
    attn.split_size = nq * d  # c_attn's output is split into q, k, v of this width


def _check_gpt2(block: nn.Module) -> str | None:
    if getattr(block.get_submodule("attn"), "is_cross_attention", False) or hasattr(block, "crossattention"):
        return "blocks with cross-attention are not covered"
    return None


def _set_bert(attn: nn.Module, nq: int, nkv: int, d: int) -> None:
    attn.self.num_attention_heads = nq
    attn.self.all_head_size = nq * d


def _check_bert(block: nn.Module) -> str | None:
    if hasattr(block, "crossattention"):
        return "blocks with cross-attention are not covered"
    return None


LLAMA = Layout("llama", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out=("mlp.down_proj",), mlp="mlp", attn="self_attn",
               q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
               set_heads=_set_llama, config_mlp="intermediate_size", config_heads=True, check=_check_llama)
OPT = Layout("opt", mlp_in=("fc1",), mlp_out=("fc2",), attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj",
             v="self_attn.v_proj", o="self_attn.out_proj", set_heads=_set_opt, config_mlp="ffn_dim")
GPT2 = Layout("gpt2", mlp_in=("mlp.c_fc",), mlp_out=("mlp.c_proj",), mlp="mlp", attn="attn", q="attn.c_attn", k="attn.c_attn",
              v="attn.c_attn", o="attn.c_proj", set_heads=_set_gpt2, config_mlp="n_inner", check=_check_gpt2)
BERT = Layout("bert", mlp_in=("intermediate.dense",), mlp_out=("output.dense",), attn="attention", q="attention.self.query",
              k="attention.self.key", v="attention.self.value", o="attention.output.dense", head_dim="self.attention_head_size",
              set_heads=_set_bert, config_mlp="intermediate_size", check=_check_bert)

for _layout in (LLAMA, OPT, GPT2, BERT):
    register_layout(_layout)
