"""Pruning: masks as parametrizations, patterns, scores, schedules for training loops, sparse storage.

* What to cut is a score: :class:`PruneBase` leaves one method, ``score(name, module, ctx)``;
  :class:`Magnitude` (registered as ``"magnitude"``) scores ``|w|``.
* From calibration data (:class:`CalibratedPrune`, run by the calibration engine):
  :class:`Wanda` (``"wanda"``) scores ``|w| * ||x||``, optionally with OWL's non-uniform
  sparsity (:func:`owl_sparsities`); :class:`SparseGPT` (``"sparsegpt"``) prunes with Hessian
  error compensation (:func:`obs_prune`).
* How to cut is shared: :func:`unstructured_mask`, :func:`row_mask`, :func:`nm_mask`,
  :func:`global_counts` turn scores into keep-masks; :class:`Mask` applies one as a
  ``torch.nn.utils.parametrize`` parametrization; :func:`bake_` makes it permanent.
* When to cut: :class:`Schedule` and the :func:`constant`, :func:`linear`, :func:`cubic`
  functions of the training step.
* How to store: :class:`SparseLinear` keeps a bitmask or N:M indices plus the non-zero values.
* Structured (:mod:`llmslim.prune.structured`): :class:`Channels` (``"channels"``),
  :class:`Heads` (``"heads"``) and :class:`Layers` (``"layers"``) physically remove MLP
  channels, attention heads and blocks of LLaMA-family, OPT, GPT-2 and BERT models, and
  ``channels`` the coupled channels a ``torch.fx`` tracer finds in other models; docs/structured.md.

See docs/pruning.md.
"""

from __future__ import annotations

from ._base import PruneBase
from ._calibrated import CalibratedPrune
from ._mask import Mask, bake_, from_rows, get_mask, is_transposed, masked_modules, rows_view, set_mask_, zero_pruned_
from ._obs import ObsResult, QuantGrid, inverse_hessian_factor, obs_prune, relative_output_error
from ._owl import owl_sparsities
from ._patterns import global_counts, lowest_mask, nm_mask, parse_pattern, prune_count, row_mask, unstructured_mask
from ._refit import refit_kept
from ._schedule import SCHEDULES, Schedule, constant, cubic, linear
from ._storage import SparseLinear, pack_bits, pack_ints, storage_bytes, unpack_bits, unpack_ints
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .structured import Channels, Heads, Layers, register_importance
from .wanda import Wanda, wanda_scores

__all__ = [
    "SCHEDULES",
    "CalibratedPrune",
    "Channels",
    "Heads",
    "Layers",
    "Magnitude",
    "Mask",
    "ObsResult",
    "QuantGrid",
    "PruneBase",
    "Schedule",
    "SparseGPT",
    "SparseLinear",
    "Wanda",
    "bake_",
    "constant",
    "cubic",
    "from_rows",
    "get_mask",
    "global_counts",
    "inverse_hessian_factor",
    "is_transposed",
    "linear",
    "lowest_mask",
    "masked_modules",
    "nm_mask",
    "obs_prune",
    "owl_sparsities",
    "pack_bits",
    "pack_ints",
    "parse_pattern",
    "prune_count",
    "refit_kept",
    "register_importance",
    "relative_output_error",
    "row_mask",
    "rows_view",
    "set_mask_",
    "storage_bytes",
    "unpack_bits",
    "unpack_ints",
    "unstructured_mask",
    "wanda_scores",
    "zero_pruned_",
]
