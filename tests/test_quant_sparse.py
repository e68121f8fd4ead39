"""Sparse and quantized together: quantizing a pruned model keeps every zero, GPTQ's error feedback
never revives one, and SparseQuantLinear stores only the non-zero codes, exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim._measure import module_stats
from llmslim.prune import Magnitude, Wanda, nm_mask
from llmslim.quant import GPTQ, RTN, QuantLinear, SparseQuantLinear, dequantize, gptq_quantize
from llmslim.quant._kernels import cpu_gemm_dtype

PATTERNS = ["unstructured", "2:4", "1:4", "2:8"]


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))


def _batches(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 64, generator=g) for _ in range(n)]


def _pruned(weight: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    if pattern == "unstructured":
        keep = weight.abs() > weight.abs().flatten().kthvalue(max(1, int(sparsity * weight.numel()))).values
    else:
        n, m = map(int, pattern.split(":"))
        keep = nm_mask(weight.abs(), n, m)
    return weight * keep


# -- the storage ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    sparsity=st.floats(0.0, 0.95),
    pattern=st.sampled_from(PATTERNS),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 8, 16, 24, 64]),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_storage_round_trip_is_exact(sparsity: float, pattern: str, bits: int, group_size: int | None, symmetric: bool,
                                     seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(48, 24)
    with torch.no_grad():
        lin.weight.copy_(_pruned(torch.randn(24, 48, generator=g), sparsity, pattern))
    dense = QuantLinear.from_float(lin, bits=bits, group_size=group_size, symmetric=symmetric)
    sparse = SparseQuantLinear.from_quant(dense)
    assert torch.equal(sparse.codes(), dense.codes())
    assert torch.equal(sparse.dequantize(), dense.dequantize())
    assert bool((sparse.weight[lin.weight == 0] == 0).all())  # every pruned zero, exactly
    zero_codes = float((dense.dequantize() == 0).float().mean())
    assert sparse.weight_sparsity == pytest.approx(zero_codes)
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        assert sparse.format == "nm" and sparse.n / sparse.m <= n / m  # the pattern's indices, or a sparser one
    x = torch.randn(3, 48, generator=g)
    gemm = cpu_gemm_dtype()
    reference = F.linear(x.to(gemm), dense.dequantize(gemm)).float() + lin.bias
    assert torch.equal(sparse(x), reference)  # the dense dequantized reference, bit for bit


@pytest.mark.parametrize(("pattern", "layout"), [("unstructured", "bitmask"), ("2:4", "nm")])
@pytest.mark.parametrize("symmetric", [False, True])
def test_half_sparse_int4_g64_takes_at_most_045_bytes_per_weight(pattern: str, layout: str, symmetric: bool) -> None:
    lin = nn.Linear(576, 1536)  # SmolLM2's MLP shape
    with torch.no_grad():
        lin.weight.copy_(_pruned(lin.weight, 0.5, pattern))
    dense = QuantLinear.from_float(lin, bits=4, group_size=64, symmetric=symmetric)
    sparse = SparseQuantLinear.from_quant(dense)
    assert sparse.format == layout
    # 1/8 mask (or 2-bit indices of half the weights) + 1/4 codes + a bfloat16 scale (and int8 zero) per 64
    assert sparse.bytes_per_weight <= 0.45
    assert sparse.bytes_per_weight == pytest.approx(0.125 + 0.25 + (2 if symmetric else 3) / 64, abs=0.01)
    assert sparse.bytes_per_weight < 0.8 * dense.bytes_per_weight


def test_state_dict_device_moves_and_casts_keep_the_weight() -> None:
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(16, 64) > 0.5)
    sparse = SparseQuantLinear.from_quant(QuantLinear.from_float(lin, bits=4, group_size=32))
    assert set(sparse.state_dict()) == {"bitmask", "qvalues", "scales", "zeros", "bias"}
    weight = sparse.weight
    sparse.half()
    assert sparse.scales.dtype == torch.bfloat16  # a stored choice, never cast
    assert torch.equal(sparse.weight, weight.half())  # rebuilt in the new dtype from the same codes
    got = module_stats(sparse)  # read from weight_bits / weight_sparsity, no dense rebuild
    assert got.bits == sparse.weight_bits and got.sparsity == sparse.weight_sparsity and got.params == 64 * 16 + 16


# -- quantizers keep the zeros ---------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    sparsity=st.floats(0.2, 0.9),
    pattern=st.sampled_from(PATTERNS),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 8, 16, 32]),
    symmetric=st.booleans(),
    method=st.sampled_from(["rtn", "gptq"]),
    baked=st.booleans(),
)
def test_quantizing_a_pruned_model_keeps_every_zero(sparsity: float, pattern: str, bits: int, group_size: int | None,
                                                    symmetric: bool, method: str, baked: bool) -> None:
    model = _mlp(0)
    prune = Magnitude(sparsity=sparsity if pattern == "unstructured" else None, pattern=pattern)
    if baked:  # masks baked into dense zeros (no parametrization left for the quantizer to see)
        ls.compress_(model, prune, progress=False)
    else:  # masks still on: apply without finalize
        ls.PassManager([prune]).apply(model, ls.Context(progress=False))
    zeros = [model[0].weight == 0, model[2].weight == 0]
    quant = (RTN if method == "rtn" else GPTQ)(bits=bits, group_size=group_size, symmetric=symmetric, storage="sparse", ignore=())
    report = ls.compress_(model, quant, calibration=_batches(), progress=False)
    for layer, pruned in zip((model[0], model[2]), zeros):
        assert bool((layer.dequantize()[pruned] == 0).all())
        assert layer.weight_sparsity >= int(pruned.sum()) / pruned.numel()
    assert {r.info["storage"] for r in report.children[0].rows} <= {"bitmask", "nm", "packed"}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), group_size=st.sampled_from([None, 4, 8]),
       act_order=st.booleans(), sparsity=st.floats(0.1, 0.9))
def test_gptq_error_feedback_never_revives_a_zero(seed: int, bits: int, group_size: int | None, act_order: bool,
                                                  sparsity: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 24, generator=g) @ torch.randn(24, 24, generator=g)  # correlated: large feedback
    w = torch.randn(12, 24, generator=g)
    w = w * (torch.rand(12, 24, generator=g) > sparsity)
    out = gptq_quantize(w, 2 * x.T @ x / 128, bits=bits, group_size=group_size, symmetric=False, act_order=act_order,
                        keep_zeros=w == 0, scale_dtype=torch.float32)
    deq = dequantize(out["codes"], out["scale"], out["zero"], group_size=group_size)
    assert bool((deq[w == 0] == 0).all())


def test_gptq_keeps_zeros_that_were_baked_in_before() -> None:
    model = _mlp(1)
    ls.compress_(model, Magnitude(sparsity=0.6), progress=False)  # finalized: dense weights with zeros
    zeros = model[0].weight == 0
    ls.compress_(model, GPTQ(bits=3, group_size=16, ignore=()), calibration=_batches(), progress=False)
    assert bool((model[0].dequantize()[zeros] == 0).all())


def test_sparse_storage_falls_back_to_packed_without_zeros() -> None:
    model = _mlp(2)
    report = ls.compress_(model, RTN(bits=4, group_size=16, storage="sparse", ignore=()), progress=False)
    assert all(isinstance(m, QuantLinear) for m in (model[0], model[2]))
    assert any("kept packed" in n for n in report.children[0].notes)


def test_wanda_then_gptq_sparse_on_a_tiny_llama() -> None:
    pytest.importorskip("transformers")
    from llmslim import models

    model = models.tiny("llama")
    dense = copy.deepcopy(model)
    batches = [{"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    report = ls.compress_(model, Wanda(sparsity=0.5, targets=("model.layers.*",)), GPTQ(bits=4, group_size=64, storage="sparse"),
                          calibration=batches, progress=False)
    rows = report.children[1].rows
    layers = [model.get_submodule(r.module) for r in rows]
    assert rows and all(isinstance(m, SparseQuantLinear) for m in layers)
    assert all(m.bytes_per_weight <= 0.45 and m.weight_sparsity >= 0.5 for m in layers)
    assert all(r.info["storage"] == "bitmask" and r.bytes_after < r.bytes_before / 8 for r in rows)
    with torch.no_grad():
        a, b = model(input_ids=batches[0]["input_ids"]).logits, dense(input_ids=batches[0]["input_ids"]).logits
    assert float((a - b).norm() / b.norm()) < 0.5
