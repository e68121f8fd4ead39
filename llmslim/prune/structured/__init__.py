"""Structured pruning: physically remove MLP channels, attention heads and whole blocks.

Three separate pieces (see docs/structured.md):

* what is coupled: :class:`Group` of weight :class:`Slice` objects, built by exact rules for
  LLaMA-family decoders (:func:`decoder`, :func:`channel_groups`, :func:`head_groups`,
  :func:`kv_groups`, :func:`block_groups`);
* what to cut: importance hooks scoring groups (:func:`register_importance`; built-ins ``l1``,
  ``l2``, ``activation``, ``influence``, ``last``);
* how to cut: :func:`slice_linear` and module swaps, with the Hugging Face config, the
  attention modules' head counts and the blocks' ``layer_idx`` kept in step.

The passes :class:`Channels` (``"channels"``), :class:`Heads` (``"heads"``) and :class:`Layers`
(``"layers"``) put them together.
"""

from ._base import StructuredBase
from ._cut import slice_linear
from ._groups import Decoder, Group, Slice, block_groups, channel_groups, decoder, head_groups, kv_groups
from ._importance import Importance, available_importances, register_importance
from ._passes import Channels, Heads, Layers, keep_count

__all__ = [
    "Channels",
    "Decoder",
    "Group",
    "Heads",
    "Importance",
    "Layers",
    "Slice",
    "StructuredBase",
    "available_importances",
    "block_groups",
    "channel_groups",
    "decoder",
    "head_groups",
    "keep_count",
    "kv_groups",
    "register_importance",
    "slice_linear",
]
