"""The generic tracer: coupled channel sets of any ``nn.Module``, read from its ``torch.fx`` graph.

Every layer with a registered :class:`~._slicing.Sliceable` (``Linear``, ``Conv1D``, ``Conv1d/2d/3d``,
``BatchNorm``) is a leaf of the trace. Each matrix layer's output starts a channel set; the
tracer follows every tensor through the graph and records who reads which channels:

* matrix layers reading a channel tensor (their input columns: one per channel for a ``Linear``,
  ``prod(kernel_size)`` for a convolution, the flattened block after a ``flatten``);
* channelwise layers (batch norm, depthwise convolution): their rows, same channel in and out;
* elementwise operations pass channels through; adding or multiplying two channel tensors
  couples their sets (residual connections), so they are pruned as one;
* ``cat`` along the channel dimension joins sets side by side.

A set is *kept whole* when it reaches the model's output, meets the model's input or another
tensor the tracer cannot slice (a parameter used directly, an unknown op's output), or is made
by a layer outside ``targets``/``ignore``. Any other operation that touches a prunable set
(an unknown function or module, indexing, a view other than ``view(x.size(0), -1)``, a flatten
whose channel layout it cannot prove, a grouped convolution ...) makes the whole trace fail with
:class:`~llmslim.errors.TraceError`, before anything is changed. Convolutions are assumed to get
batched inputs ``[N, C, ...]`` (their channel dimension is then 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from torch import fx, nn

from ..._targets import Target, matches
from ...errors import TraceError
from ._groups import Group, Slice
from ._trace_graph import Use, Walker

__all__ = ["Space", "Traced", "trace"]


@dataclasses.dataclass(frozen=True)
class Space:
    """One prunable set of coupled channels.

    Attributes:
        index: Position in :attr:`Traced.spaces` (the ``layer`` of its groups).
        width: Channels in the set.
        producers: The matrix layers whose output rows are these channels.
        uses: Every slice per channel: ``Use(module, dim, offset, block)`` covers logical rows
            (``dim=0``) or columns (``dim=1``) ``[(offset + c) * block, (offset + c + 1) * block)``
            for channel ``c``.
    """

    index: int
    width: int
    producers: tuple[str, ...]
    uses: tuple[Use, ...]

    @property
    def name(self) -> str:
        """The first producer's name."""
        return self.producers[0]

    def groups(self) -> list[Group]:
        """One group per channel (kind ``"channel"``, ``layer`` = this set's index)."""
        return [
            Group("channel", self.index, c, tuple(Slice(u.module, u.dim, (u.offset + c) * u.block, (u.offset + c + 1) * u.block)
                                                 for u in self.uses))
            for c in range(self.width)
        ]

    def modules(self) -> tuple[str, ...]:
        """Every layer this set touches, each once."""
        return tuple(dict.fromkeys(u.module for u in self.uses))


@dataclasses.dataclass(frozen=True)
class Traced:
    """What :func:`trace` found: the prunable channel sets, and the sets kept whole with the reason."""

    spaces: tuple[Space, ...]
    kept: tuple[tuple[str, str], ...]  # (first producer, why the set is kept whole)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from ._slicing import sliceable

        return sliceable(m) is not None or super().is_leaf_module(m, qualname)


def _graph(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # user forward code can fail to trace in any way; report it as the reason
        raise TraceError(type(model).__name__, [("forward", f"torch.fx cannot trace it ({type(exc).__name__}: {exc})")],
                         hint=" (data-dependent control flow? give the model a registered Layout instead)") from exc


def trace(model: nn.Module, *, targets: Sequence[Target] = ("*",), ignore: Sequence[Target] = ()) -> Traced:
    """Find the prunable coupled channel sets of ``model`` from its ``torch.fx`` graph; change nothing.

    Args:
        model: Any module ``torch.fx.symbolic_trace`` can trace.
        targets: Layers whose output channels may be removed (globs, ``re:``, class names ...);
            a set is prunable only when every layer producing it is targeted.
        ignore: Layers whose output channels are kept whole.

    Returns:
        The prunable sets, in graph order, and the sets kept whole with the reason.

    Raises:
        TraceError: The graph cannot be traced, or an operation touches a prunable set in a way
            the tracer cannot map exactly (every such place is listed); or nothing is prunable.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> found = trace(net)
        >>> [(s.name, s.width, s.modules()) for s in found.spaces]
        [('0', 8, ('0', '1', '3')), ('3', 4, ('3', '6'))]
        >>> found.kept
        (('6', 'it reaches the model output'),)
    """
    walker = Walker(model)
    for node in _graph(model).nodes:
        walker.step(node)
    for leaf, producer in enumerate(walker.producer):
        mod = model.get_submodule(producer)
        if not matches(tuple(targets), producer, mod) or matches(tuple(ignore), producer, mod):
            walker.pin(leaf, f"{producer} is not targeted (targets/ignore)")
    walker.pin_shared()
    pinned = walker.pinned_roots()
    problems = []
    for where, why, leaves in walker.blockers:
        open_ = list(dict.fromkeys(walker.producer[x] for x in leaves if walker.find(x) not in pinned))
        if open_:
            problems.append((where, f"{why} (channels made by {', '.join(open_[:3])}{' ...' if len(open_) > 3 else ''})"))
    name = type(model).__name__
    if problems:
        raise TraceError(name, problems, hint=" (keep those channels whole with ignore=[the layers producing them])")
    spaces: list[Space] = []
    kept: list[tuple[str, str]] = []
    for root, leaves in _roots(walker):
        producers = tuple(dict.fromkeys(walker.producer[x] for x in leaves))
        if root in pinned:
            kept.append((producers[0], pinned[root]))
            continue
        uses = tuple(dict.fromkeys(u for x in leaves for u in walker.uses[x]))
        spaces.append(Space(len(spaces), walker.width[root], producers, uses))
    if not spaces:
        why = "; ".join(f"{p}: {w}" for p, w in kept[:6]) or "it has no Linear or convolution layers"
        raise TraceError(name, [("channels", f"every channel set is kept whole ({why})")])
    return Traced(tuple(spaces), tuple(kept))


def _roots(walker: Walker) -> Iterator[tuple[int, list[int]]]:
    members: dict[int, list[int]] = {}
    for leaf in range(len(walker.producer)):
        members.setdefault(walker.find(leaf), []).append(leaf)
    yield from sorted(members.items(), key=lambda kv: min(kv[1]))

