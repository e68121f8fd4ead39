"""How to cut one layer: its weight as a logical ``[out, in]`` matrix, and a new, smaller module.

Every layer type structured pruning may cut is described by a :class:`Sliceable`, looked up by
the module's exact type (a subclass, such as a parametrized or quantized layer, is not cut):

* ``"matrix"`` layers (``nn.Linear``, transformers' ``Conv1D`` whose weight is stored ``[in, out]``,
  ``nn.Conv1d/2d/3d`` with ``groups=1``): logical rows are output channels (with the bias), logical
  columns are inputs (for a convolution, each input channel is ``prod(kernel_size)`` columns, in
  the order of ``weight.flatten(1)``);
* ``"channelwise"`` layers (``nn.BatchNorm1d/2d/3d``, depthwise convolutions): one slot per
  channel, the same on input and output; only rows are cut.

:func:`register_sliceable` adds a type of your own (see docs/structured.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ...errors import RegistryError

__all__ = ["Sliceable", "register_sliceable", "sliceable", "slice_linear", "keep_of"]


@dataclasses.dataclass(frozen=True)
class Sliceable:
    """How llmslim reads and cuts one layer type.

    Attributes:
        kind: ``"matrix"`` (rows are outputs, columns inputs) or ``"channelwise"`` (one slot per
            channel, input and output alike; only ``dim=0`` is cut), or a function of the module
            giving one of them (a depthwise convolution is channelwise).
        channel_dim: The dimension of its input and output tensors holding the channels,
            counted from the end (``-1`` for ``Linear``, ``-3`` for ``Conv2d``), or ``None`` for
            "dimension 1" (``BatchNorm1d`` on ``[N, C]`` or ``[N, C, L]``).
        width: ``width(module, dim)``: logical rows (``dim=0``) or columns (``dim=1``).
        matrix: ``matrix(module, t)``: a tensor shaped like ``module.weight`` viewed as the
            logical ``[rows, columns]`` matrix, or ``None`` for a layer without one (batch norm).
        cut: ``cut(module, dim, keep)``: a new module keeping logical rows or columns ``keep``
            (sorted indices); the old module is not changed.
        sizes: ``sizes(module)``: the integer sizes a checkpoint records (e.g. ``in_channels``).
        resize: ``resize(module, sizes)``: an empty module like ``module`` with those sizes (its
            values are loaded afterwards), on the same device and dtype.
        refuse: ``refuse(module)``: why this particular module cannot be cut, or ``None``.
    """

    kind: Literal["matrix", "channelwise"] | Callable[[nn.Module], str]
    channel_dim: int | None
    width: Callable[[nn.Module, int], int]
    matrix: Callable[[nn.Module, torch.Tensor], torch.Tensor | None]
    cut: Callable[[nn.Module, int, torch.Tensor], nn.Module]
    sizes: Callable[[nn.Module], dict[str, int]]
    resize: Callable[[nn.Module, dict[str, int]], nn.Module]
    refuse: Callable[[nn.Module], str | None] = lambda module: None

    def kind_of(self, module: nn.Module) -> str:
        """``"matrix"`` or ``"channelwise"`` for this module."""
        return self.kind if isinstance(self.kind, str) else self.kind(module)


_REGISTRY: dict[type | str, Sliceable] = {}


def register_sliceable(cls: type | str, spec: Sliceable, *, replace: bool = False) -> None:
    """Register how modules of exact type ``cls`` are cut (a string: ``"module.path.ClassName"``).

    Raises:
        RegistryError: ``cls`` is registered already (without ``replace``).

    Example:
        >>> class Scale(nn.Module):  # one factor per channel of the last dimension
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(n))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> def cut(m, dim, keep):
        ...     new = Scale(len(keep))
        ...     new.weight = nn.Parameter(m.weight.detach()[keep].clone())
        ...     return new
        >>> register_sliceable(Scale, Sliceable("channelwise", -1, width=lambda m, dim: len(m.weight),
        ...     matrix=lambda m, t: None, cut=cut, sizes=lambda m: {"n": len(m.weight)},
        ...     resize=lambda m, s: Scale(s["n"])))
        >>> sliceable(Scale(4)).cut(Scale(4), 0, torch.tensor([0, 2])).weight.shape
        torch.Size([2])
        >>> del _REGISTRY[Scale]
    """
    if cls in _REGISTRY and not replace:
        raise RegistryError(f"a Sliceable for {cls!r} is already registered; pass replace=True to replace it")
    _REGISTRY[cls] = spec


def sliceable(module: nn.Module) -> Sliceable | None:
    """The :class:`Sliceable` of ``module``'s exact type, or ``None``.

    Example:
        >>> sliceable(nn.Conv2d(3, 8, 3)).channel_dim, sliceable(nn.LayerNorm(4)) is None
        (-3, True)
    """
    cls = type(module)
    spec = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
    if spec is None and cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
        spec = _REGISTRY.get("transformers.Conv1D")  # moved between transformers modules over versions
    return spec


def keep_of(width: int, removed: set[int] | frozenset[int]) -> torch.Tensor:
    """Sorted indices of ``range(width)`` not in ``removed``, as a long tensor.

    Example:
        >>> keep_of(5, {1, 3}).tolist()
        [0, 2, 4]
    """
    return torch.tensor([i for i in range(width) if i not in removed], dtype=torch.long)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.clone(), requires_grad=like.requires_grad)


def _meta(build: Callable[[], nn.Module], old: nn.Module) -> nn.Module:
    # built on meta (no init cost), then every tensor is assigned from the old module
    with torch.device("meta"):
        new = build()
    new.train(old.training)
    return new


# -- nn.Linear -------------------------------------------------------------------------------
def slice_linear(linear: nn.Linear, dim: int, keep: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` holding only rows (``dim=0``, with their bias) or columns (``dim=1``) ``keep``.

    Example:
        >>> layer = nn.Linear(3, 4)
        >>> small = slice_linear(layer, 0, torch.tensor([0, 2]))
        >>> small.weight.shape, torch.equal(small.bias, layer.bias[[0, 2]])
        (torch.Size([2, 3]), True)
    """
    w = linear.weight.detach()
    keep = keep.to(w.device)
    fan_in, fan_out = (linear.in_features, len(keep)) if dim == 0 else (len(keep), linear.out_features)
    new = nn.Linear(fan_in, fan_out, bias=linear.bias is not None, device="meta", dtype=w.dtype)
    new.weight = _param(w.index_select(dim, keep), linear.weight)
    if linear.bias is not None:
        b = linear.bias.detach()
        new.bias = _param(b.index_select(0, keep) if dim == 0 else b, linear.bias)
    new.train(linear.training)
    return new


def _linear_resize(m: nn.Module, s: dict[str, int]) -> nn.Module:
    return nn.Linear(s["in_features"], s["out_features"], bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)


register_sliceable(nn.Linear, Sliceable(
    "matrix", -1,
    width=lambda m, dim: m.out_features if dim == 0 else m.in_features,
    matrix=lambda m, t: t,
    cut=slice_linear,  # type: ignore[arg-type]
    sizes=lambda m: {"in_features": m.in_features, "out_features": m.out_features},
    resize=_linear_resize,
))


# -- transformers' Conv1D (GPT-2): weight [in, out] -----------------------------------------------
def _conv1d_hf_cut(m: nn.Module, dim: int, keep: torch.Tensor) -> nn.Module:
    w = m.weight.detach()
    keep = keep.to(w.device)
    nx, nf = (m.nx, len(keep)) if dim == 0 else (len(keep), m.nf)
    new = _meta(lambda: type(m)(nf, nx), m)
    new.weight = _param(w.index_select(1 - dim, keep), m.weight)  # logical rows are stored columns
    b = m.bias.detach()
    new.bias = _param(b.index_select(0, keep) if dim == 0 else b, m.bias)
    return new


def _conv1d_hf_resize(m: nn.Module, s: dict[str, int]) -> nn.Module:
    with torch.device(m.weight.device):
        new = type(m)(s["nf"], s["nx"])
    return new.to(m.weight.dtype)


register_sliceable("transformers.Conv1D", Sliceable(
    "matrix", -1,
    width=lambda m, dim: m.nf if dim == 0 else m.nx,
    matrix=lambda m, t: t.T,
    cut=_conv1d_hf_cut,
    sizes=lambda m: {"nx": m.nx, "nf": m.nf},
    resize=_conv1d_hf_resize,
))


# -- nn.Conv1d / Conv2d / Conv3d ---------------------------------------------------------------
def _conv_like(m: Any, in_channels: int, out_channels: int, groups: int, device: Any = "meta") -> nn.Module:
    return type(m)(in_channels, out_channels, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                   groups=groups, bias=m.bias is not None, padding_mode=m.padding_mode, device=device, dtype=m.weight.dtype)


def _depthwise(m: Any) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_cut(m: Any, dim: int, keep: torch.Tensor) -> nn.Module:
    w, k = m.weight.detach(), math.prod(m.kernel_size)
    keep = keep.to(w.device)
    if _depthwise(m):  # channelwise: output channel c reads input channel c only
        n = len(keep)
        new = _conv_like(m, n, n, n)
        new.weight = _param(w.index_select(0, keep), m.weight)
    elif dim == 0:
        new = _conv_like(m, m.in_channels, len(keep), 1)
        new.weight = _param(w.index_select(0, keep), m.weight)
    else:
        channels = keep[::k] // k
        if len(keep) != len(channels) * k or not torch.equal(keep, (channels[:, None] * k + torch.arange(k, device=keep.device)).flatten()):
            raise ValueError(f"columns of a convolution are cut in whole input channels of {k} columns")
        new = _conv_like(m, len(channels), m.out_channels, 1)
        new.weight = _param(w.index_select(1, channels), m.weight)
    if m.bias is not None:
        b = m.bias.detach()
        new.bias = _param(b.index_select(0, keep) if dim == 0 else b, m.bias)
    new.train(m.training)
    return new


def _conv_refuse(m: Any) -> str | None:
    if m.groups != 1 and not _depthwise(m):
        return f"grouped convolution (groups={m.groups}) ties channels together in groups; only groups=1 and depthwise are cut"
    return None


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _k = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[_cls]
    register_sliceable(_cls, Sliceable(
        lambda m: "channelwise" if _depthwise(m) else "matrix", -(_k + 1),
        width=lambda m, dim: m.out_channels if dim == 0 else m.in_channels * math.prod(m.kernel_size) // m.groups,
        matrix=lambda m, t: t.flatten(1),
        cut=_conv_cut,
        sizes=lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups},
        resize=lambda m, s: _conv_like(m, s["in_channels"], s["out_channels"], s["groups"], device=m.weight.device),
        refuse=_conv_refuse,
    ))


# -- batch norm ----------------------------------------------------------------------------
def _bn_cut(m: Any, dim: int, keep: torch.Tensor) -> nn.Module:
    n = len(keep)
    new = _meta(lambda: type(m)(n, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats), m)
    for name in ("weight", "bias"):
        p = getattr(m, name)
        if p is not None:
            setattr(new, name, _param(p.detach().index_select(0, keep.to(p.device)), p))
    for name in ("running_mean", "running_var"):
        t = getattr(m, name)
        if t is not None:
            setattr(new, name, t.index_select(0, keep.to(t.device)).clone())
    if m.num_batches_tracked is not None:
        new.num_batches_tracked = m.num_batches_tracked.clone()
    return new


def _bn_resize(m: Any, s: dict[str, int]) -> nn.Module:
    ref = m.weight if m.weight is not None else m.running_mean
    kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    return type(m)(s["num_features"], eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats, **kwargs)


for _cls, _dim in ((nn.BatchNorm1d, None), (nn.BatchNorm2d, -3), (nn.BatchNorm3d, -4)):
    register_sliceable(_cls, Sliceable(
        "channelwise", _dim,
        width=lambda m, dim: m.num_features,
        matrix=lambda m, t: None,
        cut=_bn_cut,
        sizes=lambda m: {"num_features": m.num_features},
        resize=_bn_resize,
    ))
