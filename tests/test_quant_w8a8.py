"""``Int8DynamicLinear`` and the ``w8a8`` pass: int8 weights, per-token int8 activations."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.errors import ConfigError, OrderError
from llmslim.quant import RTN, W8A8, Int8DynamicLinear
from llmslim.quant import _w8a8
from llmslim.quant._w8a8 import int8_reference, onednn_available, quantize_tokens

PATHS = ["int_mm", "int8_emulated", *(["onednn_qlinear"] if onednn_available() else [])]


def _layer(k: int, n: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 2**16), scale=st.sampled_from([1e-4, 1.0, 1e3]))
def test_token_codes_are_within_half_a_step(rows: int, cols: int, seed: int, scale: float) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    q, s = quantize_tokens(x)
    assert q.dtype == torch.int8 and s.shape == (rows, 1)
    assert int(q.abs().max()) <= 127
    assert torch.all((x - q.float() * s).abs() <= s / 2 * (1 + 1e-5))
    assert torch.all(q.abs().amax(dim=1) == 127)  # each row's largest entry takes the largest code


def test_all_zero_token_gives_zero_codes() -> None:
    q, s = quantize_tokens(torch.zeros(2, 8))
    assert torch.all(q == 0) and torch.all(s > 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 64, 32), (3, 33, 17), (17, 64, 48), (128, 256, 96)])
def test_every_path_equals_the_int8_reference(path: str, shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    layer = Int8DynamicLinear.from_float(_layer(k, n))
    q_x, _ = quantize_tokens(torch.randn(m, k, generator=torch.Generator().manual_seed(1)))
    expected = int8_reference(q_x, layer.qweight) * layer.scales
    got = layer.int_product(q_x, path)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_forward_is_the_int8_arithmetic_and_close_to_float(tokens: int) -> None:
    lin = _layer(128, 64)
    layer = Int8DynamicLinear.from_float(lin)
    x = torch.randn(2, tokens, 128, generator=torch.Generator().manual_seed(2))
    q_x, s_x = quantize_tokens(x.reshape(-1, 128))
    expected = (int8_reference(q_x, layer.qweight) * layer.scales * s_x + lin.bias).reshape(2, tokens, 64)
    with torch.no_grad():
        y, reference = layer(x), lin(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert float((y - reference).norm() / reference.norm()) < 0.02


def test_dtype_empty_input_and_bad_width() -> None:
    layer = Int8DynamicLinear.from_float(_layer(64, 16))
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer(torch.randn(0, 64)).shape == (0, 16)
    with pytest.raises(ValueError, match="last dimension must be 64"):
        layer(torch.randn(2, 63))


def test_pruned_zeros_stay_zero_and_sparsity_is_reported() -> None:
    lin = _layer(64, 32)
    with torch.no_grad():
        lin.weight[:, ::2] = 0.0
    layer = Int8DynamicLinear.from_float(lin)
    assert torch.all(layer.qweight[:, ::2] == 0)
    assert layer.weight_sparsity >= 0.5
    assert torch.all(layer.dequantize()[:, ::2] == 0.0)


def test_gpt2_conv1d_is_handled() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(24, 40)
    torch.nn.init.normal_(conv.weight)
    layer = Int8DynamicLinear.from_float(conv)
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert float((layer(x) - conv(x)).norm() / conv(x).norm()) < 0.02


def test_state_dict_copies_and_casts() -> None:
    layer = Int8DynamicLinear.from_float(_layer(64, 32))
    x = torch.randn(4, 64)
    y = layer(x)
    fresh = Int8DynamicLinear(64, 32)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x), y, rtol=0, atol=0)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.qweight.dtype == torch.int8 and half.scales.dtype == torch.float32


def test_torch_compile_matches_eager() -> None:
    layer = Int8DynamicLinear.from_float(_layer(64, 32))
    x = torch.randn(20, 64)
    compiled = torch.compile(layer, backend="eager")  # traces the int_mm path; eager backend keeps the test fast
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_bad_sizes_and_modules_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        Int8DynamicLinear(0, 4)
    with pytest.raises(ConfigError):
        Int8DynamicLinear.from_float(nn.Conv2d(2, 2, 1))
    with pytest.raises(ConfigError):
        W8A8(targets=())


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_pass_on_every_tiny_architecture(arch: str) -> None:
    model = models.tiny(arch)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)[0]
    report = ls.compress_(model, W8A8(), progress=False)
    with torch.no_grad():
        after = model(ids)[0]
    rows = report.all_rows
    assert rows and all(r.kind == "Int8DynamicLinear" and r.bits == 8.0 for r in rows)
    assert all(r.bytes_after < 0.3 * r.bytes_before and r.error < 0.01 for r in rows)
    assert all(r.info["kernel"] in PATHS for r in rows)
    assert "lm_head" not in {r.module for r in rows}
    assert float((after - before).norm() / before.norm()) < 0.05


def test_cannot_follow_another_quantizer() -> None:
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(OrderError):
        ls.compress_(model, RTN(bits=8, group_size=None), W8A8(), progress=False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("small_layers_on_onednn", [False, True])
def test_one_token_path_and_shared_input_codes(bias: bool, small_layers_on_onednn: bool, monkeypatch) -> None:
    if small_layers_on_onednn:  # the oneDNN one-token epilogue (token scale and bias fused) on these small layers
        if not onednn_available():
            pytest.skip("no oneDNN int8 linear in this torch")
        monkeypatch.setitem(_w8a8.ONEDNN_MIN_OUT_FEATURES, "onednn_qlinear", 1)
    lins = [_layer(64, n, seed=n, bias=bias) for n in (32, 16)]
    layers = [Int8DynamicLinear.from_float(lin) for lin in lins]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(2):  # the second input tensor of two layers is rounded once, reused by the next
            q_x, s_x = quantize_tokens(x.reshape(-1, 64))
            for lin, layer in zip(lins, layers):
                expected = int8_reference(q_x, layer.qweight) * layer.scales * s_x + (lin.bias if bias else 0.0)
                torch.testing.assert_close(layer(x).reshape(1, -1), expected, rtol=1e-5, atol=1e-6)
            x.mul_(-3.0)  # an in-place edit: the cached codes must not be reused


def test_small_layers_avoid_the_slow_onednn_shapes() -> None:
    # oneDNN took milliseconds for <= 256 outputs at one token on the machine measured
    small, large = (Int8DynamicLinear.from_float(_layer(64, n)) for n in (256, 257))
    assert small.kernel_for(1, torch.device("cpu")) == "int_mm"
    assert large.kernel_for(1, torch.device("cpu")) == ("onednn_qlinear" if onednn_available() else "int_mm")


@pytest.mark.parametrize("in_features", [1, 2, 12])
def test_narrow_inputs_take_a_correct_path(in_features: int) -> None:
    # torch._int_mm returns garbage on CPU for one input column and several outputs
    layer = Int8DynamicLinear.from_float(_layer(in_features, 8, bias=False))
    assert layer.kernel_for(1, torch.device("cpu"), compiling=True) == "int8_emulated"
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
    q_x, s_x = quantize_tokens(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), int8_reference(q_x, layer.qweight) * layer.scales * s_x, rtol=1e-5, atol=1e-6)
