"""Compressed storage: exact reconstruction, true sizes in reports, and the byte targets."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim._measure import module_stats
from llmslim.prune import Magnitude, SparseLinear, masked_modules, nm_mask, pack_bits, pack_ints, storage_bytes, unpack_bits, unpack_ints
from llmslim.testing import make_model


@given(st.lists(st.booleans(), max_size=70))
def test_bits_round_trip(bits) -> None:
    t = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(t)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(bits) + 7) // 8
    assert unpack_bits(packed, len(bits)).tolist() == bits


@given(st.integers(1, 6).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=40))))
def test_small_integers_round_trip(case) -> None:
    bits, values = case
    packed = pack_ints(torch.tensor(values, dtype=torch.int64), bits)
    assert packed.numel() == (len(values) * bits + 7) // 8
    assert unpack_ints(packed, len(values), bits).tolist() == values


def _pruned(out: int, inp: int, *, pattern: str, sparsity: float = 0.5, seed: int = 0) -> torch.Tensor:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    if pattern == "unstructured":
        k = int(sparsity * w.numel())
        w.view(-1)[w.abs().flatten().argsort()[:k]] = 0
        return w
    n, m = (int(x) for x in pattern.split(":"))
    return torch.where(nm_mask(w.abs(), n, m, remainder="dense"), w, 0)


CASES = [("unstructured", None), ("2:4", (2, 4)), ("1:4", (1, 4)), ("4:8", (4, 8)), ("1:2", (1, 2))]


@pytest.mark.parametrize(("pattern", "n_m"), CASES)
@pytest.mark.parametrize("shape", [(8, 16), (5, 13), (1, 4), (3, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_compressed_forward_equals_the_dense_masked_forward(pattern, n_m, shape, bias) -> None:
    w = _pruned(*shape, pattern=pattern)
    b = nn.Parameter(torch.randn(shape[0])) if bias else None
    layer = SparseLinear(w, b, n_m=n_m)
    x = torch.randn(2, 3, shape[1])
    assert torch.equal(layer.weight, w)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=0, atol=0)
    expected_format = "nm" if n_m and shape[1] % n_m[1] == 0 and n_m != (4, 8) else "bitmask"
    assert layer.format == expected_format


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_half_values_compute_with_the_rounded_weight(value_dtype) -> None:
    w = _pruned(6, 8, pattern="2:4")
    layer = SparseLinear(w, None, value_dtype=value_dtype, n_m=(2, 4))
    assert layer.values.dtype == value_dtype and layer.weight.dtype == torch.float32
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), x @ w.to(value_dtype).float().t(), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_fp16_storage_is_at_most_057_of_dense_fp16(pattern) -> None:
    w = _pruned(256, 512, pattern=pattern)
    layer = SparseLinear(w, None, value_dtype=torch.float16, n_m=None if pattern == "unstructured" else (2, 4))
    stored = ls.model_bytes(layer)
    assert stored / (w.numel() * 2) <= 0.57
    assert layer.weight_bits == pytest.approx(stored * 8 / w.numel())
    assert layer.format == ("bitmask" if pattern == "unstructured" else "nm")


@pytest.mark.parametrize(("pattern", "n_m"), CASES)
@pytest.mark.parametrize("value_dtype", [None, torch.float16])
def test_storage_bytes_are_the_bytes_the_module_allocates(pattern, n_m, value_dtype) -> None:
    w = _pruned(12, 24, pattern=pattern)
    sizes = storage_bytes(w, value_dtype, n_m)
    layer = SparseLinear(w, None, value_dtype=value_dtype, n_m=n_m)
    assert ls.model_bytes(layer) == sizes[f"bytes_{layer.format}"]
    assert sizes["bytes_dense"] == w.numel() * 4 and sizes["bytes_fp16"] == w.numel() * 2


def test_module_stats_of_a_compressed_layer_are_true() -> None:
    w = _pruned(10, 16, pattern="unstructured", sparsity=0.75)
    bias = nn.Parameter(torch.zeros(10))
    layer = SparseLinear(w, bias, value_dtype=torch.float16)
    stats = module_stats(layer)
    assert stats.params == 10 * 16 + 10  # the weights it represents, plus the bias
    assert stats.bytes == (160 // 8) + 40 * 2 + 10 * 4  # bitmask, fp16 values, fp32 bias
    assert stats.sparsity == 0.75
    assert stats.bits == ((160 // 8) + 40 * 2) * 8 / 160


def test_a_group_with_more_than_n_nonzeros_falls_back_to_the_bitmask() -> None:
    w = torch.ones(2, 4)
    assert SparseLinear(w, None, n_m=(2, 4)).format == "bitmask"
    assert "bytes_nm" not in storage_bytes(w, None, (2, 4))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4"])
@pytest.mark.parametrize("kind", ["mlp", "mha", "gpt2", "llama"])
def test_finalize_compressed_computes_what_the_masked_model_computes(kind, pattern) -> None:
    model, batch = make_model(kind, seed=1, **({"in_features": 8, "hidden": (16,)} if kind == "mlp" else {}))
    ctx = ls.Context(progress=False)
    pm = ls.PassManager([Magnitude(pattern=pattern, storage="compressed", remainder="dense")])
    pm.apply(model, ctx)
    with torch.no_grad():
        masked = ls.default_forward(model, batch)
    n_masked = len(masked_modules(model))
    report = pm.finalize(model, ctx)
    assert not masked_modules(model)
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == n_masked == len(report.all_rows)
    with torch.no_grad():
        out = ls.default_forward(model, batch)
    out, masked = (o.logits if hasattr(o, "logits") else o.last_hidden_state if hasattr(o, "last_hidden_state") else o for o in (out, masked))
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-6)
    for row in report.all_rows:
        assert row.kind == "SparseLinear" and row.info["storage"] in ("bitmask", "nm")
        assert row.bytes_after < row.bytes_before


def test_compressed_storage_keeps_conv_and_root_modules_dense_and_says_so() -> None:
    model, batch = make_model("convnet", seed=0)
    report = ls.compress_(model, Magnitude(targets=("Conv2d", "Linear"), storage="compressed"), progress=False)
    kinds = {row.module: row.kind for row in report.children[-1].rows}
    assert kinds == {"0": "Conv2d", "3": "Conv2d", "8": "SparseLinear"}
    assert any("kept dense" in n and "0, 3" in n for n in report.children[-1].notes)
    root = nn.Linear(8, 8)
    report = ls.compress_(root, Magnitude(storage="compressed"), progress=False)
    assert type(root) is nn.Linear and "(root)" in report.children[-1].notes[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 2:4 sparse kernel needs CUDA")
def test_two_four_layers_use_the_semi_structured_kernel_on_cuda() -> None:  # pragma: no cover - CPU CI
    w = _pruned(128, 256, pattern="2:4").cuda().half()
    layer = SparseLinear(w, None, n_m=(2, 4)).cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    out = layer(x)
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-2, atol=1e-2)
    cache = layer._sparse_cache
    assert cache is not None and cache[0] == (x.device, x.dtype)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert cache[1] is not None, "an Ampere or newer GPU takes 2:4 fp16 weights"
