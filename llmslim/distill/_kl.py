"""Logit distillation: ``KL(teacher || student)`` of temperature-softened distributions.

Three ways to compute it, all the same quantity where they overlap:

* full: ``log_softmax`` of both, the textbook form;
* vocabulary chunks (``chunk_size``): a custom autograd function that never holds a
  ``[positions, vocabulary]`` temporary besides the student's gradient; it uses
  ``KL = sum_v p_v (t_v - s_v) / T + logsumexp(s / T) - logsumexp(t / T)``, with
  ``p = softmax(t / T)``, and the gradient ``(softmax(s / T) - p) / T``, both built chunk by chunk;
* top-k (``top_k``): the teacher's ``k`` most likely tokens plus one bucket for the rest, the
  student's probabilities gathered at the same tokens. Zero for identical logits, and equal to
  the full KL when ``k`` covers the vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["LogitKL", "kl_rows", "masked_mean"]


def _check_positive_int(owner: str, field: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{owner}: {field} must be None or an integer >= 1 (got {value!r})")


def check_temperature(owner: str, value: Any) -> float:
    """``value`` as a float, or :class:`ConfigError` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: temperature must be a finite number > 0 (got {value!r})")
    return float(value)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (one per position) over the positions where ``mask`` is true.

    No position left gives zero (still connected to the graph).

    Example:
        >>> masked_mean(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False]))
        tensor(1.5000)
    """
    if mask is None:
        return values.mean()
    mask = mask.reshape(values.shape).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class _ChunkedKL(torch.autograd.Function):
    """Per-row ``KL(softmax(t/T) || softmax(s/T))`` built over vocabulary chunks."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        spans = [(a, min(a + chunk, s.shape[-1])) for a in range(0, s.shape[-1], chunk)]
        ls = torch.logsumexp(torch.stack([torch.logsumexp(s[:, a:b].float() / temperature, -1) for a, b in spans]), 0)
        lt = torch.logsumexp(torch.stack([torch.logsumexp(t[:, a:b].float() / temperature, -1) for a, b in spans]), 0)
        cross = torch.zeros_like(ls)
        for a, b in spans:
            tc = t[:, a:b].float()
            p = torch.exp(tc / temperature - lt[:, None])
            cross += (p * (tc - s[:, a:b].float())).sum(-1)
        ctx.save_for_backward(s, t, ls, lt)
        ctx.temperature, ctx.spans = temperature, spans
        return cross / temperature + ls - lt

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        s, t, ls, lt = ctx.saved_tensors
        temperature = ctx.temperature
        out = torch.empty_like(s)
        scale = (grad / temperature)[:, None]
        for a, b in ctx.spans:
            q = torch.exp(s[:, a:b].float() / temperature - ls[:, None])
            p = torch.exp(t[:, a:b].float() / temperature - lt[:, None])
            out[:, a:b] = ((q - p) * scale).to(out.dtype)
        return out, None, None, None


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); each branch sees only
    # inputs it is finite at, so the branch torch.where drops cannot send NaN into the gradient
    x = x.clamp(max=-1e-12)
    near = x > -math.log(2.0)
    half = torch.full_like(x, -math.log(2.0))
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, half))), torch.log1p(-torch.exp(torch.where(near, half, x))))


def _topk_kl(s: torch.Tensor, t: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    idx = t.topk(min(k, t.shape[-1]), dim=-1).indices
    lp = t.gather(-1, idx).float() / temperature - torch.logsumexp(t.float() / temperature, -1, keepdim=True)
    lq = s.gather(-1, idx).float() / temperature - torch.logsumexp(s.float() / temperature, -1, keepdim=True)
    p = lp.exp()
    head = (p * (lp - lq)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    lp_rest, lq_rest = _log1mexp(torch.logsumexp(lp, -1)), _log1mexp(torch.logsumexp(lq, -1))
    return head + torch.where(p_rest > 0, p_rest * (lp_rest - lq_rest), torch.zeros_like(p_rest))


def kl_rows(
    s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, *, top_k: int | None = None, chunk_size: int | None = None
) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` for each row of ``[rows, vocabulary]`` logits (no ``T^2``).

    Example:
        >>> s = torch.tensor([[0.0, 0.0]]); t = torch.tensor([[0.0, math.log(3.0)]])
        >>> round(kl_rows(s, t).item(), 6) == round(0.25 * math.log(0.5) + 0.75 * math.log(1.5), 6)
        True
    """
    t = t.detach()
    if top_k is not None:
        return _topk_kl(s, t, temperature, top_k)
    if chunk_size is not None:
        return _ChunkedKL.apply(s, t, temperature, chunk_size)
    lt = torch.log_softmax(t.float() / temperature, -1)
    ls = torch.log_softmax(s.float() / temperature, -1)
    return (lt.exp() * (lt - ls)).sum(-1)


class LogitKL(nn.Module):
    """``T^2 * KL(teacher || student)`` of the next-token distributions softened by temperature ``T``.

    The last dimension of both logits is the vocabulary; every other dimension indexes positions,
    and the loss is the mean over the positions ``mask`` keeps (padding excluded). The ``T^2``
    factor keeps gradient sizes comparable across temperatures (Hinton et al., 2015). The teacher's
    logits are treated as constants.

    Args:
        temperature: ``T`` > 0.
        top_k: Compare only the teacher's ``k`` most likely tokens and one bucket for the rest.
        chunk_size: Work through the vocabulary this many logits at a time, to bound memory.

    Raises:
        ConfigError: A temperature <= 0, a bad ``top_k``/``chunk_size``, or both given.

    Example:
        >>> kl = LogitKL(temperature=2.0)
        >>> s = torch.randn(2, 5, 11, requires_grad=True)
        >>> kl(s, s.detach()).abs().item() < 1e-6
        True
        >>> mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        >>> kl(s, torch.randn(2, 5, 11), mask).backward()
        >>> bool(s.grad[0, 3:].abs().sum() == 0)  # padding gets no gradient
        True
    """

    def __init__(self, temperature: float = 1.0, *, top_k: int | None = None, chunk_size: int | None = None) -> None:
        super().__init__()
        self.temperature = check_temperature("LogitKL", temperature)
        _check_positive_int("LogitKL", "top_k", top_k)
        _check_positive_int("LogitKL", "chunk_size", chunk_size)
        if top_k is not None and chunk_size is not None:
            raise ConfigError(f"LogitKL: give top_k or chunk_size, not both (got top_k={top_k}, chunk_size={chunk_size})")
        self.top_k, self.chunk_size = top_k, chunk_size

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss: a scalar.

        Args:
            student: Student logits ``[..., vocabulary]``.
            teacher: Teacher logits of the same shape (any device or dtype; moved to the student's).
            mask: Positions to count (``[...]``, true or 1 = count), e.g. the attention mask.
        """
        if student.shape != teacher.shape:
            raise ConfigError(f"LogitKL: student and teacher logits must have one shape (got {tuple(student.shape)} and {tuple(teacher.shape)})")
        vocab = student.shape[-1]
        s = student.reshape(-1, vocab)
        t = teacher.detach().to(student.device).reshape(-1, vocab)
        if mask is not None:
            if mask.numel() != s.shape[0]:
                raise ConfigError(f"LogitKL: mask must have one entry per position ({s.shape[0]}) (got shape {tuple(mask.shape)})")
            keep = mask.reshape(-1).to(student.device).bool()
            if not bool(keep.all()):
                s, t = s[keep], t[keep]  # padding never enters the softmaxes
        if s.shape[0] == 0:
            return student.sum() * 0.0
        rows = kl_rows(s, t, self.temperature, top_k=self.top_k, chunk_size=self.chunk_size)
        return rows.mean() * self.temperature**2

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, top_k={self.top_k}, chunk_size={self.chunk_size}"
