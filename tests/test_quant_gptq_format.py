"""The GPTQ tensor layout: exact round trips, an independent reference decoder, folders."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim.errors import CheckpointError, ConfigError
from llmslim.quant import QuantEmbedding, QuantLinear, RTN, export_gptq, from_gptq_tensors, import_gptq, to_gptq_tensors


def _quant(out_f, in_f, bits, group_size, sym, scale_dtype=torch.bfloat16, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight[:, ::7] = 0.0
        lin.weight[0, :] = lin.weight[0, :].abs()  # a row of positive weights: zero point at the grid's bottom
    return QuantLinear.from_float(lin, bits=bits, group_size=group_size, symmetric=sym, scale_dtype=scale_dtype)


def _back(layer, t, fmt="v2", **kw):
    g = layer.group_size
    return from_gptq_tensors(t, bits=layer.bits, group_size=g, sym=layer.symmetric, in_features=layer.in_features,
                             out_features=layer.out_features, format=fmt, **kw)


def _reference_weight(t, bits, fmt):
    """The format's definition, written independently: unpack each int32's fields lowest first,
    W[n, k] = (u[k, n] - uz[g_idx[k], n]) * scales[g_idx[k], n]."""
    per, mask = 32 // bits, (1 << bits) - 1
    qw, qz = t["qweight"].tolist(), t["qzeros"].tolist()
    k_in, n_out = len(qw) * per, len(qw[0])
    u = [[(qw[k // per][n] >> (bits * (k % per))) & mask for n in range(n_out)] for k in range(k_in)]
    uz = [[((qz[g][n // per] >> (bits * (n % per))) & mask) + (1 if fmt == "v1" else 0) for n in range(n_out)] for g in range(len(qz))]
    s, gi = t["scales"].float(), t["g_idx"].tolist()
    w = torch.empty(n_out, k_in)
    for k in range(k_in):
        g = gi[k]
        w[:, k] = (torch.tensor([u[k][n] for n in range(n_out)]) - torch.tensor(uz[g]).float()) * s[g]
    return w


CASES = [  # (out, in, bits, group_size, symmetric)
    (32, 64, 4, 32, False),
    (32, 64, 4, 16, True),
    (16, 64, 4, None, False),
    (24, 80, 4, 32, False),  # 80 = 2 x 32 + 16: a remainder group through g_idx
    (32, 64, 8, None, True),
    (32, 96, 8, 64, False),  # remainder at 8 bits
    (32, 64, 2, 16, False),
    (48, 96, 2, None, True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_exact(case, scale_dtype) -> None:
    out_f, in_f, bits, g, sym = case
    layer = _quant(out_f, in_f, bits, g, sym, scale_dtype, bias=True)
    t = to_gptq_tensors(layer, dtype=torch.float32, format="v2")  # float32: no scale rounding at all
    groups = -(-in_f // (g or in_f))
    assert t["qweight"].shape == (in_f * bits // 32, out_f) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, out_f * bits // 32) and t["scales"].shape == (groups, out_f)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"].long(), torch.arange(in_f) // (g or in_f))
    back = _back(layer, t, scale_dtype=scale_dtype)
    q0, s0, z0 = layer._unpacked()
    q1, s1, z1 = back._unpacked()
    assert torch.equal(q0, q1) and torch.equal(s0, s1) and (z0 is None) == (z1 is None)
    assert z0 is None or torch.equal(z0, z1)
    assert torch.equal(back.bias, layer.bias)
    for tokens in (1, 70):  # the decode kernel and the many-token path
        x = torch.randn(tokens, in_f)
        assert torch.equal(back(x), layer(x))
    torch.testing.assert_close(_reference_weight(t, bits, "v2"), layer.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[4]], ids=str)
def test_v1_symmetric_stores_the_mid_code_minus_one_and_float16_scales_exactly(case) -> None:
    out_f, in_f, bits, g, sym = case
    layer = _quant(out_f, in_f, bits, g, sym, torch.bfloat16)
    t = to_gptq_tensors(layer)  # float16, v1: what AutoGPTQ writes
    field = 2 ** (bits - 1) - 1
    word = sum(field << (bits * j) for j in range(32 // bits))
    assert t["scales"].dtype == torch.float16 and t["qzeros"].dtype == torch.int32
    assert ((t["qzeros"].long() & 0xFFFFFFFF) == word).all()  # 0x77777777 at 4 bits
    torch.testing.assert_close(_reference_weight(t, bits, "v1"), layer.dequantize(), rtol=0, atol=0)
    back = _back(layer, t, "v1", scale_dtype=torch.bfloat16)  # bfloat16 -> float16 -> bfloat16 is exact
    assert torch.equal(back.scales, layer._unpacked()[1]) and torch.equal(back.codes(), layer.codes())


def test_float32_scales_round_to_float16_and_say_so_by_value() -> None:
    layer = _quant(32, 64, 4, 32, True, torch.float32)
    t = to_gptq_tensors(layer)
    assert torch.equal(t["scales"], layer.scales.t().to(torch.float16))
    back = _back(layer, t, "v1")
    assert back.scales.dtype == torch.float16 and torch.equal(back.codes(), layer.codes())


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    out_units=st.integers(1, 3),
    in_units=st.integers(1, 6),
    group=st.sampled_from([None, 8, 16, 24, 32, 48]),
    sym=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_round_trips(bits, out_units, in_units, group, sym, seed) -> None:
    per = 32 // bits
    out_f, in_f = out_units * per, in_units * 16
    layer = _quant(out_f, in_f, bits, group, sym, torch.bfloat16, seed=seed)
    t = to_gptq_tensors(layer, format="v2")
    back = _back(layer, t, scale_dtype=torch.bfloat16)
    assert torch.equal(back.codes(), layer.codes()) and torch.equal(back.dequantize(), layer.dequantize())


def test_v1_refuses_a_zero_point_of_zero_and_v2_stores_it() -> None:
    layer = _quant(32, 64, 4, 32, False)
    assert (layer._unpacked()[2] == -8).any()  # row 0 is all positive: its zero point is the bottom code
    with pytest.raises(ConfigError, match="v1 format cannot store"):
        to_gptq_tensors(layer)
    t = to_gptq_tensors(layer, format="v2")
    assert torch.equal(_back(layer, t).codes(), layer.codes())
    bad = dict(t, qzeros=t["qzeros"] - 0x11111111)  # what v2 -> v1 by subtraction leaves: a field of 15
    with pytest.raises(CheckpointError, match="zero point 16"):
        _back(layer, bad, "v1")


def test_g_idx_with_contiguous_groups_in_any_order_loads_and_act_order_is_refused() -> None:
    layer = _quant(32, 64, 4, 16, False)
    t = to_gptq_tensors(layer, format="v2")
    p = torch.tensor([2, 0, 3, 1])  # our group j is stored as group p[j]
    scales, zeros = torch.empty_like(t["scales"]), torch.empty_like(t["qzeros"])
    scales[p], zeros[p] = t["scales"], t["qzeros"]
    relabelled = dict(t, scales=scales, qzeros=zeros, g_idx=p[torch.arange(64) // 16].to(torch.int32))
    back = _back(layer, relabelled)
    assert torch.equal(back.dequantize(), layer.dequantize())
    scattered = dict(t, g_idx=(torch.arange(64) % 4).to(torch.int32))
    with pytest.raises(ConfigError, match="act-order"):
        _back(layer, scattered)
    with pytest.raises(CheckpointError, match="g_idx"):
        _back(layer, dict(t, g_idx=torch.full((64,), 9, dtype=torch.int32)))


def test_bad_layers_and_tensors_are_refused() -> None:
    with pytest.raises(ConfigError, match="3-bit"):
        to_gptq_tensors(_quant(32, 64, 3, 16, False))
    with pytest.raises(ConfigError, match="multiples of 8"):
        to_gptq_tensors(_quant(20, 64, 4, 16, False))
    emb = QuantEmbedding.from_float(nn.Embedding(32, 64))
    with pytest.raises(ConfigError, match="tied"):
        to_gptq_tensors(QuantLinear.tied(emb))
    with pytest.raises(ConfigError, match="QuantLinear"):
        to_gptq_tensors(nn.Linear(8, 8))
    with pytest.raises(ConfigError, match="dtype"):
        to_gptq_tensors(_quant(32, 64, 4, 16, True), dtype=torch.int8)
    layer = _quant(32, 64, 4, 16, True)
    t = to_gptq_tensors(layer)
    with pytest.raises(ConfigError, match="format"):
        _back(layer, t, "v3")
    with pytest.raises(CheckpointError, match="missing: qweight"):
        _back(layer, {"scales": t["scales"]}, "v1")
    with pytest.raises(CheckpointError, match="'qweight': shape"):
        _back(layer, dict(t, qweight=t["qweight"][:-1]), "v1")
    with pytest.raises(CheckpointError, match="sym=True"):
        _back(layer, dict(t, qzeros=torch.zeros_like(t["qzeros"])), "v1")
    with pytest.raises(ConfigError, match="group_size"):
        from_gptq_tensors(t, bits=4, group_size=0, sym=True, in_features=64, out_features=32)


# -- whole models ---------------------------------------------------------------------------------
def _batches(n=4, seq=16):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (1, seq), generator=g)} for _ in range(n)]


@pytest.mark.parametrize(("sym", "fmt"), [(True, "v1"), (False, "v2")])
def test_gptq_llama_exports_and_imports_with_equal_logits(tmp_path, sym, fmt) -> None:
    pytest.importorskip("transformers")
    from llmslim import models
    from llmslim.quant import GPTQ

    model = models.tiny("llama")
    ls.compress_(model, GPTQ(bits=4, group_size=32, symmetric=sym), calibration=_batches(), progress=False)
    folder = export_gptq(model, tmp_path / "gptq", format=fmt)
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is sym and qc["desc_act"] is False
    assert qc["checkpoint_format"] == {"v1": "gptq", "v2": "gptq_v2"}[fmt] and qc["quant_method"] == "gptq"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == qc
    from transformers import GPTQConfig

    assert GPTQConfig.from_dict(qc).format == qc["checkpoint_format"]  # transformers reads our config
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.0.self_attn.q_proj." + p for p in ("qweight", "qzeros", "scales", "g_idx")} <= keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    fresh = import_gptq(folder, models.tiny("llama", seed=1))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert isinstance(fresh.model.layers[1].mlp.down_proj, QuantLinear)


def test_import_onto_meta_parameters_and_tied_weights(tmp_path) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(16, 32)
    model = nn.Sequential(emb, nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False))
    model[3].weight = nn.Parameter(torch.randn(16, 64))
    head = nn.Linear(32, 16, bias=False)
    head.weight = emb.weight  # tied: stored once
    model.append(nn.Identity())
    model.head = head
    ls.compress_(model, RTN(bits=8, group_size=None, symmetric=True, targets=("1", "3")), progress=False)
    folder = export_gptq(model, tmp_path / "m", dtype=torch.float32)
    with torch.device("meta"):
        skeleton = nn.Sequential(nn.Embedding(16, 32), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False), nn.Identity())
        skeleton.head = nn.Linear(32, 16, bias=False)
        skeleton.head.weight = skeleton[0].weight
    import_gptq(folder, skeleton)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(skeleton[:4](ids), model[:4](ids))
    assert torch.equal(skeleton.head.weight, emb.weight)


def test_folder_errors(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ConfigError, match="no QuantLinear"):
        export_gptq(model, tmp_path / "a")
    ls.compress_(model, RTN(bits=4, group_size=32, symmetric=True), progress=False)
    folder = export_gptq(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match="overwrite"):
        export_gptq(model, folder)
    export_gptq(model, folder, overwrite=True, format="v2")
    assert json.loads((folder / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left

    mixed = nn.Sequential(nn.Linear(64, 32), nn.Embedding(8, 64))
    mixed[1] = QuantEmbedding.from_float(mixed[1])
    ls.compress_(mixed, RTN(bits=4, group_size=32, symmetric=True, targets=("0",)), progress=False)
    with pytest.raises(ConfigError, match="QuantEmbedding"):
        export_gptq(mixed, tmp_path / "b")
    two = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
    ls.compress_(two, RTN(bits=4, group_size=32, symmetric=True, targets=("0",)), progress=False)
    ls.compress_(two, RTN(bits=8, group_size=None, symmetric=True, targets=("1",)), progress=False)
    with pytest.raises(ConfigError, match="share bits"):
        export_gptq(two, tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

    with pytest.raises(CheckpointError, match="not a folder"):
        import_gptq(tmp_path / "missing", nn.Sequential(nn.Linear(64, 32)))
    with pytest.raises(CheckpointError, match="no linear layer"):
        import_gptq(folder, nn.Sequential(nn.ReLU()))
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        import_gptq(folder, nn.Sequential(nn.Linear(64, 32), nn.Linear(4, 4)))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "quant_method": "gptq", "checkpoint_format": "marlin"}))
    with pytest.raises(CheckpointError, match="marlin"):
        import_gptq(folder, nn.Sequential(nn.Linear(64, 32)))
    (folder / "model.safetensors").write_bytes(b"garbage")
    (folder / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "quant_method": "gptq"}))
    with pytest.raises(CheckpointError, match="cannot read"):
        import_gptq(folder, nn.Sequential(nn.Linear(64, 32)))
