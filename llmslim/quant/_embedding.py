"""``QuantEmbedding``: an embedding table stored as int8, one symmetric scale per row.

A row of the table is one token's vector, so a per-row scale is also a per-output-channel scale
of a tied ``lm_head`` (whose weight is the same table): :meth:`QuantLinear.tied` serves the head
from the embedding's tensors, and the CPU int8 kernel runs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._ckpt_kinds import dtype_from_name, dtype_name
from ..errors import ConfigError
from ._functional import dequantize, quant_params, quantize
from ._packing import pack

__all__ = ["QuantEmbedding"]


class QuantEmbedding(nn.Module):
    """A lookup table ``(num_embeddings, embedding_dim)`` held as int8 codes and per-row scales.

    Args:
        num_embeddings / embedding_dim: Table shape.
        padding_idx: As ``nn.Embedding`` (kept for reference; the table is not trained).
        scale_dtype: Dtype of the scales.
        weight_dtype: Dtype of the vectors it returns (the original table's).
        device: Where the tensors live.

    Example:
        >>> import torch
        >>> emb = torch.nn.Embedding(100, 16)
        >>> q = QuantEmbedding.from_float(emb)
        >>> q(torch.tensor([[1, 2]])).shape, q.weight_bits
        (torch.Size([1, 2, 16]), 8)
    """

    weight_bits = 8

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None = None,
        scale_dtype: torch.dtype = torch.bfloat16,
        weight_dtype: torch.dtype = torch.float32,
        device: Any = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"QuantEmbedding: {name} must be a positive integer (got {value!r})")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_dtype = weight_dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, dtype=scale_dtype, device=device))

    @classmethod
    def from_float(cls, embedding: nn.Module, *, scale_dtype: torch.dtype = torch.bfloat16) -> QuantEmbedding:
        """Quantize an ``nn.Embedding`` (round to nearest, int8, symmetric per row).

        Raises:
            ConfigError: Not an ``nn.Embedding``, or one with ``max_norm`` (which renormalises
                its table in place on every lookup).
        """
        if not isinstance(embedding, nn.Embedding):
            raise ConfigError(f"module must be an nn.Embedding (got {type(embedding).__name__})")
        if embedding.max_norm is not None:
            raise ConfigError("an nn.Embedding with max_norm edits its table on every lookup; it cannot be quantized (got max_norm set)")
        w = embedding.weight.detach()
        new = cls(*w.shape, padding_idx=embedding.padding_idx, scale_dtype=scale_dtype, weight_dtype=w.dtype, device=w.device)
        scale, _ = quant_params(w, bits=8, group_size=None, symmetric=True, scale_dtype=scale_dtype)
        with torch.no_grad():
            new.qweight.copy_(pack(quantize(w, scale, None, bits=8), 8))
            new.scales.copy_(scale)
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight.view(torch.int8))
        return rows.to(torch.float32).mul_(F.embedding(ids, self.scales).float()).to(self.weight_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The table the codes stand for, in ``dtype`` (default: the original table's)."""
        return dequantize(self.qweight.view(torch.int8), self.scales, None, dtype=dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table, for code that reads ``.weight``."""
        return self.dequantize()

    @property
    def logical_params(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def weight_sparsity(self) -> float:
        return float((self.qweight == 0).sum()) / self.qweight.numel()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantEmbedding:
        # the scale dtype is a storage choice: move the tensors, never cast them
        probe = fn(torch.empty(0, device=self.qweight.device, dtype=self.weight_dtype))
        self.weight_dtype = probe.dtype
        for name in ("qweight", "scales"):
            self._buffers[name] = self._buffers[name].to(probe.device)
        return self

    def checkpoint_config(self) -> dict[str, Any]:
        """What :meth:`from_checkpoint_config` rebuilds this table from (see :mod:`llmslim.io`)."""
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx,
                "scale_dtype": dtype_name(self.scales.dtype), "weight_dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_checkpoint_config(cls, cfg: dict[str, Any], *, tied: nn.Module | None = None) -> QuantEmbedding:
        """An empty table (``meta`` tensors) of :meth:`checkpoint_config`'s shape."""
        return cls(cfg["num_embeddings"], cfg["embedding_dim"], padding_idx=cfg["padding_idx"], scale_dtype=dtype_from_name(cfg["scale_dtype"]),
                   weight_dtype=dtype_from_name(cfg["weight_dtype"]), device="meta")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, scales={str(self.scales.dtype).replace('torch.', '')}"
