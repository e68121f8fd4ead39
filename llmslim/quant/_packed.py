"""What every packed linear layer shares: the read-only ``weight`` view, its parameter count and
the names of its kernel paths (what ``module_stats`` and the Reports read)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear"]


class PackedLinear(nn.Module):
    """Base of the packed linear layers (:class:`QuantLinear`, ``FP8Linear``, ``Int8DynamicLinear``).

    A subclass sets ``in_features``, ``out_features`` and ``bias`` and defines
    ``dequantize(dtype=None)`` and ``kernel_for(tokens, device=None)``.
    """

    in_features: int
    out_features: int
    # tokens of a "many-token" forward, for ``prefill_kernel``
    PREFILL_TOKENS = 1 << 30

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def kernel_for(self, tokens: int, device: torch.device | None = None) -> str:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` (e.g. ``nn.MultiheadAttention``)."""
        return self.dequantize()

    @property
    def logical_params(self) -> int:
        """Weights this layer represents plus bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def kernel(self) -> str:
        """The path of a one-token forward (decoding)."""
        return self.kernel_for(1)

    @property
    def prefill_kernel(self) -> str:
        """The path of a many-token forward (prefill, batches)."""
        return self.kernel_for(self.PREFILL_TOKENS)
