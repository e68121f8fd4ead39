"""Structural changes (fewer blocks, heads, channels) as plain data: recorded by structural passes,
written to the manifest's ``structure`` entry, replayed on a freshly built model before its tensors load.

A structural pass records on the model root (attribute :data:`ATTR`) the config values it changed
and, per block list it shortened, which original blocks remain. At save time the manifest adds
the shape of every plain ``nn.Linear``, the sizes of every other layer structured pruning can cut
(transformers' ``Conv1D``, convolutions, batch norms: ``resized``), and the integer attributes
attention and MLP modules read at forward time (``num_key_value_groups``, ``layer_idx``,
``split_size``, ``intermediate_size`` ...), so loading
into a model built from the *original* config, or from the saved (updated) config, both work:
block lists are cut only when the skeleton still has the original length, and a ``Linear`` is
rebuilt only where its shape differs.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .errors import CheckpointError

__all__ = ["ATTR", "record_", "structure_of", "apply_structure_", "fresh_config_", "check_structure"]

ATTR = "llmslim_structure"
# module attributes that hold head counts, layer indices or widths read at forward time
_INT_ATTRS = ("num_key_value_groups", "num_heads", "num_key_value_heads", "layer_idx", "intermediate_size",
              "split_size", "num_attention_heads", "all_head_size")


def _sliceable(module: nn.Module) -> Any:
    from .prune.structured._slicing import sliceable  # the registry of layers structured pruning cuts

    return sliceable(module)


def _resized(model: nn.Module) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        spec = None if type(m) is nn.Linear else _sliceable(m)
        if spec is not None:
            out[name] = {"type": type(m).__name__, **spec.sizes(m)}
    return out


def fresh_config_(model: nn.Module) -> Any:
    """Give ``model`` (and every submodule sharing it) a copy of its config; return the copy.

    Copy-on-write, so the rollback journal (which restores module attributes, not the config
    object's contents) undoes config edits by restoring the old references. ``None`` without a config.
    """
    old = getattr(model, "config", None)
    if old is None:
        return None
    new = copy.deepcopy(old)
    for module in model.modules():
        if vars(module).get("config") is old:
            vars(module)["config"] = new
    return new


def record_(model: nn.Module, *, config: dict[str, Any] | None = None, layers: tuple[str, int, list[int]] | None = None) -> None:
    """Note structural changes on ``model``: changed config values, and ``(list_name, old_len, kept)``
    for a block list cut to the members ``kept`` (indices into its current members)."""
    current = getattr(model, ATTR, None) or {"config": {}, "layers": {}}
    new = {"config": {**current["config"], **(config or {})}, "layers": dict(current["layers"])}
    if layers is not None:
        name, length, kept = layers
        prev = new["layers"].get(name)
        new["layers"][name] = (
            {"of": prev["of"], "kept": [prev["kept"][i] for i in kept]} if prev else {"of": length, "kept": list(kept)}
        )
    setattr(model, ATTR, new)  # a new dict each time: the journal restores the old one


def structure_of(model: nn.Module) -> dict[str, Any] | None:
    """The manifest's ``structure`` entry for ``model``, or ``None`` when no structural pass ran."""
    rec = getattr(model, ATTR, None)
    if not rec:
        return None
    linear = {name: [m.in_features, m.out_features, m.bias is not None] for name, m in model.named_modules() if type(m) is nn.Linear}
    attributes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        found = {a: v for a in _INT_ATTRS if isinstance(v := vars(module).get(a), int) and not isinstance(v, bool)}
        if found:
            attributes[name] = found
    out = {"config": copy.deepcopy(rec["config"]), "layers": copy.deepcopy(rec["layers"]), "linear": linear, "attributes": attributes}
    resized = _resized(model)
    if resized:
        out["resized"] = resized
    return out


def check_structure(data: Any, where: Any) -> None:
    """Raise ``CheckpointError`` unless ``data`` is ``None`` or a well-formed ``structure`` entry."""
    if data is None:
        return
    ok = isinstance(data, dict) and set(data) <= {"config", "layers", "linear", "attributes", "resized"}
    ok = ok and isinstance(data.get("config", {}), dict) and isinstance(data.get("layers", {}), dict)
    ok = ok and all(isinstance(v, dict) and isinstance(v.get("of"), int) and isinstance(v.get("kept"), list)
                    and all(isinstance(i, int) and 0 <= i < v["of"] for i in v["kept"]) for v in data.get("layers", {}).values())
    ok = ok and all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) for x in v) for v in data.get("linear", {}).values())
    ok = ok and all(isinstance(v, dict) and all(isinstance(x, int) for x in v.values()) for v in data.get("attributes", {}).values())
    ok = ok and isinstance(data.get("resized", {}), dict) and all(
        isinstance(v, dict) and isinstance(v.get("type"), str) and all(isinstance(x, int) for k, x in v.items() if k != "type")
        for v in data.get("resized", {}).values())
    if not ok:
        raise CheckpointError(f"{where}: malformed manifest: 'structure' must be null or hold config, layers, linear, attributes, resized")


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"the manifest's structure names module {name!r}, which the model does not have: build the same architecture") from None


def apply_structure_(model: nn.Module, data: dict[str, Any] | None) -> None:
    """Replay ``data`` (a manifest ``structure`` entry) on a freshly built ``model``, in place.

    Raises:
        CheckpointError: A block list of neither the original nor the final length, or a
            named module the model does not have.
    """
    if not data:
        return
    for name, cut in data.get("layers", {}).items():
        container = _module(model, name)
        if not isinstance(container, nn.ModuleList):
            raise CheckpointError(f"the manifest's structure cuts {name!r}, which is a {type(container).__name__}, not a ModuleList")
        if len(container) == len(cut["kept"]):
            continue  # built from the saved config: already the final length
        if len(container) != cut["of"]:
            raise CheckpointError(f"{name!r} has {len(container)} blocks; the checkpoint keeps {len(cut['kept'])} of {cut['of']}")
        parent, _, child = name.rpartition(".")
        setattr(_module(model, parent) if parent else model, child, nn.ModuleList(container[i] for i in cut["kept"]))
    for name, (fan_in, fan_out, bias) in data.get("linear", {}).items():
        old = _module(model, name)
        if type(old) is not nn.Linear:
            raise CheckpointError(f"the manifest's structure gives {name!r} Linear shapes, but the model's module is a {type(old).__name__}")
        if (old.in_features, old.out_features, old.bias is not None) != (fan_in, fan_out, bool(bias)):
            new = nn.Linear(fan_in, fan_out, bias=bool(bias), device=old.weight.device, dtype=old.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(_module(model, parent) if parent else model, child, new)
    for name, entry in data.get("resized", {}).items():
        old = _module(model, name)
        spec = _sliceable(old)
        if spec is None or type(old).__name__ != entry["type"]:
            raise CheckpointError(f"the manifest's structure gives {name!r} the sizes of a {entry['type']}, but the model's module is a {type(old).__name__}")
        sizes = {k: v for k, v in entry.items() if k != "type"}
        if spec.sizes(old) != sizes:
            parent, _, child = name.rpartition(".")
            setattr(_module(model, parent) if parent else model, child, spec.resize(old, sizes).train(old.training))
    for name, attrs in data.get("attributes", {}).items():
        module = _module(model, name)
        for key, value in attrs.items():
            if key in _INT_ATTRS:
                setattr(module, key, value)
    if data.get("config") and getattr(model, "config", None) is not None:
        config = fresh_config_(model)
        for key, value in data["config"].items():
            if value is not None:
                setattr(config, key, copy.deepcopy(value))
            elif key in vars(config):
                delattr(config, key)
    setattr(model, ATTR, {"config": copy.deepcopy(data.get("config", {})), "layers": copy.deepcopy(data.get("layers", {}))})
