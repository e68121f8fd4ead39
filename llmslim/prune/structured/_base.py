"""``StructuredBase``: what the three structural passes share (targets over blocks, importance, reports)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..._context import Context
from ..._pass import PassBase
from ..._targets import Target, matches
from ..._validate import fail
from ...errors import TargetError
from ._groups import Decoder, Group, decoder
from ._importance import available_importances, group_scores, importance

__all__ = ["StructuredBase", "order"]


def order(scores: torch.Tensor) -> list[int]:
    """Indices from least to most important; ties go to the later index first (deterministic).

    Example:
        >>> order(torch.tensor([2.0, 1.0, 1.0, 3.0]))
        [2, 1, 0, 3]
    """
    return sorted(range(len(scores)), key=lambda k: (float(scores[k]), -k))


@dataclasses.dataclass
class StructuredBase(PassBase):
    """Base of passes that physically remove coupled units from transformer blocks (see :class:`Layout`).

    Args:
        targets: Which blocks to prune, by qualified name (default every block: ``"*"``);
            e.g. ``["model.layers.1*"]``.
        ignore: Blocks to leave alone, same syntax.
        name: Label in reports.
        importance: A registered importance (see
            :func:`~llmslim.prune.structured.register_importance`).
    """

    targets: tuple[Target, ...] = ("*",)
    importance: str = "l2"

    produces = frozenset({"structural"})
    rejects_after = {
        "packed": "weights are packed; prune structure before quantizing",
        "masks": "pruning masks parametrize the weights; prune structure before masking",
    }
    group_kinds: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        if self.importance not in available_importances():
            fail(self.label, "importance", f"one of {list(available_importances())}", self.importance)
        kinds = importance(self.importance).kinds
        if not set(self.group_kinds) <= kinds:
            fail(self.label, "importance", f"an importance scoring {'/'.join(self.group_kinds)} groups", self.importance)

    def declares(self) -> dict[str, Any]:
        """Nothing model-independent: a small ratio, ``round_to`` or one query head per kv group
        can leave a model unchanged (``Layers`` always removes and keeps ``fewer_params``)."""
        return {}

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """``{"calibration"}`` when the importance needs data."""
        return frozenset({"calibration"}) if importance(self.importance).calibration else frozenset()

    def decoder(self, model: nn.Module) -> tuple[Decoder, list[int]]:
        """The model's decoder and the indices of the targeted blocks.

        Raises:
            TargetError: Not a supported decoder, or no block selected.
        """
        dec = decoder(model)
        chosen = [i for i, (n, b) in enumerate(dec.blocks) if matches(self.targets, n, b) and not matches(self.ignore, n, b)]
        if not chosen:
            names = ", ".join(n for n, _ in dec.blocks[:3])
            raise TargetError(f"pass {self.label!r}: targets {list(self.targets)!r} (ignore {list(self.ignore)!r}) select no block; blocks: {names} ...")
        return dec, chosen

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The targeted blocks (raises TargetError for unsupported models: the pass does not apply)."""
        dec, chosen = self.decoder(model)
        return [dec.blocks[i] for i in chosen]

    def scores(self, groups: Sequence[Group], model: nn.Module, ctx: Context) -> torch.Tensor:
        """One importance score per group (higher is kept); override for a method of your own."""
        return group_scores(self.importance, groups, model, ctx, self.label)

    @staticmethod
    def info(removed: Sequence[int], scores: torch.Tensor, **extra: Any) -> dict[str, Any]:
        """Report-row info: what was removed and every unit's score."""
        return {**extra, "removed": [int(i) for i in removed], "scores": [round(float(s), 6) for s in scores]}
