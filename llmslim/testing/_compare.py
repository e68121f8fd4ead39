"""What the contract checks compare: output structure, finiteness, bitwise snapshots, hooks.

Everything here is plain torch and returns *descriptions* of the first difference found (or
``None``), so each check can phrase its failure as "module 'fc1': ... by how much".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "flatten_output",
    "structure_diff",
    "nonfinite",
    "first_nonfinite",
    "Snapshot",
    "snapshot",
    "snapshot_diff",
    "tensor_diff",
    "hook_counts",
    "global_hook_counts",
    "parametrized_modules",
    "split_name",
]

# Module attribute holding each kind of hook, as `nn.Module` names them.
HOOK_KINDS: dict[str, str] = {
    "forward hook": "_forward_hooks",
    "forward pre-hook": "_forward_pre_hooks",
    "backward hook": "_backward_hooks",
    "backward pre-hook": "_backward_pre_hooks",
}
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")


# -- outputs ---------------------------------------------------------------------------------
def flatten_output(out: Any, path: str = "output") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)`` for every leaf of a model output.

    Tensors, mappings (Hugging Face ``ModelOutput`` included), tuples, lists and dataclasses are
    walked; anything else is a leaf.

    Example:
        >>> import torch
        >>> [p for p, _ in flatten_output({"logits": torch.ones(2), "aux": (1, None)})]
        ["output['logits']", "output['aux'][0]", "output['aux'][1]"]
    """
    if isinstance(out, torch.Tensor):
        yield path, out
    elif isinstance(out, Mapping):
        for key, value in out.items():
            yield from flatten_output(value, f"{path}[{key!r}]")
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            yield from flatten_output(value, f"{path}[{i}]")
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            yield from flatten_output(getattr(out, f.name), f"{path}.{f.name}")
    else:
        yield path, out


def _describe(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"shape {tuple(leaf.shape)}"
    return f"a {type(leaf).__name__}"


def structure_diff(before: Any, after: Any) -> str | None:
    """Describe the first structural difference between two outputs (keys, lengths, shapes).

    Dtypes and values may differ; a compressed model computes other numbers.

    Example:
        >>> import torch
        >>> structure_diff((torch.ones(2, 3),), (torch.ones(2, 4),))
        'output[0] has shape (2, 4) after the pass but shape (2, 3) before'
        >>> structure_diff(torch.ones(1), torch.zeros(1)) is None
        True
    """
    a, b = dict(flatten_output(before)), dict(flatten_output(after))
    for path in a:
        if path not in b:
            return f"{path} is missing after the pass (before: {_describe(a[path])})"
    for path in b:
        if path not in a:
            return f"{path} is new after the pass ({_describe(b[path])}); it was not in the output before"
    for path, x in a.items():
        y = b[path]
        same = (
            x.shape == y.shape
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            else type(x) is type(y) and not isinstance(x, torch.Tensor)
        )
        if not same:
            return f"{path} has {_describe(y)} after the pass but {_describe(x)} before"
    return None


def nonfinite(t: torch.Tensor) -> str | None:
    """Say how many NaN/Inf values a floating tensor holds, or ``None`` when all are finite.

    Example:
        >>> import torch
        >>> nonfinite(torch.tensor([1.0, float("nan"), float("inf")]))
        '1 NaN and 1 Inf of 3 values'
    """
    if not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta" or t.numel() == 0:
        return None
    with torch.no_grad():
        t = _widen(t)
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return None
        nan = int(torch.isnan(t).sum())
        inf = int((~finite).sum()) - nan
    return f"{nan} NaN and {inf} Inf of {t.numel()} values"


def first_nonfinite(out: Any) -> tuple[str, str] | None:
    """``(path, what)`` of the first tensor leaf of a model output holding NaN or Inf, or ``None``.

    Example:
        >>> import torch
        >>> first_nonfinite({"logits": torch.tensor([1.0, float("nan")])})
        ("output['logits']", '1 NaN and 0 Inf of 2 values')
    """
    return next(((path, bad) for path, leaf in flatten_output(out) if isinstance(leaf, torch.Tensor) and (bad := nonfinite(leaf))), None)


# -- snapshots -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A deep record of a model's state, for bit-for-bit comparison.

    Attributes:
        tensors: Copies of every parameter and buffer (persistent or not), by qualified name.
        requires_grad: ``requires_grad`` of every parameter.
        state_keys: The ``state_dict`` keys, in order.
        classes: The class of every module, by qualified name.
        hooks: Hook counts per module (see :func:`hook_counts`).
        text: ``repr(model)``, which shows attributes such as ``in_features``.
    """

    tensors: Mapping[str, torch.Tensor]
    requires_grad: Mapping[str, bool]
    state_keys: tuple[str, ...]
    classes: Mapping[str, type]
    hooks: Mapping[str, Mapping[str, int]]
    text: str


def snapshot(model: nn.Module) -> Snapshot:
    """Copy everything :func:`snapshot_diff` compares.

    Example:
        >>> from torch import nn
        >>> sorted(snapshot(nn.Linear(2, 2)).tensors)
        ['bias', 'weight']
    """
    tensors: dict[str, torch.Tensor] = {}
    grads: dict[str, bool] = {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            tensors[name] = p.detach().clone()
            grads[name] = p.requires_grad
        for name, b in model.named_buffers(remove_duplicate=False):
            if b is not None:
                tensors[name] = b.detach().clone()
    return Snapshot(
        tensors=tensors,
        requires_grad=grads,
        state_keys=tuple(model.state_dict().keys()),
        classes={name: type(m) for name, m in model.named_modules(remove_duplicate=False)},
        hooks=hook_counts(model),
        text=repr(model),
    )


def split_name(qualified: str) -> tuple[str, str]:
    """Split ``"a.b.weight"`` into module ``"a.b"`` and tensor ``"weight"``.

    Example:
        >>> split_name("layers.0.weight"), split_name("bias")
        (('layers.0', 'weight'), ('', 'bias'))
    """
    module, _, leaf = qualified.rpartition(".")
    return module, leaf


def _widen(t: torch.Tensor) -> torch.Tensor:
    # float8 tensors (fp8 weights) lack most ops (isfinite, isclose, subtraction): compare them
    # as float32, which holds every float8 value exactly
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    except (RuntimeError, TypeError):  # sparse, quantized or subclass tensors: compare values
        return bool(torch.equal(a, b))


def tensor_diff(a: torch.Tensor, b: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0) -> str | None:
    """Describe how ``b`` differs from ``a``: dtype, shape, or how many values and by how much.

    With ``atol == rtol == 0`` the comparison is bitwise (so ``-0.0 != 0.0`` and NaN equals the
    same NaN); otherwise ``torch.isclose`` with NaN equal to NaN.

    Example:
        >>> import torch
        >>> tensor_diff(torch.zeros(4), torch.tensor([0.0, 0.5, 0.0, 0.0]))
        'differs in 1 of 4 values (max abs diff 0.5)'
    """
    if a.dtype != b.dtype:
        return f"has dtype {b.dtype}, was {a.dtype}"
    if a.shape != b.shape:
        return f"has shape {tuple(b.shape)}, was {tuple(a.shape)}"
    if a.device.type == "meta" or b.device.type == "meta":
        return None
    with torch.no_grad():
        if atol == 0.0 and rtol == 0.0:
            if _bytes_equal(a, b):
                return None
        a, b = _widen(a), _widen(b)
        if atol == 0.0 and rtol == 0.0:
            if a.is_floating_point():
                differ = ~((a == b) & (torch.signbit(a) == torch.signbit(b))) & ~(torch.isnan(a) & torch.isnan(b))
            else:
                differ = a != b
        else:
            if not (a.is_floating_point() or a.is_complex()):
                differ = a != b
            else:
                differ = ~torch.isclose(a, b, atol=atol, rtol=rtol, equal_nan=True)
            if not bool(differ.any()):
                return None
        count = int(differ.sum())
        if a.is_floating_point():
            gap = (a.double() - b.double()).abs()[differ]
            gap = gap[torch.isfinite(gap)]
            amount = f" (max abs diff {float(gap.max()):.3g})" if gap.numel() else " (NaN or Inf involved)"
        else:
            amount = ""
    if count == 0:  # only the bits differ (-0.0 against 0.0, NaN payloads)
        return "differs bitwise (signed zeros or NaN payloads)"
    return f"differs in {count} of {a.numel()} values{amount}"


def snapshot_diff(before: Snapshot, after: Snapshot, *, atol: float = 0.0, rtol: float = 0.0) -> tuple[str | None, str] | None:
    """The first difference between two snapshots as ``(module, description)``, or ``None``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(2, 2)
        >>> s = snapshot(m)
        >>> with torch.no_grad():
        ...     _ = m.bias.add_(1.0)
        >>> snapshot_diff(s, snapshot(m))
        ('', "tensor 'bias' differs in 2 of 2 values (max abs diff 1)")
    """
    for name, cls in before.classes.items():
        now = after.classes.get(name)
        if now is None:
            return name, f"module is gone (was {cls.__name__})"
        if now is not cls:
            return name, f"module is a {now.__name__}, was a {cls.__name__}"
    for name, cls in after.classes.items():
        if name not in before.classes:
            return name, f"module is new ({cls.__name__})"
    for name in before.tensors:
        if name not in after.tensors:
            module, leaf = split_name(name)
            return module, f"tensor {leaf!r} is gone"
    for name, t in after.tensors.items():
        module, leaf = split_name(name)
        if name not in before.tensors:
            return module, f"tensor {leaf!r} is new"
        diff = tensor_diff(before.tensors[name], t, atol=atol, rtol=rtol)
        if diff is not None:
            return module, f"tensor {leaf!r} {diff}"
        if before.requires_grad.get(name) != after.requires_grad.get(name):
            return module, f"parameter {leaf!r} has requires_grad={after.requires_grad.get(name)}, was {before.requires_grad.get(name)}"
    if before.state_keys != after.state_keys:
        gone = [k for k in before.state_keys if k not in after.state_keys]
        new = [k for k in after.state_keys if k not in before.state_keys]
        return None, f"state_dict keys differ (gone: {gone[:3]}, new: {new[:3]}, or reordered)"
    for name, counts in after.hooks.items():
        if dict(counts) != dict(before.hooks.get(name, {})):
            return name, f"hooks are {dict(counts)}, were {dict(before.hooks.get(name, {}))}"
    for name, counts in before.hooks.items():
        if name not in after.hooks:
            return name, f"hooks are gone, were {dict(counts)}"
    if before.text != after.text:
        lines = zip(before.text.splitlines(), after.text.splitlines())
        first = next(((x, y) for x, y in lines if x != y), ("(shorter)", "(longer)"))
        return None, f"module structure differs: {first[1].strip()!r}, was {first[0].strip()!r}"
    return None


# -- hooks and parametrizations ----------------------------------------------------------------
def hook_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Hook counts per module, only modules with at least one hook: ``{name: {kind: n}}``.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> _ = m[0].register_forward_hook(lambda *a: None)
        >>> hook_counts(m)
        {'0': {'forward hook': 1}}
    """
    out: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        counts = {kind: len(getattr(module, attr, None) or ()) for kind, attr in HOOK_KINDS.items()}
        counts = {k: n for k, n in counts.items() if n}
        if counts:
            out[name] = counts
    return out


def global_hook_counts() -> dict[str, int]:
    """How many global module hooks (``nn.modules.module.register_module_*_hook``) are set."""
    from torch.nn.modules import module as mod

    return {name: len(getattr(mod, name, None) or ()) for name in _GLOBAL_HOOKS}


def parametrized_modules(model: nn.Module) -> set[str]:
    """Qualified names of the modules that carry a parametrization.

    Example:
        >>> from torch import nn
        >>> parametrized_modules(nn.Linear(2, 2))
        set()
    """
    return {name for name, m in model.named_modules(remove_duplicate=False) if parametrize.is_parametrized(m)}
