"""Quantization: packed low-bit storage with real CPU kernels, and the passes that produce it.

* Pure functions on weights (:func:`quant_params`, :func:`quantize`, :func:`dequantize`,
  :func:`pack`, :func:`unpack`, :func:`search_params`): symmetric or asymmetric grids, per output
  channel or group-wise along the input (any group size, a shorter last group where it does not
  divide the row), 2/3/4/8 bits, exact round trips.
* :class:`QuantLinear` (packed weights; ``torch._weight_int8pack_mm`` and
  ``torch._weight_int4pack_mm_for_cpu`` for few tokens, dequantize-and-GEMM in bfloat16 for many)
  and :class:`QuantEmbedding` (int8 tables; a tied ``lm_head`` shares them).
* :class:`RTN`, registered as ``rtn``: round-to-nearest, data-free.

See docs/quantization.md.

Example:
    >>> import torch
    >>> import llmslim as ls
    >>> from llmslim.quant import RTN
    >>> model = torch.nn.Sequential(torch.nn.Linear(128, 64))
    >>> report = ls.compress_(model, RTN(bits=4, group_size=64), progress=False)
    >>> type(model[0]).__name__, model[0].kernel
    ('QuantLinear', 'int4pack_mm')
"""

from __future__ import annotations

from ._clip import CLIP_METHODS, search_params
from ._embedding import QuantEmbedding
from ._functional import BITS, code_range, dequantize, fake_quantize, num_groups, quant_params, quantize, relative_error
from ._kernels import DECODE_MAX_TOKENS, release_workspace
from ._linear import QuantLinear
from ._packing import pack, row_bytes, unpack
from ._rtn import RTN
from .gptq import GPTQ, gptq_quantize

__all__ = [
    "BITS",
    "CLIP_METHODS",
    "DECODE_MAX_TOKENS",
    "QuantEmbedding",
    "QuantLinear",
    "GPTQ",
    "RTN",
    "code_range",
    "dequantize",
    "fake_quantize",
    "gptq_quantize",
    "num_groups",
    "pack",
    "quant_params",
    "quantize",
    "relative_error",
    "release_workspace",
    "row_bytes",
    "search_params",
    "unpack",
]
