"""GPTQ checkpoint folders: write a model with :class:`QuantLinear` layers in the layout the
ecosystem loads, and read such a folder back into ``QuantLinear`` layers.

A folder holds ``model.safetensors`` (``<module>.qweight/.qzeros/.scales/.g_idx[/.bias]`` for
every quantized layer, the plain tensors for everything else; a checkpoint sharded with
``model.safetensors.index.json`` is read too), ``quantize_config.json`` and, for a transformers
model, its ``config.json`` with a ``quantization_config`` entry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._targets import replace_module_
from ..errors import CheckpointError, ConfigError
from ._embedding import QuantEmbedding
from ._gptq_format import _check_format, from_gptq_tensors, to_gptq_tensors
from ._linear import SCALE_DTYPES, QuantLinear, float_weight
from ._packed import PackedLinear

__all__ = ["export_gptq", "import_gptq"]

_CHECKPOINT_FORMAT = {"v1": "gptq", "v2": "gptq_v2"}
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")


def _refuse_other_compressed(model: nn.Module) -> None:
    from ..prune._storage import SparseLinear  # the prune package imports quant: import late

    for name, module in model.named_modules():
        tied = isinstance(module, QuantLinear) and module._tied_to is not None
        other = isinstance(module, (PackedLinear, QuantEmbedding, SparseLinear)) and not isinstance(module, QuantLinear)
        if tied or other or parametrize.is_parametrized(module):
            what = "a tied QuantLinear" if tied else type(module).__name__ if other else "a parametrized module (masks, fake quantization)"
            raise ConfigError(f"export_gptq: module {name!r} is {what}, which the GPTQ layout cannot hold; only QuantLinear layers and float modules can be exported")


def _common_settings(layers: dict[str, QuantLinear]) -> tuple[int, int, bool]:
    # One bits / group size / symmetry for the whole checkpoint, as quantize_config.json says.
    bits = {m.bits for m in layers.values()}
    sym = {m.symmetric for m in layers.values()}
    groups = {m.group_size for m in layers.values() if m.group_size is not None}
    if len(bits) > 1 or len(sym) > 1 or len(groups) > 1:
        raise ConfigError(f"export_gptq: every QuantLinear must share bits, group size and symmetry (got bits {sorted(bits)}, group sizes {sorted(groups)}, symmetric {sorted(sym)})")
    group = groups.pop() if groups else -1
    for name, m in layers.items():
        if m.group_size is None and group != -1 and m.in_features > group:
            raise ConfigError(f"export_gptq: {name!r} has one scale per output channel while the others have group size {group}")
    return bits.pop(), group, sym.pop()


def _tensors(model: nn.Module, layers: dict[str, QuantLinear], fmt: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        try:
            gptq = to_gptq_tensors(layer, dtype=dtype, format=fmt)
        except ConfigError as exc:
            raise ConfigError(f"export_gptq: module {name!r}: {exc}") from None
        out.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in gptq.items()})
    seen: set[tuple[int, int]] = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in layers:
            continue
        where = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if where in seen:  # a tied weight: stored once (safetensors refuses shared storage)
            continue
        seen.add(where)
        out[key] = t.detach().cpu().contiguous()
    return out


def _write_folder(path: Path, files: dict[str, Any], overwrite: bool) -> None:
    from safetensors.torch import save_file

    if path.exists() and not overwrite:
        raise CheckpointError(f"export_gptq: {str(path)!r} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file(content, str(tmp / name), metadata={"format": "pt"})
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_gptq(model: nn.Module, path: str | os.PathLike[str], *, format: str = "v1", dtype: torch.dtype = torch.float16,
                overwrite: bool = False) -> Path:
    """Write ``model`` as a GPTQ checkpoint folder (atomically: a temporary folder, then a rename).

    Args:
        model: A model whose quantized layers are :class:`QuantLinear` (2, 4 or 8 bits, one
            bits / group size / symmetry for all of them); other modules are written as they are.
        path: The folder.
        format: ``"v1"`` (``checkpoint_format: "gptq"``, what every loader reads) or ``"v2"``
            (``"gptq_v2"``, GPTQModel).
        dtype: Dtype of the scales and quantized layers' biases (float16: the ecosystem's).
        overwrite: Replace an existing folder.

    Returns:
        The folder's path.

    Raises:
        ConfigError: No QuantLinear, a module the layout cannot hold (other compressed layers,
            3 bits, a zero point v1 cannot store ...), or layers with different settings.
        CheckpointError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> import tempfile, torch
        >>> import llmslim as ls
        >>> from llmslim.quant import RTN, export_gptq
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> _ = ls.compress_(model, RTN(bits=4, group_size=32, symmetric=True), progress=False)
        >>> folder = export_gptq(model, tempfile.mkdtemp() + "/gptq")
        >>> sorted(p.name for p in folder.iterdir())
        ['model.safetensors', 'quantize_config.json']
    """
    _check_format(format, "export_gptq")
    path = Path(path)
    _refuse_other_compressed(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ConfigError("export_gptq: the model has no QuantLinear layers (quantize it with rtn or gptq first)")
    bits, group, sym = _common_settings(layers)
    from .. import __version__

    qc = {
        "bits": bits,
        "group_size": group,
        "desc_act": False,  # our groups are contiguous: g_idx is arange(in) // group_size
        "static_groups": False,
        "sym": sym,
        "true_sequential": True,
        "quant_method": "gptq",
        "checkpoint_format": _CHECKPOINT_FORMAT[format],
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmslim:{__version__}"], "llmslim_scale_dtype": str(next(iter(layers.values())).scale_dtype).replace("torch.", "")},
    }
    files: dict[str, Any] = {"model.safetensors": _tensors(model, layers, format, dtype), "quantize_config.json": qc}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        cfg = json.loads(config.to_json_string(use_diff=False))
        cfg["quantization_config"] = qc
        files["config.json"] = cfg
    _write_folder(path, files, overwrite)
    return path


def _read_config(path: Path) -> dict[str, Any]:
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        f = path / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CheckpointError(f"import_gptq: {name} is not valid JSON ({exc})") from None
            data = data.get(key) if key else data
            if isinstance(data, dict):
                return data
    raise CheckpointError(f"import_gptq: {str(path)!r} has no quantize_config.json nor a config.json with a quantization_config")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
        return load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"import_gptq: cannot read the tensors of {str(path)!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupted files
        raise CheckpointError(f"import_gptq: cannot read the tensors of {str(path)!r}: {exc}") from None


def _settings(qc: dict[str, Any]) -> tuple[int, int | None, bool, str]:
    if str(qc.get("quant_method", "gptq")).lower() != "gptq":
        raise CheckpointError(f"import_gptq: quant_method must be 'gptq' (got {qc.get('quant_method')!r})")
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    formats = {v: k for k, v in _CHECKPOINT_FORMAT.items()}
    if fmt not in formats:
        raise CheckpointError(f"import_gptq: checkpoint_format must be 'gptq' or 'gptq_v2' (got {fmt!r}; kernel-specific layouts such as marlin are not read)")
    try:
        bits, group, sym = int(qc["bits"]), qc.get("group_size", -1), bool(qc.get("sym", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"import_gptq: quantize config lacks a valid {exc}") from None
    return bits, None if group in (None, -1) else int(group), sym, formats[fmt]


def import_gptq(path: str | os.PathLike[str], model: nn.Module, *, scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Load a GPTQ checkpoint folder into ``model``, swapping its quantized layers for :class:`QuantLinear`.

    ``model`` is freshly built (on CPU, or with its parameters on the ``meta`` device: they are
    replaced by the file's tensors, cast to each parameter's dtype). Tied parameters receive the
    one tensor stored for them.

    Args:
        path: A folder written by :func:`export_gptq` or by GPTQ tools (v1 or v2 format,
            contiguous groups).
        model: The float model the checkpoint was made from.
        scale_dtype: Dtype of the layers' scales; default: the one recorded by :func:`export_gptq`
            (an exact round trip), else the file's (float16).

    Returns:
        ``model``, edited in place.

    Raises:
        CheckpointError: Missing or unreadable files, tensors that do not fit the model, tensors
            missing or left over, a tensor still on the meta device after loading.
        ConfigError: A layer our groups cannot express (act-order ``g_idx``), 3 bits.

    Example:
        >>> import tempfile, torch
        >>> import llmslim as ls
        >>> from llmslim.quant import RTN, export_gptq, import_gptq
        >>> torch.manual_seed(0); model = torch.nn.Sequential(torch.nn.Linear(64, 32))  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> _ = ls.compress_(model, RTN(bits=4, group_size=32, symmetric=True), progress=False)
        >>> folder = export_gptq(model, tempfile.mkdtemp() + "/gptq", dtype=torch.float32)
        >>> fresh = import_gptq(folder, torch.nn.Sequential(torch.nn.Linear(64, 32)))
        >>> x = torch.randn(2, 64); torch.equal(fresh(x), model(x))
        True
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"import_gptq: {str(path)!r} is not a folder")
    qc = _read_config(path)
    bits, group, sym, fmt = _settings(qc)
    recorded = (qc.get("meta") or {}).get("llmslim_scale_dtype") if isinstance(qc.get("meta"), dict) else None
    scale_dtype = scale_dtype or SCALE_DTYPES.get(str(recorded))
    tensors = _read_tensors(path)
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    aliases: dict[int, list[str]] = {}
    for key, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        aliases.setdefault(id(p), []).append(key)
    for prefix in prefixes:
        try:
            module = model.get_submodule(prefix)
            w, _ = float_weight(module)
        except (AttributeError, ConfigError):
            raise CheckpointError(f"import_gptq: {prefix + '.qweight'!r} has no linear layer {prefix!r} in the model") from None
        out_features, in_features = w.shape
        mine = {p[1:]: tensors.pop(prefix + p) for p in _PARTS if prefix + p in tensors}
        try:
            new = from_gptq_tensors(mine, bits=bits, group_size=group, sym=sym, in_features=in_features, out_features=out_features,
                                    format=fmt, scale_dtype=scale_dtype, weight_dtype=w.dtype)
        except (ConfigError, CheckpointError) as exc:
            raise type(exc)(f"import_gptq: module {prefix!r}: {exc}") from None
        replace_module_(model, prefix, new)
    _load_plain(model, tensors, aliases, set(prefixes))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"import_gptq: still on the meta device after loading (not in the checkpoint): {', '.join(left[:5])}")
    return model


def _load_plain(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[int, list[str]], quantized: set[str]) -> None:
    state = model.state_dict(keep_vars=True)
    unexpected = [k for k in tensors if k not in state]
    if unexpected:
        raise CheckpointError(f"import_gptq: tensors the model has no place for: {', '.join(unexpected[:5])}")
    for names in aliases.values():  # a tied parameter stored once under one of its names
        have = next((n for n in names if n in tensors), None)
        if have is not None:
            tensors.update({n: tensors[have] for n in names if n in state and n not in tensors})
    missing = [k for k in state if k not in tensors and k.rpartition(".")[0] not in quantized]
    if missing:
        raise CheckpointError(f"import_gptq: tensors missing from the checkpoint: {', '.join(missing[:5])}")
    loaded, cast = {}, {}
    for k, t in tensors.items():
        if tuple(t.shape) != tuple(state[k].shape):
            raise CheckpointError(f"import_gptq: tensor {k!r}: shape {tuple(t.shape)}, the model's is {tuple(state[k].shape)}")
        key = (id(t), state[k].dtype)  # tied names share one converted tensor
        loaded[k] = cast[key] = cast.get(key, t.to(state[k].dtype))
    meta = any(t.device.type == "meta" for t in state.values())
    model.load_state_dict(loaded, strict=False, assign=meta)
