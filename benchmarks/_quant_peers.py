"""Peers and storage accounting for ``quant_quality.py``: torchao 0.18 and ``torch.ao`` applied to
the same layers our passes quantize, and the true bytes each leaves behind.

torchao's weights are tensor subclasses whose ``numel * element_size`` is the logical float size,
so bytes are counted through ``__tensor_flatten__`` (the tensors the subclass really holds).
A peer method that cannot run on this machine raises :class:`Unavailable` with the reason, which
the benchmark records instead of dropping the row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


class Unavailable(RuntimeError):
    """A peer method that does not run here (the message says why)."""


def target_names(model: nn.Module) -> list[str]:
    """The linear layers every method quantizes: all ``nn.Linear`` but ``lm_head``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds (the inner tensors of a tensor subclass)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = flatten()
        return sum(stored_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n, None), torch.Tensor))
    return t.numel() * t.element_size()


def _own_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _packed_bytes(module: nn.Module) -> int:
    # torch.ao's dynamic linear keeps its weight in a packed C++ object, not a parameter
    packed = getattr(module, "_packed_params", None)
    if packed is None or not hasattr(module, "weight") or not callable(module.weight):
        return 0
    w = module.weight()
    scales = w.q_per_channel_scales().numel() * 8 if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else 8
    return w.numel() * w.element_size() + scales


def linear_bytes(model: nn.Module, names: list[str], shapes: dict[str, tuple[int, int]]) -> dict[str, float | int]:
    """Bytes per weight of the named layers (codes, scales, zero points; biases excluded), and how
    many of them still hold a plain float weight (left unquantized)."""
    held = weights = left_float = 0
    for name in names:
        module = model.get_submodule(name)
        out_f, in_f = shapes[name]
        weights += out_f * in_f
        held += _packed_bytes(module)
        held += sum(stored_bytes(t) for n, t in _own_tensors(module) if not n.endswith("bias"))
        w = getattr(module, "weight", None)
        if type(module) is nn.Linear and type(w) in (torch.Tensor, nn.Parameter) and w.is_floating_point():
            left_float += 1
    return {"bytes_per_weight": held / weights, "float_layers": left_float}


def model_bytes(model: nn.Module) -> int:
    """True storage bytes of the whole model (tied tensors once, packed peers included)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        total += _packed_bytes(m)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                total += stored_bytes(t)
    return total


def _filter(names: set[str]) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: fqn in names


def _torchao(config_name: str, group_size: int | None) -> object:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm, Int4PackingFormat
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import IntxChooseQParamsAlgorithm

    return {
        "int8 weight-only": lambda: Int8WeightOnlyConfig(),
        "int8 dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "int4 weight-only": lambda: Int4WeightOnlyConfig(group_size=group_size),
        "int4 hqq": lambda: Int4WeightOnlyConfig(
            group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D,
            int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm.HQQ),
        "intx4 asymmetric": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                                         mapping_type=MappingType.ASYMMETRIC),
        "intx4 hqq scale-only": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                                             intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY),
    }[config_name]()


def torchao_(model: nn.Module, config_name: str, group_size: int | None = None) -> dict[str, object]:
    """Apply a torchao 0.18 config to the target linears (in place); probe one layer first so an
    unsupported method fails fast with its reason.

    Raises:
        Unavailable: torchao is missing or the method has no CPU path here.
    """
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise Unavailable(f"torchao not importable: {exc}") from exc
    names = target_names(model)
    notes: dict[str, object] = {}
    if group_size is not None:
        skipped = [n for n in names if model.get_submodule(n).in_features % group_size]
        notes["layers_torchao_skips"] = len(skipped)  # int4 configs leave these in float silently
    failures = []
    for dtype in (torch.float32, torch.bfloat16):  # bf16 too: some layouts refuse float32 first
        probe = nn.Sequential(nn.Linear(group_size or 64, 8)).to(dtype)
        try:
            quantize_(probe, _torchao(config_name, group_size))
            probe(torch.randn(2, group_size or 64, dtype=dtype))
            break
        except Exception as exc:  # any failure here means "no CPU path": record the reason
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{str(dtype).removeprefix('torch.')}: {type(exc).__name__}: {first}")
    else:
        skips = f"; at this group size it would leave {notes['layers_torchao_skips']} of {len(names)} layers in float" if notes.get("layers_torchao_skips") else ""
        raise Unavailable(f"torchao {config_name} has no CPU path here ({'; '.join(failures)}){skips}")
    if failures:  # runs in bfloat16 only; our float32 model would need converting
        raise Unavailable(f"torchao {config_name} runs only on bfloat16 weights here ({failures[0]})")
    quantize_(model, _torchao(config_name, group_size), filter_fn=_filter(set(names)))
    return notes


@torch.no_grad()
def torchao_hqq_dequantized_(model: nn.Module, group_size: int) -> dict[str, object]:
    """torchao's asymmetric HQQ parameters (``_choose_qparams_and_quantize_affine_hqq``, the grid of
    ``Int4WeightOnlyConfig(int4_choose_qparams_algorithm=HQQ)``, which only packs for CUDA) with
    bf16 scales and zeros, written back dequantized: the quality of that method, not its storage."""
    try:
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq
    except ImportError as exc:
        raise Unavailable(f"torchao not importable: {exc}") from exc
    skipped = 0
    for name in target_names(model):
        layer = model.get_submodule(name)
        if layer.in_features % group_size:
            skipped += 1  # torchao's int4 configs skip such layers too
            continue
        w = layer.weight.detach()
        q, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            w, nbits=4, group_size=group_size, axis=1, compute_dtype=torch.bfloat16, device="cpu", raw_output=True)
        groups = w.shape[1] // group_size
        deq = (q.float().reshape(w.shape[0], groups, group_size) - zero.float()[..., None]) * scale.float()[..., None]
        layer.weight.copy_(deq.reshape(w.shape).to(w.dtype))
    return {"layers_left_float": skipped, "storage": "not measured: simulated (dequantized float weights)"}


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` (int8 dynamic, per tensor) on the target linears."""
    names = set(target_names(model))
    from torch.ao.quantization import quantize_dynamic as qd
    from torch.ao.quantization.qconfig import default_dynamic_qconfig

    return qd(model, {n: default_dynamic_qconfig for n in names}, inplace=True)
