"""``Distiller``: student, teacher and losses for a user's own training loop."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._context import default_forward
from ..errors import ConfigError
from ._capture import capture, logits_of, pairs, place, placement, position_mask, resolve, width_of
from ._kl import LogitKL
from ._losses import HIDDEN_KINDS, AttentionLoss, HiddenLoss

__all__ = ["Distiller", "WEIGHTS"]

#: Loss parts and their default weights.
WEIGHTS: dict[str, float] = {"kl": 1.0, "ce": 0.0, "hidden": 1.0, "attention": 1.0}


def _attention_pairs(layers: Sequence[Any], owner: str) -> list[tuple[int, int]]:
    out = []
    for item in layers:
        pair = (item, item) if isinstance(item, int) else tuple(item) if isinstance(item, (tuple, list)) else ()
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ConfigError(f"{owner}: attention layers must be layer indices or (student, teacher) index pairs (got {item!r})")
        out.append((pair[0], pair[1]))
    return out


class Distiller(nn.Module):
    """Student, teacher and the distillation losses: ``loss, parts = distiller(batch)``.

    Each call runs the student (with gradients) and the teacher (in eval mode, under
    ``torch.no_grad``, on its own device and in its own precision: the batch is moved and cast
    for it), and returns the weighted sum of the loss parts and the parts themselves, detached:

    * ``"kl"``: :class:`LogitKL` between the logits (``.logits``, or the output tensor);
    * ``"ce"``: cross-entropy to the labels (a Hugging Face batch's ``labels``, scored by the
      model's own loss, or ``labels=``: plain cross-entropy over the last dimension, -100 ignored);
    * ``"hidden"``: :class:`HiddenLoss` between the outputs of chosen modules, captured by forward
      hooks (the models need not return hidden states), averaged over the pairs;
    * ``"attention"``: :class:`AttentionLoss` between the attention maps of chosen layers (models
      that return ``attentions``; Hugging Face models need ``attn_implementation="eager"``).

    Padding (a batch's ``attention_mask`` 0) counts in no part. The projections of
    hidden-state pairs whose widths differ are this module's parameters: train them with the
    student, e.g. ``torch.optim.AdamW(distiller.trainable_parameters())``. The student and the
    teacher are not submodules (``distiller.parameters()`` holds the projections only).

    Args:
        student: The model being trained.
        teacher: The reference model; never changed, no gradients reach it. ``None`` only when
            the cross-entropy part is the only one on (plain fine-tuning).
        temperature: Softening of the logit KL (> 0).
        top_k / chunk_size: Bound the logit KL's memory (see :class:`LogitKL`).
        hidden_layers: Module names present in both models, ``"student=teacher"`` strings or
            ``(student, teacher)`` pairs.
        hidden_loss: ``"mse"`` or ``"cosine"``.
        project: Learn a projection where a hidden pair's widths differ (else that is an error).
        attention_layers: Layer indices, or ``(student, teacher)`` index pairs, of ``attentions``.
        weights: Weights of the parts, defaults ``{"kl": 1, "ce": 0, "hidden": 1, "attention": 1}``.
        forward: ``forward(model, batch)``; default :func:`~llmslim.default_forward`.
        name: Label in error messages.

    Raises:
        ConfigError: A bad setting, a hidden layer that is not a module, differing widths without
            projections, or a teacher that is the student.

    Example:
        >>> import torch
        >>> from llmslim import models
        >>> teacher = models.tiny("llama")
        >>> student = models.tiny("llama", seed=1)
        >>> d = Distiller(student, teacher, temperature=2.0, hidden_layers=["model.layers.1"])
        >>> batch = {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        >>> loss, parts = d(batch)
        >>> loss.backward()
        >>> sorted(parts), all(p.grad is None for p in teacher.parameters())
        (['hidden', 'kl'], True)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        chunk_size: int | None = None,
        hidden_layers: Sequence[Any] = (),
        hidden_loss: str = "mse",
        project: bool = True,
        attention_layers: Sequence[Any] = (),
        weights: Mapping[str, float] | None = None,
        forward: Callable[[nn.Module, Any], Any] = default_forward,
        name: str = "Distiller",
    ) -> None:
        super().__init__()
        owner = name
        if not isinstance(student, nn.Module) or not isinstance(teacher, (nn.Module, type(None))):
            raise ConfigError(f"{owner}: student and teacher must be nn.Modules (got {type(student).__name__} and {type(teacher).__name__})")
        if student is teacher:
            raise ConfigError(f"{owner}: the teacher must be another model than the student (got the same object)")
        if not callable(forward):
            raise ConfigError(f"{owner}: forward must be callable (got {forward!r})")
        if hidden_loss not in HIDDEN_KINDS:
            raise ConfigError(f"{owner}: hidden_loss must be one of {', '.join(map(repr, HIDDEN_KINDS))} (got {hidden_loss!r})")
        merged = dict(WEIGHTS)
        for key, value in dict(weights or {}).items():
            if key not in WEIGHTS:
                raise ConfigError(f"{owner}: weights keys must be among {sorted(WEIGHTS)} (got {key!r})")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{owner}: weights[{key!r}] must be a finite number >= 0 (got {value!r})")
            merged[key] = float(value)
        object.__setattr__(self, "_models", (student, teacher))  # not submodules: .parameters() are ours only
        self.name, self.forward_fn, self.weights = owner, forward, merged
        try:
            self.kl = LogitKL(temperature, top_k=top_k, chunk_size=chunk_size)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("LogitKL", owner, 1)) from None
        self.pairs = pairs(hidden_layers, owner)
        self.attention_pairs = _attention_pairs(attention_layers, owner)
        if teacher is None:
            if any(self._active(p) for p in ("kl", "hidden", "attention")):
                raise ConfigError(f"{owner}: a teacher is needed unless only the cross-entropy part is on (got weights {merged})")
            teacher = nn.Module()  # nothing to run; keeps the code below uniform
            object.__setattr__(self, "_models", (student, teacher))
        s_mods = resolve(student, [s for s, _ in self.pairs], owner, "student")
        t_mods = resolve(teacher, [t for _, t in self.pairs], owner, "teacher")
        self.hidden = nn.ModuleList(
            HiddenLoss(hidden_loss, student_width=width_of(sm), teacher_width=width_of(tm), project=project,
                       name=f"{owner}: hidden layers {s!r} (student) and {t!r} (teacher)")
            for (s, t), sm, tm in zip(self.pairs, s_mods, t_mods)
        )
        self.attention = AttentionLoss()

    @property
    def student(self) -> nn.Module:
        """The model being trained."""
        return self._models[0]

    @property
    def teacher(self) -> nn.Module:
        """The reference model."""
        return self._models[1]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's trainable parameters and the projections, each once: give these to the optimizer."""
        seen: set[int] = set()
        out = []
        for p in itertools.chain(self.student.parameters(), self.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _active(self, part: str) -> bool:
        if self.weights[part] <= 0:
            return False
        return {"hidden": bool(self.pairs), "attention": bool(self.attention_pairs)}.get(part, True)

    def forward(self, batch: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # type: ignore[override]
        """Run both models on ``batch``; return ``(loss, {part: detached value})``."""
        mask = position_mask(batch)
        s_batch, t_batch = batch, batch
        if isinstance(batch, Mapping):
            s_batch = {k: v for k, v in batch.items() if k != "labels" or self._active("ce")}
            t_batch = {k: v for k, v in batch.items() if k != "labels"}
            if self._active("attention"):
                s_batch["output_attentions"] = t_batch["output_attentions"] = True
        with capture(self.student, [s for s, _ in self.pairs if self._active("hidden")], self.name, "student") as s_hidden:
            s_out = self.forward_fn(self.student, s_batch)
        parts: dict[str, torch.Tensor] = {}
        if any(self._active(p) for p in ("kl", "hidden", "attention")):
            t_out, t_hidden = self._teacher(t_batch)
            if self._active("kl"):
                t_logits = logits_of(t_out, self.name)
                if not bool(torch.isfinite(t_logits).all()):
                    raise ConfigError(f"{self.name}: the teacher's logits are not finite (a float16 teacher can overflow: "
                                      f"try bfloat16) (got {t_logits.dtype} logits with inf or nan)")
                parts["kl"] = self.kl(logits_of(s_out, self.name), t_logits, mask)
            if self._active("hidden"):
                losses = [fn(s_hidden[s], t_hidden[t], mask) for (s, t), fn in zip(self.pairs, self.hidden)]
                parts["hidden"] = torch.stack(losses).mean()
            if self._active("attention"):
                parts["attention"] = self._attention(s_out, t_out, mask)
        if self._active("ce"):
            parts["ce"] = self._ce(s_out, batch, labels)
        if not parts:
            raise ConfigError(f"{self.name}: every loss part has weight 0 or nothing to compare (weights {self.weights})")
        loss = sum(self.weights[k] * v for k, v in parts.items())
        return loss, {k: v.detach() for k, v in parts.items()}  # type: ignore[return-value]

    def _teacher(self, batch: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        teacher = self.teacher
        device, dtype = placement(teacher)
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad(), capture(teacher, [t for _, t in self.pairs if self._active("hidden")], self.name, "teacher") as hidden:
                out = self.forward_fn(teacher, place(batch, device, dtype))
        finally:
            teacher.train(was)
        return out, hidden

    def _attention(self, s_out: Any, t_out: Any, mask: torch.Tensor | None) -> torch.Tensor:
        s_att, t_att = getattr(s_out, "attentions", None), getattr(t_out, "attentions", None)
        if not s_att or not t_att:
            raise ConfigError(
                f"{self.name}: attention transfer needs models that return attentions (got none); load Hugging Face models "
                "with attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )
        losses = []
        for i, j in self.attention_pairs:
            try:
                losses.append(self.attention(s_att[i], t_att[j], mask))
            except IndexError:
                raise ConfigError(
                    f"{self.name}: attention layer pair ({i}, {j}) is out of range (the student returns {len(s_att)} maps, "
                    f"the teacher {len(t_att)})"
                ) from None
        return torch.stack(losses).mean()

    def _ce(self, out: Any, batch: Any, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            own = getattr(out, "loss", None)
            if isinstance(own, torch.Tensor):
                return own  # the model scored its own labels (Hugging Face shifts them for causal LMs)
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            raise ConfigError(f"{self.name}: weights['ce'] is {self.weights['ce']:g} but the batch has no labels (pass labels=...)")
        logits = logits_of(out, self.name)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device), ignore_index=-100)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, hidden_layers={self.pairs}, attention_layers={self.attention_pairs}"
