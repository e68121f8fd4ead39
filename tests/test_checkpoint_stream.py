"""Streaming saves (llmslim.io.StreamingSave): a model calibrated from its shards on disk and
written block by block gives the folder ls.save writes for the same model compressed in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.calibration import ShardedWeights
from llmslim.errors import CheckpointError, ConfigError, PassError

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

DIMS = dict(hidden=64, intermediate=96, layers=2, heads=2, kv_heads=1)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = [{"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)]


def gptq(**kw) -> ls.quant.GPTQ:
    return ls.quant.GPTQ(**{"bits": 4, "group_size": 32, "clip": "minmax", **kw})


def shards(model: nn.Module, folder: Path) -> Path:
    """The float model as two safetensors files with an index, like a downloaded checkpoint."""
    folder.mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        del state["lm_head.weight"]  # stored once, as Hugging Face does
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for fname, part in halves.items():
        safetensors_torch.save_file({k: state[k] for k in part}, str(folder / fname))
    weight_map = {k: f for f, part in halves.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def skeleton(**kw) -> nn.Module:
    with torch.device("meta"):
        model = models.tiny("llama", **DIMS, **kw)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent buffers: real
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(f)))
    return out


def streamed(tmp_path: Path, passes, *, name: str = "streamed", shard_bytes: int = 2**31, **kw) -> tuple[Path, nn.Module]:
    source = shards(models.tiny("llama", **DIMS, **kw), tmp_path / f"{name}-float")
    model = skeleton(**kw)
    recipe = ls.PassManager(passes).to_recipe()
    with ls.io.StreamingSave(model, tmp_path / name, source=ShardedWeights(source), recipe=recipe, shard_bytes=shard_bytes) as saver:
        ls.compress_(model, *passes, ctx=ls.Context(CALIB, weights=source, after_block=saver, progress=False))
    return saver.path, model


@pytest.mark.parametrize("tied", [False, True])
def test_gptq_from_shards_streamed_equals_in_memory_save(tmp_path, tied) -> None:
    passes = [gptq()]
    folder, model = streamed(tmp_path, passes, shard_bytes=40_000, tie_word_embeddings=tied)
    real = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert all(n.startswith("model.rotary_emb.") for n in real), real  # built real; all else never left disk for long

    reference = models.tiny("llama", **DIMS, tie_word_embeddings=tied)
    ls.compress_(reference, *passes, calibration=CALIB, progress=False)
    saved = ls.save(reference, tmp_path / "in-memory", recipe=ls.PassManager(passes).to_recipe())

    loaded = ls.load(folder, skeleton(tie_word_embeddings=tied))
    assert torch.equal(logits(loaded), logits(reference))
    assert ls.model_bytes(loaded) == ls.model_bytes(reference)
    # the same folder as ls.save: the same tensors bit for bit, the same manifest but for the sharding
    a, b = tensors(folder), tensors(saved)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = ls.io.read_manifest(folder), ls.io.read_manifest(saved)
    for field in ("modules", "aliases", "recipe", "format_version"):
        assert ma[field] == mb[field], field
    assert sorted(ma["non_persistent"]) == sorted(mb["non_persistent"])
    assert len(ma["files"]) > 1 and (folder / "model.safetensors.index.json").exists()
    assert (ma["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}) == tied
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_swapped_out_modules_give_their_loaded_weights_back(tmp_path, monkeypatch) -> None:
    # The rollback journal keeps the Linear modules GPTQ swaps out; they held the block's float
    # weights, so a 1.1B model from shards kept all of them resident (4.6 GB) until this was fixed.
    source = shards(models.tiny("llama", **DIMS), tmp_path / "float")
    model = skeleton()
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    real_at_solve: list[int] = []  # swapped-out Linears still holding weights when a layer is solved

    def solve(self, name, module, stats, ctx, _solve=type(gptq()).solve):
        real_at_solve.append(sum(m.weight.device.type != "meta" for m in linears if m is not module and m not in set(ctx.model.modules())))
        return _solve(self, name, module, stats, ctx)

    monkeypatch.setattr(type(gptq()), "solve", solve)
    ls.compress_(model, gptq(), ctx=ls.Context(CALIB, weights=source, progress=False))
    assert real_at_solve and not any(real_at_solve)  # each goes right after its own solve
    assert linears and not any(m in set(model.modules()) for m in linears)  # all swapped out
    assert all(m.weight.device.type == "meta" for m in linears)


def test_in_memory_sweep_with_a_module_outside_the_blocks(tmp_path) -> None:
    # without weights on disk the model stays usable, and lm_head (solved after the sweep) is
    # written at the end, compressed
    model = models.tiny("llama", **DIMS)
    with ls.io.StreamingSave(model, tmp_path / "ckpt") as saver:
        ls.compress_(model, gptq(ignore=()), ctx=ls.Context(CALIB, after_block=saver, progress=False))
    assert type(model.lm_head).__name__ == "QuantLinear"
    loaded = ls.load(saver.path, skeleton())
    assert torch.equal(logits(loaded), logits(model))
    assert "lm_head" in [e["name"] for e in ls.io.read_manifest(saver.path)["modules"]]


def test_a_failing_pass_leaves_no_folder_and_the_skeleton_on_meta(tmp_path, monkeypatch) -> None:
    source = shards(models.tiny("llama", **DIMS), tmp_path / "float")
    model = skeleton()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep").write_text("old")
    calls = []

    def boom(self, name, module, stats, ctx):
        calls.append(name)
        if name.startswith("model.layers.1."):
            raise RuntimeError("boom")
        return real(self, name, module, stats, ctx)

    real = ls.quant.GPTQ.solve
    monkeypatch.setattr(ls.quant.GPTQ, "solve", boom)
    with pytest.raises(PassError, match="boom"):
        with ls.io.StreamingSave(model, tmp_path / "ckpt", source=source, overwrite=True) as saver:
            ls.compress_(model, gptq(), ctx=ls.Context(CALIB, weights=source, after_block=saver, progress=False))
    assert saver.blocks == ["model.layers.0"]
    assert (tmp_path / "ckpt" / "keep").read_text() == "old"  # the previous folder is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "float"]
    assert all(type(m) is nn.Linear for m in model.model.layers[0].modules() if isinstance(m, nn.Linear) or "Quant" in type(m).__name__)
    assert all(p.device.type == "meta" for p in model.parameters())  # rolled back, no float copy journaled


def test_plan_check_refuses_what_a_single_streamed_sweep_cannot_do(tmp_path) -> None:
    source = shards(models.tiny("llama", **DIMS), tmp_path / "float")
    ctx = ls.Context(CALIB, weights=source, progress=False)
    with pytest.raises(ConfigError, match="one sweep.*'rtn'"):
        ls.compress_(skeleton(), ls.quant.RTN(bits=4, group_size=32), ctx=ctx)
    with pytest.raises(ConfigError, match="one sweep"):  # different propagate: two sweeps
        ls.compress_(skeleton(), gptq(propagate="original"), gptq(name="again"), ctx=ctx)
    with pytest.raises(ConfigError, match="weights must be a ShardedWeights"):
        ls.Context(CALIB, weights=42)
    with pytest.raises(ConfigError, match="after_block must be callable"):
        ls.Context(CALIB, after_block="no")


def test_refusals(tmp_path) -> None:
    model = skeleton()
    (tmp_path / "there").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        ls.io.StreamingSave(model, tmp_path / "there").__enter__()
    with pytest.raises(CheckpointError, match="meta device and no source"):
        with ls.io.StreamingSave(model, tmp_path / "ckpt"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there"]
    with pytest.raises(CheckpointError, match="handed over twice"):
        with ls.io.StreamingSave(models.tiny("llama", **DIMS), tmp_path / "ckpt") as saver:
            saver("model.layers.0", None)
            saver("model.layers.0", None)
    with pytest.raises(ConfigError, match="shard_bytes"):
        ls.io.StreamingSave(model, tmp_path / "x", shard_bytes=0)


def test_shard_writer_is_read_by_safetensors(tmp_path) -> None:
    from llmslim._ckpt_stream import _Shards

    values = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "bool": torch.rand(7) > 0.5, "i8": torch.randint(-8, 8, (4, 4), dtype=torch.int8),
        "f8": torch.randn(6).to(torch.float8_e4m3fn), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5, dtype=torch.float64),
        "view": torch.arange(20.0).view(4, 5).t(),
    }
    writer = _Shards(tmp_path, limit=40)
    for k, v in values.items():
        writer.add(k, v)
    writer.close()
    assert len(writer.done) > 1
    got = {}
    for shard in writer.done:
        got.update(safetensors_torch.load_file(str(shard["path"])))
        assert ls.io.MANIFEST and shard["bytes"] == shard["path"].stat().st_size
    assert got.keys() == values.keys()
    for k, v in values.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8) if k == "f8" else got[k],
                                                       v.view(torch.uint8) if k == "f8" else v), k
