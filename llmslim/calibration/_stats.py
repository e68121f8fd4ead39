"""Statistics of the inputs a layer sees: ``X^T X``, per-channel sums of squares, absolute maxima.

Sums are kept raw (with the token count), accumulated in float32 for a few batches at a time and
summed in float64, so batches of any size weigh by their tokens, and distributed ranks can add
their sums.
Padding positions (attention mask 0) are left out.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError

__all__ = ["STAT_KINDS", "InputStats", "layer_input", "input_width"]

STAT_KINDS = frozenset({"xtx", "sqsum", "absmax"})
_PART_MAX_WIDTH = 2048  # a float32 [in, in] partial sum of at most 16 MiB
_FOLD_EVERY = 64  # batches summed in float32 before they join the float64 total


def input_width(module: nn.Module) -> int:
    """Width of the rows :func:`layer_input` produces for ``module``."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is [in, out]
        return module.weight.shape[0]
    raise CalibrationError(f"statistics of {type(module).__name__} inputs are not supported (Linear, Conv1D, Conv2d are)")


def layer_input(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input rows a weight multiplies: ``[tokens, in]``, padding positions removed."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise CalibrationError(f"statistics of grouped convolutions are not supported (groups={module.groups})")
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device).bool()]
    if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():  # tokens flattened (OPT's MLP)
        return x[mask.to(x.device).flatten().bool()]
    return x.reshape(-1, x.shape[-1])


class InputStats:
    """Running statistics of one layer's input rows.

    Attributes:
        n: Rows (tokens) seen.
        xtx: ``sum x x^T`` as float64 ``[in, in]`` (for GPTQ/SparseGPT Hessians), or ``None``.
        sqsum: ``sum x_j^2`` per input channel, float64 (for Wanda norms), or ``None``.
        absmax: ``max |x_j|`` per input channel, float32 (for SmoothQuant), or ``None``.

    Example:
        >>> s = InputStats(3, {"xtx", "sqsum"})
        >>> s.add(torch.ones(4, 3))
        >>> s.n, s.channel_norms().tolist(), s.hessian()[0, 0].item()
        (4, [2.0, 2.0, 2.0], 2.0)
    """

    def __init__(self, width: int, kinds: Iterable[str], device: torch.device | str = "cpu") -> None:
        kinds = frozenset(kinds)
        unknown = kinds - STAT_KINDS
        if unknown:
            raise CalibrationError(f"statistic kinds must be among {sorted(STAT_KINDS)} (got {sorted(unknown)})")
        self.n = 0
        self._xtx = torch.zeros(width, width, dtype=torch.float64, device=device) if "xtx" in kinds else None
        # Up to _FOLD_EVERY batches of X^T X are added in place into a float32 matrix (addmm_
        # runs ~2.5x faster than a fresh product at 512 tokens), then folded into the float64
        # sum. Only for widths whose float32 matrix is small; wider layers take slices instead.
        self._part = (torch.zeros(width, width, dtype=torch.float32, device=device)
                      if "xtx" in kinds and width <= _PART_MAX_WIDTH else None)
        self._parts = 0
        self._hessian: torch.Tensor | None = None  # set by hessian(), which drops the float64 sum
        self.sqsum = torch.zeros(width, dtype=torch.float64, device=device) if "sqsum" in kinds else None
        self.absmax = torch.zeros(width, dtype=torch.float32, device=device) if "absmax" in kinds else None

    def add(self, rows: torch.Tensor) -> None:
        """Add input rows ``[tokens, in]``."""
        if self._hessian is not None:
            raise CalibrationError("these statistics were finalized by hessian() (X^T X is dropped then): collect new ones")
        x = rows.detach().float()
        self.n += x.shape[0]
        if self._part is not None:
            self._part.addmm_(x.T, x)
            self._parts += 1
            if self._parts >= _FOLD_EVERY:
                self._fold()
        elif self._xtx is not None:
            # float32 products, float64 running sum; a slice of rows at a time, so the float32
            # temporary stays ~16 MiB instead of a second [in, in] matrix (127 MiB at 5632 wide)
            step = max(256, (1 << 22) // max(x.shape[1], 1))
            for i in range(0, x.shape[1], step):
                self._xtx[i:i + step].add_(x[:, i:i + step].T @ x)
        if self.sqsum is not None:
            self.sqsum.add_(x.square().sum(0))
        if self.absmax is not None and x.shape[0]:
            torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)

    def _fold(self) -> None:
        if self._part is not None and self._parts:
            self._xtx.add_(self._part)  # type: ignore[union-attr]
            self._part.zero_()
            self._parts = 0

    @property
    def xtx(self) -> torch.Tensor | None:
        """``sum x x^T`` over every row added, float64 ``[in, in]``, or ``None``.

        After :meth:`hessian` only the float32 Hessian is held: this is then rebuilt from it.
        """
        if self._hessian is not None:
            return self._hessian.double().mul_(max(self.n, 1) / 2.0)
        self._fold()
        return self._xtx

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics held, by kind."""
        return {k: v for k, v in (("xtx", self.xtx), ("sqsum", self.sqsum), ("absmax", self.absmax)) if v is not None}

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` as float32, the layer-wise least-squares Hessian GPTQ and SparseGPT use.

        Computed once: the float64 sum (and the float32 partial sum) are dropped then, because a
        solve holding both beside its own float64 working copies set the peak memory of
        calibrating a large model (254 MB each at 5632 inputs). Later calls, from the layers that
        share these inputs, return the same tensor: callers must not modify it in place.

        Raises:
            CalibrationError: The statistics hold no ``X^T X``.
        """
        if self._hessian is None:
            if self.xtx is None:
                raise CalibrationError("this layer's statistics hold no X^T X; ask for 'xtx'")
            # scaled in place in float64 (the sum is dropped next), then one float32 copy: no float64
            # temporary, and sums beyond float32's range still scale back into it
            self._hessian = self.xtx.mul_(2.0 / max(self.n, 1)).float()
            self._xtx = self._part = None
        return self._hessian

    def channel_norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel over every token seen, float32 (Wanda's activation norm)."""
        if self.sqsum is None:
            raise CalibrationError("this layer's statistics hold no sums of squares; ask for 'sqsum'")
        return self.sqsum.sqrt().float()
