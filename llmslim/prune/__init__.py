"""Pruning: masks as parametrizations, patterns, scores, schedules for training loops, sparse storage.

* What to cut is a score: :class:`PruneBase` leaves one method, ``score(name, module, ctx)``;
  :class:`Magnitude` (registered as ``"magnitude"``) scores ``|w|``.
* How to cut is shared: :func:`unstructured_mask`, :func:`row_mask`, :func:`nm_mask`,
  :func:`global_counts` turn scores into keep-masks; :class:`Mask` applies one as a
  ``torch.nn.utils.parametrize`` parametrization; :func:`bake_` makes it permanent.
* When to cut: :class:`Schedule` and the :func:`constant`, :func:`linear`, :func:`cubic`
  functions of the training step.
* How to store: :class:`SparseLinear` keeps a bitmask or N:M indices plus the non-zero values.

See docs/pruning.md.
"""

from __future__ import annotations

from ._base import PruneBase
from ._mask import Mask, bake_, from_rows, get_mask, is_transposed, masked_modules, rows_view, set_mask_, zero_pruned_
from ._patterns import global_counts, lowest_mask, nm_mask, parse_pattern, prune_count, row_mask, unstructured_mask
from ._schedule import SCHEDULES, Schedule, constant, cubic, linear
from ._storage import SparseLinear, pack_bits, pack_ints, storage_bytes, unpack_bits, unpack_ints
from .magnitude import Magnitude

__all__ = [
    "SCHEDULES",
    "Magnitude",
    "Mask",
    "PruneBase",
    "Schedule",
    "SparseLinear",
    "bake_",
    "constant",
    "cubic",
    "from_rows",
    "get_mask",
    "global_counts",
    "is_transposed",
    "linear",
    "lowest_mask",
    "masked_modules",
    "nm_mask",
    "pack_bits",
    "pack_ints",
    "parse_pattern",
    "prune_count",
    "row_mask",
    "rows_view",
    "set_mask_",
    "storage_bytes",
    "unpack_bits",
    "unpack_ints",
    "unstructured_mask",
    "zero_pruned_",
]
