"""Where SmoothQuant can move scale: couplings between a layer's input and what produces it.

A coupling is a *source* whose outputs, channel by channel, are exactly the input columns of
its *consumers* and nothing else, so dividing the source's channel ``j`` by ``s_j`` and
multiplying the consumers' column ``j`` by ``s_j`` leaves the model's function unchanged:

* ``norm``: a pre-norm block's LayerNorm/RMSNorm (weight, and bias) and the linears reading it
  (LLaMA/Qwen2/Mistral ``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up;
  OPT ``self_attn_layer_norm`` -> q/k/v, ``final_layer_norm`` -> fc1; GPT-2 ``ln_1`` -> c_attn,
  ``ln_2`` -> c_fc);
* ``heads``: the value projection and the attention output projection (attention is linear in
  the values); with grouped key/value heads each value channel feeds one column per query head
  of its group, which all share its factor;
* ``gated``: a gated MLP's ``up_proj`` and ``down_proj`` (``down`` reads ``act(gate) * up``).

Couplings are found by the layer names of the architectures above (and of the hand-written
blocks in :mod:`llmslim.testing`); every norm or linear left out is named in a note.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..calibration import find_blocks

__all__ = ["Coupling", "find_couplings", "in_columns", "out_rows", "smooth_scales"]

_QKV = ("q_proj", "k_proj", "v_proj")
# (norm, consumers), relative to a block
NORM_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", tuple(f"self_attn.{p}" for p in _QKV)),  # LLaMA, Qwen2, Mistral
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn_layer_norm", tuple(f"self_attn.{p}" for p in _QKV)),  # OPT
    ("final_layer_norm", ("fc1",)),
    ("ln_1", ("attn.c_attn",)),  # GPT-2 (fused q/k/v)
    ("ln_2", ("mlp.c_fc",)),
    ("norm1", _QKV),  # llmslim.testing's AttentionBlock
    ("norm2", ("up_proj",)),
)
# (value projection, output projection, attention module), relative to a block
HEAD_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("self_attn.v_proj", "self_attn.o_proj", "self_attn"),
    ("self_attn.v_proj", "self_attn.out_proj", "self_attn"),
    ("attention.self.value", "attention.output.dense", "attention.self"),  # BERT
    ("v_proj", "o_proj", ""),
)
# (up, down, gate): down reads act(gate) * up
GATED_PATTERNS: tuple[tuple[str, str, str], ...] = (("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"),)


@dataclasses.dataclass(frozen=True)
class Coupling:
    """One place to smooth: ``source`` (qualified name) feeds exactly ``consumers``' input columns.

    ``repeat`` and ``head_dim`` map a consumer column to its source channel for ``heads``
    couplings with grouped key/value heads (``repeat`` query heads per value head).
    """

    kind: Literal["norm", "heads", "gated"]
    source: str
    consumers: tuple[str, ...]
    repeat: int = 1
    head_dim: int = 0

    def channel_of(self, columns: int) -> torch.Tensor:
        """The source channel of each of the consumers' ``columns`` input columns."""
        c = torch.arange(columns)
        if self.repeat == 1:
            return c
        return (c // self.head_dim // self.repeat) * self.head_dim + c % self.head_dim


def in_columns(module: nn.Module) -> tuple[torch.Tensor, int]:
    """The stored weight tensor to edit in place and its input dimension (a pruning mask's
    parametrization edits its ``original``: masked zeros stay zero under column scaling)."""
    weight = module.parametrizations.weight.original if _parametrized(module) else module.weight
    return weight, 0 if type(module).__name__ == "Conv1D" else 1


def out_rows(module: nn.Module) -> tuple[torch.Tensor, int]:
    """The stored weight tensor and its output dimension."""
    weight, dim = in_columns(module)
    return weight, 1 - dim


def _parametrized(module: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(module, "weight")


def _linear(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _width(module: nn.Module) -> int:
    weight, dim = in_columns(module)
    return weight.shape[dim]


def _outputs(module: nn.Module) -> int:
    weight, dim = out_rows(module)
    return weight.shape[dim]


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's factors ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (1 where a channel is
    all zero in either), clamped to ``[1e-5, 1e5]``.

    Example:
        >>> smooth_scales(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 2.0]), 0.5).tolist()
        [4.0, 0.5, 1.0]
    """
    x, w = x_absmax.float(), w_absmax.float()
    live = (x > 0) & (w > 0)
    s = torch.where(live, x.clamp(min=1e-30).pow(alpha) / w.clamp(min=1e-30).pow(1.0 - alpha), torch.ones_like(x))
    return s.clamp(1e-5, 1e5)


def find_couplings(model: nn.Module, scope: str = "all") -> tuple[list[Coupling], list[str]]:
    """The couplings of ``model`` (``scope`` ``"norms"``: norm couplings only) and notes naming
    what was left out, with why (one note per relative name, counting blocks)."""
    couplings: list[Coupling] = []
    skipped: dict[str, tuple[str, int]] = {}

    def skip(rel: str, why: str) -> None:
        skipped[rel] = (why, skipped.get(rel, (why, 0))[1] + 1)

    for bname, block in find_blocks(model):
        prefix = f"{bname}." if bname else ""
        mods = dict(block.named_modules())
        covered_norms: set[str] = set()
        covered_inputs: set[str] = set()
        for norm, consumers in NORM_PATTERNS:
            if norm not in mods or not all(_linear(mods.get(c)) for c in consumers):
                continue
            covered_norms.add(norm)
            weight = getattr(mods[norm], "weight", None)
            if getattr(block, "do_layer_norm_before", True) is False:  # OPT-350m's post-norm layout
                skip(norm, "post-norm block (its output also feeds the residual)")
            elif not isinstance(weight, torch.Tensor) or weight.dim() != 1 or any(_width(mods[c]) != weight.numel() for c in consumers):
                skip(norm, "no per-channel weight matching its consumers' width")
            else:
                couplings.append(Coupling("norm", prefix + norm, tuple(prefix + c for c in consumers)))
                covered_inputs.update(consumers)
        for rel, module in mods.items():
            if rel not in covered_norms and "norm" in type(module).__name__.lower() and rel:
                skip(rel, "its output is not read by linears alone in a known layout (post-norm blocks such as BERT's feed the residual too)")
        if scope == "all":
            for v, o, attn in HEAD_PATTERNS:
                if o in covered_inputs or not (_linear(mods.get(v)) and _linear(mods.get(o))):
                    continue
                covered_inputs.add(o)
                found = _heads(prefix, v, o, mods.get(attn), mods[v], mods[o])
                if isinstance(found, str):
                    skip(o, found)
                else:
                    couplings.append(found)
            for up, down, gate in GATED_PATTERNS:
                if down in covered_inputs or not all(_linear(mods.get(n)) for n in (up, down, gate)):
                    continue
                covered_inputs.add(down)
                if _outputs(mods[up]) != _width(mods[down]):
                    skip(down, f"{up} outputs {_outputs(mods[up])} channels, {down} reads {_width(mods[down])}")
                else:
                    couplings.append(Coupling("gated", prefix + up, (prefix + down,)))
        for rel, module in mods.items():
            if _linear(module) and rel not in covered_inputs:
                why = "scope='norms'" if scope != "all" and rel in {p[1] for p in HEAD_PATTERNS} | {p[1] for p in GATED_PATTERNS} else None
                skip(rel, why or "no foldable producer of its input in a known layout (e.g. a nonlinearity or a fused q/k/v before it)")
    notes = [f"not smoothed: {rel} ({n} block{'s' if n > 1 else ''}): {why}" for rel, (why, n) in skipped.items()]
    return couplings, notes


def _heads(prefix: str, v: str, o: str, attn: nn.Module | None, vm: nn.Module, om: nn.Module) -> Coupling | str:
    values, columns = _outputs(vm), _width(om)
    if columns % values:
        return f"{o} reads {columns} columns, not a multiple of {v}'s {values} outputs"
    repeat = columns // values
    if repeat == 1:
        return Coupling("heads", prefix + v, (prefix + o,))
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim < 1 or values % head_dim:
        return f"grouped value heads ({repeat} query heads each) without a head_dim attribute to map them"
    return Coupling("heads", prefix + v, (prefix + o,), repeat=repeat, head_dim=head_dim)
