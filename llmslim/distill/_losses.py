"""Feature distillation: hidden-state losses (with a learned projection when widths differ) and
attention-map transfer."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ._kl import masked_mean

__all__ = ["HiddenLoss", "AttentionLoss", "HIDDEN_KINDS"]

HIDDEN_KINDS = ("mse", "cosine")


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    # positions along every dimension but the last; the mask applies when it has one entry per position
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0] and tuple(mask.shape) == tuple(x.shape[: mask.dim()]):
        return rows, mask.reshape(-1).to(x.device).bool()
    return rows, None


class HiddenLoss(nn.Module):
    """Distance between a student's and a teacher's hidden states, per position, averaged.

    The last dimension holds the features. When the widths differ (a student pruned to a narrower
    width, a smaller student architecture) a learned ``Linear(student_width, teacher_width)`` maps
    the student's states first; it is a parameter of this module, so train it with the student.

    Args:
        kind: ``"mse"`` (mean squared error per feature) or ``"cosine"`` (``1 - cos``).
        student_width: Features of the student's states (``None``: same as the teacher's).
        teacher_width: Features of the teacher's states.
        project: Allow the learned projection; without it, differing widths are an error.
        name: Label for error messages (e.g. the layer pair).

    Raises:
        ConfigError: An unknown kind, or differing widths with ``project=False``.

    Example:
        >>> loss = HiddenLoss("cosine", student_width=8, teacher_width=16)
        >>> s, t = torch.randn(2, 3, 8), torch.randn(2, 3, 16)
        >>> loss(s, t).shape, sum(p.numel() for p in loss.parameters())
        (torch.Size([]), 128)
        >>> HiddenLoss("mse")(t, t).item()
        0.0
    """

    def __init__(
        self,
        kind: Literal["mse", "cosine"] = "mse",
        *,
        student_width: int | None = None,
        teacher_width: int | None = None,
        project: bool = True,
        name: str = "HiddenLoss",
    ) -> None:
        super().__init__()
        if kind not in HIDDEN_KINDS:
            raise ConfigError(f"{name}: kind must be one of {', '.join(map(repr, HIDDEN_KINDS))} (got {kind!r})")
        self.kind, self.name = kind, name
        self.proj: nn.Linear | None = None
        if student_width is not None and teacher_width is not None and student_width != teacher_width:
            if not project:
                raise ConfigError(
                    f"{name}: student width {student_width} differs from teacher width {teacher_width} and projections "
                    f"are off (got project=False); allow a learned projection with project=True"
                )
            self.proj = nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss: a scalar, averaged over the positions ``mask`` keeps."""
        if self.proj is not None:
            student = self.proj(student.to(self.proj.weight.dtype))
        teacher = teacher.detach().to(student.device)
        if student.shape != teacher.shape:
            hint = ""
            if self.proj is None and student.shape[:-1] == teacher.shape[:-1]:
                hint = ("; widths are read from weights, so no projection was made: choose modules with weights (a Linear, "
                        "a norm, a decoder layer) rather than ones without weights (an activation)")
            raise ConfigError(
                f"{self.name}: student states {tuple(student.shape)} and teacher states {tuple(teacher.shape)} must have one "
                f"shape (after the projection, if any){hint}"
            )
        s, keep = _rows(student.float(), mask)
        t = teacher.float().reshape(s.shape)
        if self.kind == "mse":
            per = (s - t).square().mean(-1)
        else:
            per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        return masked_mean(per, keep)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, projection={self.proj is not None}"


class AttentionLoss(nn.Module):
    """``KL(teacher || student)`` between attention maps ``[batch, heads, queries, keys]``.

    Each query's row is a distribution over keys; the loss is the mean over heads and over the
    query positions ``mask`` keeps. When the head counts differ (heads pruned) both maps are
    averaged over heads first.

    Example:
        >>> a = torch.softmax(torch.randn(1, 2, 4, 4), -1)
        >>> AttentionLoss()(a, a).abs().item() < 1e-6
        True
        >>> same_mean = a.mean(1, keepdim=True).expand(1, 3, 4, 4)  # 3 heads, the same mean map
        >>> AttentionLoss()(a, same_mean).abs().item() < 1e-6
        True
    """

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss: a scalar."""
        teacher = teacher.detach().to(student.device).float()
        student = student.float()
        if student.dim() != 4 or teacher.dim() != 4:
            raise ConfigError(f"AttentionLoss: attention maps must be [batch, heads, queries, keys] (got {tuple(student.shape)} and {tuple(teacher.shape)})")
        if student.shape[1] != teacher.shape[1]:
            student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
        if student.shape != teacher.shape:
            raise ConfigError(f"AttentionLoss: attention maps must have one shape (got {tuple(student.shape)} and {tuple(teacher.shape)})")
        per = (torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(1e-12))).sum(-1)  # [b, h, q]
        per = per.mean(1)
        keep = mask.reshape(per.shape).to(per.device).bool() if mask is not None and mask.numel() == per.numel() else None
        return masked_mean(per, keep)
