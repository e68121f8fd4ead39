"""Compressed checkpoints (llmslim.io): exact round trips for every registered pass and chains,
meta-device loading, and a clean CheckpointError for every kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim import _ckpt_write, models
from llmslim.errors import CheckpointError, RegistryError, TargetError
from llmslim.io import register_module_kind

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
DIMS = dict(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1)  # small: the whole file runs in seconds
CALIB = [{"input_ids": IDS[i : i + 1]} for i in range(2)]
# passes whose defaults do not fit a 64-wide model, or that leave nothing to check: tiny-model settings
SETTINGS = {
    "gptq": {"group_size": 16, "clip": "minmax"},
    "rtn": {"group_size": 16},
    "qat": {"group_size": 16},
    "magnitude": {"sparsity": 0.5},
    "wanda": {"sparsity": 0.5},
    "sparsegpt": {"sparsity": 0.5},
}


def build(name: str, **fields):
    return ls.get_pass(name)(**{**SETTINGS.get(name, {}), **fields})


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def round_trip(model: nn.Module, arch: str, tmp: Path, **build_kw) -> nn.Module:
    folder = ls.save(model, tmp / "ckpt", overwrite=True)
    with torch.device("meta"):
        skeleton = models.tiny(arch, **DIMS, **build_kw)
    return ls.load(folder, skeleton)


def compressed(arch: str, *passes, **build_kw) -> nn.Module:
    model = models.tiny(arch, **DIMS, **build_kw)
    ls.compress_(model, *passes, calibration=CALIB, progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", [n for n in ls.available_passes() if not n.startswith("toy-")])
def test_every_registered_pass_round_trips_bit_for_bit(name: str, arch: str, tmp_path) -> None:
    try:  # structural passes cover LLaMA-family decoders of 2+ blocks (tests/test_prune_structured.py)
        build(name).select(models.tiny(arch, **DIMS))
    except TargetError as exc:
        pytest.skip(f"pass {name!r} does not apply to {arch}: {exc}")
    model = compressed(arch, build(name))
    loaded = round_trip(model, arch, tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize(
    ("arch", "chain"),
    [
        ("llama", [("wanda", {"pattern": "2:4"}), ("rtn", {"storage": "sparse"})]),
        ("qwen2", [("sparsegpt", {}), ("gptq", {"storage": "sparse"})]),
        ("llama", [("rtn", {"embeddings": True})]),  # untied: embedding and lm_head on their own
        ("gpt2", [("rtn", {"embeddings": True})]),  # tied: lm_head reads the embedding's table
        ("opt", [("magnitude", {"storage": "compressed", "value_dtype": "float16"})]),
        ("gpt2", [("smoothquant", {}), ("w8a8", {})]),
    ],
)
def test_chains_and_sparse_storage_round_trip(arch: str, chain, tmp_path) -> None:
    model = compressed(arch, *(build(n, **kw) for n, kw in chain))
    kinds = {type(m).__name__ for m in model.modules()}
    loaded = round_trip(model, arch, tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert {type(m).__name__ for m in loaded.modules()} == kinds
    assert ls.model_bytes(loaded) == ls.model_bytes(model)
    if arch == "gpt2" and chain[0][0] == "rtn":
        assert loaded.lm_head.checkpoint_tied() is loaded.transformer.wte  # the table is held once


def test_sparse_quant_and_sparse_linear_are_stored_compressed(tmp_path) -> None:
    model = compressed("llama", build("wanda", pattern="2:4"), build("rtn", storage="sparse"))
    assert any(type(m).__name__ == "SparseQuantLinear" for m in model.modules())
    folder = ls.save(model, tmp_path / "c")
    manifest = json.loads((folder / "llmslim.json").read_text())
    cfg = next(e["config"] for e in manifest["modules"] if e["kind"] == "SparseQuantLinear")
    assert cfg["format"] == "nm" and (cfg["n"], cfg["m"]) == (2, 4)
    # on disk: about the in-memory bytes (the file adds a small header)
    assert (folder / "model.safetensors").stat().st_size < ls.model_bytes(model) * 1.03 + 64 * 1024


def test_meta_loading_never_materialises_the_float_weights(tmp_path) -> None:
    model = compressed("llama", build("rtn"))
    loaded = round_trip(model, "llama", tmp_path)
    layer = loaded.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "QuantLinear"
    floats = [n for n, t in loaded.named_buffers() if n.startswith("model.layers.0.mlp.up_proj") and t.is_floating_point() and t.dtype == torch.float32]
    assert "weight" not in layer._parameters and not floats
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert ls.model_bytes(loaded) == ls.model_bytes(model) < ls.model_bytes(models.tiny("llama", **DIMS))


def test_loading_hands_scratch_memory_back_after_each_replaced_module(tmp_path, monkeypatch) -> None:
    # converting a layer to its kernel format frees scratch; without handing it back, resident
    # memory while loading SmolLM2 climbed to ~1.9x the checkpoint (benchmarks/checkpoint.py)
    from llmslim import _ckpt_read

    model = compressed("llama", build("rtn"))
    calls: list[int] = []
    monkeypatch.setattr(_ckpt_read, "return_free_memory", lambda: calls.append(1))
    round_trip(model, "llama", tmp_path)
    replaced = sum(type(m).__name__ == "QuantLinear" for m in model.modules())
    assert replaced and len(calls) >= replaced


def test_manifest_records_recipe_versions_kinds_and_checksums(tmp_path) -> None:
    manager = ls.PassManager([build("rtn")])
    model = models.tiny("llama", **DIMS)
    ls.compress_(model, manager, progress=False)
    folder = ls.save(model, tmp_path / "c", recipe=manager.to_recipe())
    m = json.loads((folder / "llmslim.json").read_text())
    assert m["format_version"] == 1 and m["llmslim_version"] == ls.__version__
    assert m["recipe"]["passes"][0]["pass"] == "rtn"
    entry = next(e for e in m["modules"] if e["name"] == "model.layers.0.self_attn.q_proj")
    assert entry["kind"] == "QuantLinear" and entry["config"]["bits"] == 4 and entry["config"]["group_size"] == 16
    assert len(m["files"]["model.safetensors"]["sha256"]) == 64


def test_sharded_save_writes_an_index_and_loads(tmp_path) -> None:
    model = compressed("llama", build("rtn"))
    folder = ls.save(model, tmp_path / "c", shard_bytes=5_000)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith("-of-" + f"{len(shards):05d}.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with torch.device("meta"):
        skeleton = models.tiny("llama", **DIMS)
    assert torch.equal(logits(ls.load(folder, skeleton)), logits(model))
    # a skeleton on CPU with other random weights: every tensor is replaced
    assert torch.equal(logits(ls.load(folder, models.tiny("llama", **DIMS, seed=5))), logits(model))


def test_training_time_parametrizations_are_refused(tmp_path) -> None:
    model = models.tiny("llama", **DIMS)
    manager = ls.PassManager([build("qat")])
    manager.apply(model)  # prepared, not finalized: fake quantization still attached
    with pytest.raises(CheckpointError, match="finalize"):
        ls.save(model, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# -- damage: each a clean CheckpointError, and the model handed in is left as it was ------------------
@pytest.fixture
def saved(tmp_path):
    model = compressed("llama", build("rtn"))
    return model, ls.save(model, tmp_path / "c")


def _fresh() -> nn.Module:
    return models.tiny("llama", **DIMS)


def _assert_untouched(model: nn.Module) -> None:
    assert torch.equal(logits(model), logits(_fresh()))
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())


def _edit_manifest(folder: Path, fn) -> None:
    path = folder / "llmslim.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_newer_format_version_is_refused(saved) -> None:
    _, folder = saved
    _edit_manifest(folder, lambda m: m.update(format_version=99))
    model = _fresh()
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        ls.load(folder, model)
    _assert_untouched(model)


def test_tampered_class_name_is_refused(saved) -> None:
    _, folder = saved
    _edit_manifest(folder, lambda m: m["modules"][0].update(kind="os.system"))
    with pytest.raises(CheckpointError, match="'os.system' is not allowed"):
        ls.load(folder, _fresh())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_or_truncated_file_is_refused(saved, damage: str) -> None:
    _, folder = saved
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 100]
    path.write_bytes(bytes(data))
    model = _fresh()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ls.load(folder, model)
    _assert_untouched(model)


def _rewrite(folder: Path, edit) -> None:
    """Rewrite the tensor file through ``edit(tensors)`` and fix the checksums: damage that only
    the structural checks can catch."""
    from safetensors.torch import load_file, save_file

    from llmslim._ckpt_manifest import sha256_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    _edit_manifest(folder, lambda m: m["files"]["model.safetensors"].update(sha256=sha256_file(path), bytes=path.stat().st_size))


def test_missing_tensor_is_named(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda t: t.pop("model.norm.weight"))
    model = _fresh()
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        ls.load(folder, model)
    _assert_untouched(model)


def test_missing_packed_tensor_is_named(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda t: t.pop("model.layers.0.mlp.down_proj.scales"))
    model = _fresh()
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj.*scales"):
        ls.load(folder, model)
    _assert_untouched(model)


def test_shape_mismatch_and_extra_tensors_are_named(saved) -> None:
    _, folder = saved
    _rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(3), "model.surprise": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*shape"):
        ls.load(folder, _fresh())
    _rewrite(folder, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(CheckpointError, match=r"model\.surprise"):
        ls.load(folder, _fresh())


def test_other_architecture_is_refused(saved) -> None:
    _, folder = saved
    with pytest.raises(CheckpointError):
        ls.load(folder, models.tiny("gpt2", **DIMS))


# -- atomic writes --------------------------------------------------------------------------------------
def test_interrupted_save_leaves_no_folder_and_the_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    first = compressed("llama", build("rtn"))
    folder = ls.save(first, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = _ckpt_write.write_shard
    calls = []

    def crash(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(tensors, path)

    monkeypatch.setattr(_ckpt_write, "write_shard", crash)
    second = compressed("llama", build("rtn", bits=8))
    for target in (tmp_path / "c", tmp_path / "new"):
        calls.clear()
        with pytest.raises(OSError, match="simulated"):
            ls.save(second, target, overwrite=True, shard_bytes=5_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary or partial folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_existing_folder_needs_overwrite(tmp_path) -> None:
    a, b = compressed("llama", build("rtn")), compressed("llama", build("rtn", bits=8))
    folder = ls.save(a, tmp_path / "c")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        ls.save(b, folder)
    ls.save(b, folder, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with torch.device("meta"):
        skeleton = models.tiny("llama", **DIMS)
    assert torch.equal(logits(ls.load(folder, skeleton)), logits(b))


# -- the kind registry ----------------------------------------------------------------------------------
class Doubler(nn.Module):
    """A plugin's own compressed module."""

    def __init__(self, width: int, device=None) -> None:
        super().__init__()
        self.width = width
        self.register_buffer("scale", torch.ones(width, device=device))

    def forward(self, x):
        return x * self.scale

    def checkpoint_config(self):
        return {"width": self.width}

    @classmethod
    def from_checkpoint_config(cls, cfg, *, tied=None):
        return cls(cfg["width"], device="meta")


def test_plugin_kinds_must_be_registered(tmp_path) -> None:
    from llmslim import _ckpt_kinds

    model = nn.Sequential(nn.Linear(4, 4), nn.Identity())
    model[1] = Doubler(4)
    model[1].scale.fill_(2.0)
    x = torch.randn(3, 4)
    folder = ls.save(model, tmp_path / "c")  # not registered: saved as a plain module...
    with pytest.raises(CheckpointError, match="scale"):  # ...so a skeleton without it cannot take it
        ls.load(folder, nn.Sequential(nn.Linear(4, 4), nn.Identity()))
    register_module_kind("Doubler", Doubler)
    try:
        with pytest.raises(RegistryError, match="already registered"):
            register_module_kind("Doubler", type("Other", (Doubler,), {}))
        folder = ls.save(model, tmp_path / "c", overwrite=True)
        loaded = ls.load(folder, nn.Sequential(nn.Linear(4, 4), nn.Identity()))
        assert isinstance(loaded[1], Doubler) and torch.equal(loaded(x), model(x))
    finally:
        _ckpt_kinds._registered.pop("Doubler", None)


def test_no_pickle_anywhere() -> None:
    root = Path(ls.__file__).parent
    for name in ("io.py", "hf.py", "_ckpt_kinds.py", "_ckpt_manifest.py", "_ckpt_read.py", "_ckpt_write.py"):
        text = (root / name).read_text()
        assert "import pickle" not in text and "torch.load(" not in text and "weights_only" not in text, name
