"""Distillation: losses, a ``Distiller`` for your own training loop, and the ``distill`` recovery pass.

* Losses, plain ``nn.Module``s usable alone: :class:`LogitKL` (``T^2 * KL(teacher || student)``,
  optionally over the teacher's top-k tokens or vocabulary chunks), :class:`HiddenLoss` (MSE or
  cosine between hidden states, with a learned projection where widths differ) and
  :class:`AttentionLoss` (attention-map transfer). Padding positions never count.
* :class:`Distiller`: ``loss, parts = distiller(batch)`` inside any PyTorch loop; the teacher runs
  in eval mode under ``no_grad``, on its own device and precision; hidden states are captured by
  forward hooks.
* :class:`Distill` (registered as ``"distill"``): recovery training after compression, towards
  ``ctx.teacher`` or, by default, the model as it was before the manager's first pass. Pruning
  masks and ``qat`` fake quantization stay active and are trained through.

See docs/distillation.md.
"""

from __future__ import annotations

from ._capture import width_of
from ._distiller import WEIGHTS, Distiller
from ._kl import LogitKL, kl_rows
from ._losses import AttentionLoss, HiddenLoss
from ._pass import Distill

__all__ = ["AttentionLoss", "Distill", "Distiller", "HiddenLoss", "LogitKL", "WEIGHTS", "kl_rows", "width_of"]
