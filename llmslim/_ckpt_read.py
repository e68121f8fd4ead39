"""Loading a checkpoint folder into a freshly built model: replay module swaps, then fill tensors
module by module straight from the safetensors files (lazily), re-tie aliases, verify."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._ckpt_kinds import kind_class
from ._ckpt_manifest import read_manifest, verify_files
from ._ckpt_structure import apply_structure_
from ._rollback import Journal
from ._targets import replace_module_
from .calibration._memory import return_free_memory
from .errors import CheckpointError

__all__ = ["load_folder"]


class _Tensors:
    """Every tensor of the folder's files by name, read from disk only when asked for."""

    def __init__(self, folder: Path, files: list[str], stack: contextlib.ExitStack) -> None:
        from safetensors import safe_open

        self.where: dict[str, tuple[str, Any]] = {}
        for fname in files:
            try:
                handle = stack.enter_context(safe_open(str(folder / fname), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{folder / fname}: not a readable safetensors file ({exc})") from None
            for key in handle.keys():
                if key in self.where:
                    raise CheckpointError(f"tensor {key!r} is stored twice ({self.where[key][0]} and {fname})")
                self.where[key] = (fname, handle)
        self.used: set[str] = set()

    def get(self, key: str) -> torch.Tensor:
        fname, handle = self.where[key]
        self.used.add(key)
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{fname}: cannot read tensor {key!r} ({exc})") from None

    def file_of(self, key: str) -> str:
        return self.where[key][0] if key in self.where else "(no file)"


def _swap_modules(model: nn.Module, entries: list[dict[str, Any]]) -> set[str]:
    """Build every manifest module empty and put it in place; tied ones after their owners."""
    prefixes: set[str] = set()
    for entry in sorted(entries, key=lambda e: "tied_to" in e):
        name, kind = entry["name"], entry["kind"]
        cls = kind_class(kind)
        tied = None
        if "tied_to" in entry:
            try:
                tied = model.get_submodule(entry["tied_to"])
            except AttributeError:
                raise CheckpointError(f"module {name!r} is tied to {entry['tied_to']!r}, which the model does not have") from None
        try:
            model.get_submodule(name)
            new = cls.from_checkpoint_config(dict(entry["config"]), tied=tied)
        except AttributeError:
            raise CheckpointError(f"the manifest replaces module {name!r}, which the model does not have: build the same architecture") from None
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"module {name!r}: cannot build a {kind} from the manifest's config ({type(exc).__name__}: {exc})") from None
        replace_module_(model, name, new)
        prefixes.add(name + ".")
    return prefixes


def _units(module: nn.Module, prefix: str, kinds: set[str]) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(prefix, module, whole)``: a replaced module loads whole (its own load_state_dict), any
    other module its direct tensors only."""
    if prefix in kinds:
        yield prefix, module, True
        return
    yield prefix, module, False
    for name, child in module._modules.items():
        if child is not None:
            yield from _units(child, f"{prefix}{name}.", kinds)


def _fail(reader: _Tensors, prefix: str, keys: list[str], problems: list[str]) -> None:
    files = sorted({reader.file_of(k) for k in keys}) or ["(no file)"]
    raise CheckpointError(f"module {prefix[:-1] or '(root)'!r} ({', '.join(files)}): " + "; ".join(problems))


def _load_unit(reader: _Tensors, prefix: str, module: nn.Module, whole: bool, manifest: dict[str, Any]) -> None:
    aliases, extra = manifest["aliases"], set(manifest["non_persistent"])
    if whole:
        keys = [k for k in reader.where if k.startswith(prefix)]
        state = {k[len(prefix):]: reader.get(k) for k in keys}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            _fail(reader, prefix, keys, [" ".join(str(exc).split())])
        return
    own = [n for n, p in module._parameters.items() if p is not None]
    own += [n for n, b in module._buffers.items() if b is not None and (n not in module._non_persistent_buffers_set or prefix + n in extra)]
    keys = [prefix + n for n in own if prefix + n not in aliases]
    missing = [k for k in keys if k not in reader.where]
    if missing:
        _fail(reader, prefix, keys, [f"missing tensor(s) {missing}"])
    state = {k: reader.get(k) for k in keys}
    persistent = {k: v for k, v in state.items() if k not in extra}
    errors: list[str] = []
    unexpected: list[str] = []
    module._load_from_state_dict(persistent, prefix, {"assign_to_params_buffers": True}, True, [], unexpected, errors)
    for k in extra & set(state):
        name = k[len(prefix):]
        current = module._buffers[name]
        if tuple(current.shape) != tuple(state[k].shape):
            errors.append(f"{k}: shape {tuple(state[k].shape)}, expected {tuple(current.shape)}")
        else:
            module._buffers[name] = state[k]
    if errors or unexpected:
        _fail(reader, prefix, keys, [" ".join(e.split()) for e in errors] + ([f"unexpected tensor(s) {unexpected}"] if unexpected else []))


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    for alias, target in aliases.items():
        try:
            src_mod, _, src_name = target.rpartition(".")
            dst_mod, _, dst_name = alias.rpartition(".")
            src, dst = model.get_submodule(src_mod), model.get_submodule(dst_mod)
        except AttributeError:
            raise CheckpointError(f"alias {alias!r} -> {target!r} names a module the model does not have") from None
        value = src._parameters.get(src_name, src._buffers.get(src_name))
        if value is None:
            raise CheckpointError(f"alias {alias!r} -> {target!r}: {target!r} was not loaded")
        if dst_name in dst._parameters and isinstance(value, nn.Parameter):
            dst._parameters[dst_name] = value
        elif dst_name in dst._buffers:
            dst._buffers[dst_name] = value
        else:
            raise CheckpointError(f"alias {alias!r}: the model has no parameter or buffer of that name to tie")


def _check_loaded(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)] if t.device.type == "meta"]
    if left:
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise CheckpointError(f"the checkpoint has no values for {len(left)} tensor(s) of the model, left on meta: {shown}")


def load_folder(path: Path, model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` in place (see :func:`llmslim.load`)."""
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    for entry in manifest["modules"]:
        kind_class(entry["kind"])  # refuse unknown kinds before touching anything
    if verify:
        verify_files(folder, manifest)
    journal = Journal(model)
    try:
        with contextlib.ExitStack() as stack:
            reader = _Tensors(folder, list(manifest["files"]), stack)
            apply_structure_(model, manifest.get("structure"))  # smaller shapes first, then the swaps
            kinds = _swap_modules(model, manifest["modules"])
            with torch.no_grad():
                for prefix, module, whole in _units(model, "", kinds):
                    _load_unit(reader, prefix, module, whole, manifest)
                    if whole:
                        # Converting a layer to its kernel format frees scratch several times its
                        # size; glibc keeps such holes mapped and the loaded tensors land between
                        # them, so without this resident memory climbs to about twice the checkpoint.
                        return_free_memory()
            unused = sorted(set(reader.where) - reader.used)
            if unused:
                shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
                raise CheckpointError(f"{folder}: {len(unused)} stored tensor(s) match nothing in the model: {shown} (another architecture?)")
            _retie(model, manifest["aliases"])
            _check_loaded(model)
    except BaseException:
        journal.rollback()
        raise
    return model
