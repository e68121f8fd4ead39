"""The tracer's walk over a ``torch.fx`` graph: what the channel dimension of every value holds.

Each tensor value gets a :class:`Val` (which channel sets lie along which dimension) or
:data:`FIXED` (a tensor with no prunable channels: the model's input, a parameter used directly,
the output of an operation the tracer does not follow). Channel sets live in a union-find over
"leaves" (one leaf per matrix layer's output); coupling two tensors joins their leaves.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx, nn

from . import _trace_ops as ops
from ._slicing import Sliceable, sliceable
from ._trace_shape import Shaping
from ._trace_values import CONST, FIXED, Size, Use, Val
from ._trace_values import consts as _consts

__all__ = ["FIXED", "CONST", "Val", "Use", "Walker"]


class Walker(Shaping):
    """Walks a graph node by node; holds the union-find of channel sets, their uses, pins and blockers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.env: dict[fx.Node, Any] = {}
        self.parent: list[int] = []
        self.width: list[int] = []
        self.producer: list[str] = []
        self.uses: list[list[Use]] = []
        self.pins: list[tuple[int, str]] = []
        self.blockers: list[tuple[str, str, tuple[int, ...]]] = []
        self.mod_in: dict[str, Any] = {}
        self.mod_out: dict[str, int] = {}
        self.direct: list[tuple[str, str]] = []  # (module, graph node) reading its tensors directly

    # -- union-find ------------------------------------------------------------------------
    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def _union(self, a: Val, b: Val) -> bool:
        if [w for _, w in a.segs] != [w for _, w in b.segs]:
            return False
        for (x, _), (y, _) in zip(a.segs, b.segs):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
        return True

    def pin(self, leaf: int, why: str) -> None:
        self.pins.append((leaf, why))

    def _pin(self, v: Val, why: str) -> None:
        for leaf in v.leaves():
            self.pin(leaf, why)

    def pin_shared(self) -> None:
        """Keep whole every set touching a layer whose tensors are read directly or shared with another module."""
        owners: dict[int, list[str]] = {}
        for name, m in self.model.named_modules(remove_duplicate=False):
            for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
                owners.setdefault(id(t), []).append(name)
        why = {m: f"{m}'s tensors are read directly at graph node {n!r}" for m, n in self.direct}
        for names in owners.values():
            for m in dict.fromkeys(names) if len(set(names)) > 1 else ():
                why.setdefault(m, f"{m} shares a parameter with {', '.join(sorted(set(names) - {m}))}")
        for leaf, uses in enumerate(self.uses):
            for u in uses:
                if u.module in why:
                    self.pin(leaf, why[u.module])

    def pinned_roots(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for leaf, why in self.pins:
            out.setdefault(self.find(leaf), why)
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _info(self, arg: Any) -> Any:
        return self.env.get(arg, FIXED) if isinstance(arg, fx.Node) else CONST

    def _all(self, *args: Any) -> list[Any]:
        out: list[Any] = []
        for a in args:
            if isinstance(a, (list, tuple)):
                out += self._all(*a)
            elif isinstance(a, dict):
                out += self._all(*a.values())
            elif isinstance(a, slice):
                out += self._all(a.start, a.stop, a.step)
            else:
                out.append(self._info(a))
        return out

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.model.get_submodule(str(node.target))).__name__})"
        if node.op == "call_method":
            return f".{node.target}() at graph node {node.name!r}"
        return f"{getattr(node.target, '__name__', node.target)} at graph node {node.name!r}"

    def _block(self, node: fx.Node, why: str, *vals: Val) -> Any:
        self.blockers.append((self._where(node), why, tuple(x for v in vals for x in v.leaves())))
        return FIXED

    def _unknown(self, node: fx.Node, why: str) -> Any:
        infos = self._all(node.args, node.kwargs)
        vals = [v for v in infos if isinstance(v, Val)] + [s.val for s in infos if isinstance(s, Size) and s.val is not None]
        if vals:
            return self._block(node, why, *vals)
        return CONST if infos and all(_consts(i) for i in infos) and node.op != "call_module" else FIXED

    def _bind(self, node: fx.Node, name: str, info: Any) -> None:
        # a layer called more than once reads the same columns each time: couple (or pin) its inputs
        if name not in self.mod_in:
            self.mod_in[name] = info
            return
        prev = self.mod_in[name]
        if isinstance(prev, Val) and isinstance(info, Val):
            if not self._union(prev, info):
                self._block(node, "is called on channel sets that do not line up", prev, info)
        elif isinstance(prev, Val) or isinstance(info, Val):
            self._pin(prev if isinstance(prev, Val) else info, f"{name} also reads a tensor the tracer cannot slice")

    # -- the walk --------------------------------------------------------------------------
    def step(self, node: fx.Node) -> None:
        """Compute the info of ``node`` from its inputs'."""
        if node.op in ("placeholder", "get_attr"):
            self.env[node] = FIXED
            if node.op == "get_attr":  # a layer's parameter or buffer read directly: cutting the layer would change it
                self.direct.append((str(node.target).rpartition(".")[0], node.name))
        elif node.op == "output":
            for info in self._all(node.args):
                v = info.val if isinstance(info, Size) else info
                if isinstance(v, Val):
                    self._pin(v, "it reaches the model output")
        elif node.op == "call_module":
            self.env[node] = self._module(node)
        elif node.op == "call_method":
            self.env[node] = self._method(node)
        else:
            self.env[node] = self._function(node)

    def _module(self, node: fx.Node) -> Any:
        name = str(node.target)
        m = self.model.get_submodule(name)
        x = self._info(node.args[0]) if node.args else CONST
        if any(isinstance(i, (Val, Size)) for i in self._all(node.args[1:], node.kwargs)):
            return self._unknown(node, "takes more than one tensor input")
        spec = sliceable(m)
        if spec is not None:
            why = spec.refuse(m)
            if why:
                return self._unknown(node, why)
            if spec.kind_of(m) == "matrix":
                return self._matrix(node, name, m, spec, x)
            return self._channelwise(node, name, m, spec, x)
        t = type(m)
        if t in ops.ELEMENTWISE_MODULES:
            return x if isinstance(x, Val) else FIXED
        if t in ops.POOL_MODULES:
            return self._pool(node, x, ops.POOL_MODULES[t], getattr(m, "output_size", None) if t in ops.ADAPTIVE else None)
        if t is nn.Flatten:
            return self._flatten(node, x, m.start_dim, m.end_dim)
        return self._unknown(node, f"{t.__name__} is not a layer the tracer can map channels through")

    def _matrix(self, node: fx.Node, name: str, m: nn.Module, spec: Sliceable, x: Any) -> Any:
        cols, rows, cdim = spec.width(m, 1), spec.width(m, 0), spec.channel_dim or -1
        if isinstance(x, Val):
            block = cols // x.width if cols % x.width == 0 else 0
            if x.dim != cdim:
                self._block(node, f"reads dimension {cdim} but the channels are in dimension {x.dim}", x)
            elif not block or (x.block is not None and block % x.block):
                self._block(node, f"has {cols} input columns, which do not split into the {x.width} channels", x)
            else:
                self._bind(node, name, x)
                for leaf, off in x.offsets():
                    self.uses[leaf].append(Use(name, 1, off, block))
        else:
            self._bind(node, name, FIXED)
        leaf = self.mod_out.get(name)
        if leaf is None:
            leaf = self.mod_out[name] = len(self.parent)
            self.parent.append(leaf)
            self.width.append(rows)
            self.producer.append(name)
            self.uses.append([Use(name, 0, 0, 1)])
        rank = x.rank if isinstance(x, Val) else None
        if cdim != -1 and rank is None:
            rank = 1 - cdim  # convolutions take batched inputs [N, C, ...]
        return Val(((leaf, rows),), cdim, rank, 1 if cdim == -1 else None)

    def _channelwise(self, node: fx.Node, name: str, m: nn.Module, spec: Sliceable, x: Any) -> Any:
        if not isinstance(x, Val):
            self._bind(node, name, FIXED)
            return FIXED
        if spec.channel_dim is None and x.pos != 1:
            why = "normalises dimension 1, and the tracer cannot tell the input's rank" if x.rank is None else "normalises dimension 1, not the channels"
            return self._block(node, why, x)
        if spec.channel_dim is not None and x.dim != spec.channel_dim:
            return self._block(node, f"acts on dimension {spec.channel_dim} but the channels are in dimension {x.dim}", x)
        if x.block != 1 or spec.width(m, 0) != x.width:
            return self._block(node, f"has {spec.width(m, 0)} channels where the tensor has {x.width}", x)
        self._bind(node, name, x)
        for leaf, off in x.offsets():
            self.uses[leaf].append(Use(name, 0, off, 1))
        keeps_size = isinstance(m, nn.modules.batchnorm._BatchNorm)
        return dataclasses.replace(x, trail=x.trail if keeps_size else None)

    def _elementwise(self, node: fx.Node) -> Any:
        x = self._info(node.args[0]) if node.args else FIXED
        others = self._all(node.args[1:], node.kwargs)
        if any(isinstance(i, (Val, Size)) and not _consts(i) for i in others):
            return self._unknown(node, "mixes in another channel tensor")
        if isinstance(x, Val) and any(i is FIXED for i in others):
            self._pin(x, f"{self._where(node)} mixes in a tensor the tracer cannot slice")
            return FIXED
        return x if isinstance(x, Val) else FIXED

    def _binary(self, node: fx.Node, a_arg: Any, b_arg: Any) -> Any:
        a, b = self._info(a_arg), self._info(b_arg)
        if any(isinstance(i, Size) and i.val is not None for i in (a, b)):
            return self._unknown(node, "computes with the channel count")
        vals = [v for v in (a, b) if isinstance(v, Val)]
        if not vals:
            return CONST if _consts(a) and _consts(b) else FIXED
        if len(vals) == 1:
            if (b if vals[0] is a else a) is FIXED:
                self._pin(vals[0], f"{self._where(node)} combines them with a tensor the tracer cannot slice")
                return FIXED
            return vals[0]
        if a.dim != b.dim or (a.block and b.block and a.block != b.block) or not self._union(a, b):
            return self._block(node, "combines two channel tensors whose channels do not line up", a, b)
        rank = a.rank if a.rank == b.rank else (None if None in (a.rank, b.rank) else max(a.rank, b.rank))
        trail = None if None in (a.trail, b.trail) else max(a.trail, b.trail)  # type: ignore[type-var]
        return Val(a.segs, a.dim, rank, trail, a.block if a.block == b.block else None)

    def _method(self, node: fx.Node) -> Any:
        t, args, kw = str(node.target), node.args, node.kwargs
        if t in ops.ELEMENTWISE_METHODS:
            return self._elementwise(node)
        if t in ops.BINARY_METHODS and len(args) >= 2:
            return self._binary(node, args[0], args[1])
        if t in ops.REDUCE_METHODS:
            return self._reduce(node, self._info(args[0]), args[1] if len(args) > 1 else kw.get("dim"),
                                args[2] if len(args) > 2 else kw.get("keepdim", False))
        if t == "flatten":
            return self._flatten(node, self._info(args[0]), args[1] if len(args) > 1 else kw.get("start_dim", 0),
                                 args[2] if len(args) > 2 else kw.get("end_dim", -1))
        if t in ops.RESHAPE_METHODS:
            return self._reshape(node, tuple(args[1:]))
        if t == "size":
            return self._size(node, args[0], args[1] if len(args) > 1 else kw.get("dim"))
        if t in ("dim", "ndimension"):
            return CONST
        return self._unknown(node, f"tensor method .{t}() is not one the tracer can map channels through")

    def _function(self, node: fx.Node) -> Any:
        t, args, kw = node.target, node.args, node.kwargs
        if t in ops.ELEMENTWISE_FUNCTIONS:
            return self._elementwise(node)
        if t in ops.BINARY_FUNCTIONS and len(args) >= 2:
            return self._binary(node, args[0], args[1])
        if t in ops.POOL_FUNCTIONS:
            size = (args[1] if len(args) > 1 else kw.get("output_size")) if t in ops.ADAPTIVE else None
            return self._pool(node, self._info(args[0]), ops.POOL_FUNCTIONS[t], size)
        if t in ops.REDUCE_FUNCTIONS:
            return self._reduce(node, self._info(args[0]), args[1] if len(args) > 1 else kw.get("dim"),
                                args[2] if len(args) > 2 else kw.get("keepdim", False))
        if t in ops.FLATTEN:
            return self._flatten(node, self._info(args[0]), args[1] if len(args) > 1 else kw.get("start_dim", 0),
                                 args[2] if len(args) > 2 else kw.get("end_dim", -1))
        if t in ops.CAT:
            return self._cat(node, args[0] if args else kw.get("tensors"), args[1] if len(args) > 1 else kw.get("dim", 0))
        if t is torch.reshape:
            return self._reshape(node, tuple(args[1:]))
        if t is getattr and len(args) == 2:
            x = self._info(args[0])
            if args[1] == "shape":
                return self._size(node, args[0], None)
            if args[1] in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
                return CONST
            return self._unknown(node, f"reads .{args[1]} of the tensor") if isinstance(x, Val) else FIXED
        if t is operator.getitem:
            obj = self._info(args[0])
            if isinstance(obj, Size) and obj.index is None:
                return self._size(node, obj.of, args[1])
            if isinstance(obj, Val):
                return self._block(node, "indexes or slices a channel tensor", obj)
            return FIXED
        return self._unknown(node, "is not an operation the tracer can map channels through")
