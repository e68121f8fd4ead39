"""Structured pruning: physically remove channels, attention heads and whole blocks.

Three separate pieces (see docs/structured.md):

* what is coupled: :class:`Group` of weight :class:`Slice` objects, built by exact rules for
  Hugging Face blocks (:class:`Layout`: LLaMA/Qwen2/Mistral, OPT, GPT-2, BERT, or one you
  register; :func:`decoder`, :func:`channel_groups`, :func:`head_groups`, :func:`kv_groups`,
  :func:`block_groups`), or by the generic ``torch.fx`` tracer for other models (:func:`trace`);
* what to cut: importance hooks scoring groups (:func:`register_importance`; built-ins ``l1``,
  ``l2``, ``activation``, ``taylor``, ``influence``, ``last``);
* how to cut: :func:`remove_` rebuilds each layer smaller through its registered
  :class:`Sliceable` (module swap), with the Hugging Face config, the attention modules' head
  counts and the blocks' ``layer_idx`` kept in step.

The passes :class:`Channels` (``"channels"``), :class:`Heads` (``"heads"``) and :class:`Layers`
(``"layers"``) put them together.
"""

from ._base import StructuredBase
from ._cut import remove_, removed_of
from ._groups import Decoder, Group, Slice, block_groups, channel_groups, decoder, head_groups, kv_groups
from ._importance import Importance, available_importances, register_importance
from ._layouts import Layout, layouts, register_layout
from ._passes import Channels, Heads, Layers, keep_count
from ._slicing import Sliceable, register_sliceable, slice_linear, sliceable
from ._taylor import calibration_loss
from ._trace import Space, Traced, trace

__all__ = [
    "Channels",
    "Decoder",
    "Group",
    "Heads",
    "Importance",
    "Layers",
    "Layout",
    "Slice",
    "Sliceable",
    "Space",
    "StructuredBase",
    "Traced",
    "available_importances",
    "block_groups",
    "calibration_loss",
    "channel_groups",
    "decoder",
    "head_groups",
    "keep_count",
    "kv_groups",
    "layouts",
    "register_importance",
    "register_layout",
    "register_sliceable",
    "remove_",
    "removed_of",
    "slice_linear",
    "sliceable",
    "trace",
]
