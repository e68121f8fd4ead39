"""Quantization: packed low-bit storage with real CPU kernels, and the passes that produce it.

* Pure functions on weights (:func:`quant_params`, :func:`quantize`, :func:`dequantize`,
  :func:`pack`, :func:`unpack`, :func:`search_params`): symmetric or asymmetric grids, per output
  channel or group-wise along the input (any group size, a shorter last group where it does not
  divide the row), 2/3/4/8 bits, exact round trips.
* :class:`QuantLinear` (packed weights; ``torch._weight_int8pack_mm`` and
  ``torch._weight_int4pack_mm_for_cpu`` for few tokens, dequantize-and-GEMM in bfloat16 for many)
  and :class:`QuantEmbedding` (int8 tables; a tied ``lm_head`` shares them).
* :class:`SparseQuantLinear`: a pruned and quantized layer storing only its non-zero codes plus
  a bitmask or N:M indices (``storage="sparse"`` of :class:`RTN` and :class:`GPTQ`).
* :class:`RTN`, registered as ``rtn``: round-to-nearest, data-free.
* :class:`Int8DynamicLinear` (int8 weights times per-token int8 activations, an int8 GEMM) and
  the passes :class:`W8A8` (``w8a8``) and :class:`SmoothQuant` (``smoothquant``, calibrated
  outlier migration that keeps the float function) that prepare and produce it.
* :class:`FP8`, registered as ``fp8``: float8 e4m3 weights (:class:`FP8Linear`), a scale per channel.
* :class:`QAT`, registered as ``qat``: quantization-aware training (:class:`FakeQuant`), packed by ``finalize``.
* :func:`export_gptq` / :func:`import_gptq` (and :func:`to_gptq_tensors` / :func:`from_gptq_tensors`
  per layer): the GPTQ checkpoint layout of the wider ecosystem (``qweight``/``qzeros``/``scales``/``g_idx``).

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
from ._sparse import SparseQuantLinear
from .gptq import GPTQ, gptq_quantize
from ._w8a8 import Int8DynamicLinear
from .smoothquant import SmoothQuant
from .w8a8 import W8A8
from ._fakequant import FakeQuant
from ._fp8 import FP8Linear, fp8_dequantize, fp8_quantize
from .fp8 import FP8
from .qat import QAT
from ._gptq_format import from_gptq_tensors, to_gptq_tensors
from ._gptq_folder import export_gptq, import_gptq

__all__ = [
    "BITS",
    "CLIP_METHODS",
    "DECODE_MAX_TOKENS",
    "FakeQuant",
    "FP8",
    "FP8Linear",
    "Int8DynamicLinear",
    "QuantEmbedding",
    "QuantLinear",
    "GPTQ",
    "QAT",
    "RTN",
    "SparseQuantLinear",
    "SmoothQuant",
    "W8A8",
    "code_range",
    "dequantize",
    "export_gptq",
    "fake_quantize",
    "fp8_dequantize",
    "fp8_quantize",
    "from_gptq_tensors",
    "gptq_quantize",
    "import_gptq",
    "num_groups",
    "pack",
    "quant_params",
    "quantize",
    "relative_error",
    "release_workspace",
    "row_bytes",
    "search_params",
    "to_gptq_tensors",
    "unpack",
]
