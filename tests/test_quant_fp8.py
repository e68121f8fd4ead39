"""The fp8 pass and FP8Linear: e4m3 round trips, saturation, zeros, kernel paths, architectures, configs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError
from llmslim.quant import FP8, FP8Linear, fp8_dequantize, fp8_quantize
from llmslim.quant._fp8 import FP8_MAX, _quantize_tokens, fp8_to_bfloat16, scaled_mm_available, to_fp8

E4M3 = torch.float8_e4m3fn
SMALLEST_NORMAL = 2.0**-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-4, 0.02, 3.0, 1e3])
def test_round_trip_error_is_within_e4m3_bounds(scale_dtype: torch.dtype, magnitude: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 200, generator=g) * magnitude
    w[:, ::7] *= 1e-3  # some tiny weights: subnormal codes
    codes, scale = fp8_quantize(w, scale_dtype=scale_dtype)
    assert codes.dtype == E4M3 and scale.dtype == scale_dtype and scale.shape == (32,)
    approx = fp8_dequantize(codes, scale)
    s = scale.float()[:, None]
    scaled = (w / s).abs()
    assert float(scaled.max()) <= FP8_MAX * (1 + 1e-6)  # scales round up: nothing is clamped by more than float rounding
    err = (approx - w).abs()
    normal = scaled >= SMALLEST_NORMAL
    # e4m3: 3 mantissa bits -> half a step is 2**-4 of the value for normal numbers ...
    assert bool((err[normal] <= 2.0**-4 * w.abs()[normal] * (1 + 1e-6)).all())
    # ... and half the subnormal spacing 2**-9 (times the scale) below them
    assert bool((err[~normal] <= 2.0**-10 * s.expand_as(w)[~normal] * (1 + 1e-6)).all())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_mse_scale_search_never_does_worse_than_minmax(scale_dtype: torch.dtype) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    w[5] = 0.0
    errors = {}
    for clip in ("minmax", "mse"):
        codes, scale = fp8_quantize(w, scale_dtype=scale_dtype, clip=clip)
        approx = fp8_dequantize(codes, scale)
        assert bool((approx[w == 0] == 0).all())
        errors[clip] = (approx - w).square().sum(dim=1)
    assert bool((errors["mse"] <= errors["minmax"]).all()) and float(errors["mse"].sum()) < float(errors["minmax"].sum())


def test_saturating_clamp_at_448_and_zeros_stay_zero() -> None:
    x = torch.tensor([448.0, 449.0, 500.0, 1e6, -1e30, -460.0, 0.0, -0.0])
    assert to_fp8(x).float().tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, -448.0, 0.0, 0.0]
    w = torch.randn(8, 64)
    w[:, ::3] = 0.0
    w[2] = 0.0  # an all-zero row: scale 1, codes 0
    codes, scale = fp8_quantize(w)
    approx = fp8_dequantize(codes, scale)
    assert bool((approx[w == 0] == 0).all()) and float(scale[2]) == 1.0
    layer = FP8Linear.from_float(_linear(w))
    assert layer.weight_sparsity == pytest.approx(float((w == 0).float().mean()))


def test_widening_to_bfloat16_is_exact_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(E4M3)  # every finite code, subnormals and -0 included
    assert torch.equal(fp8_to_bfloat16(codes).float(), codes.float())


def _linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("activations", ["none", "dynamic"])
def test_forward_equals_the_dequantized_reference(tokens: int, activations: str) -> None:
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(96, 48)
    layer = FP8Linear.from_float(lin, activations=activations)
    x = torch.randn(tokens, 96, generator=g)
    xa = x
    if activations == "dynamic":
        xq, sx = _quantize_tokens(x)
        xa = xq.float() * sx
    reference = F.linear(xa, layer.dequantize(torch.float32), layer.bias).detach()
    y = layer(x)
    assert y.shape == (tokens, 48) and y.dtype == torch.float32
    assert _rel(y, reference) < 1e-2  # bfloat16 activations inside the layer
    assert _rel(layer(x.reshape(1, tokens, 96)).reshape(tokens, 48), reference) < 1e-2
    # autograd: dequantize in the input's dtype, differentiable
    xg = x.clone().requires_grad_()
    yg = layer(xg)
    assert _rel(yg.detach(), reference.detach()) < 1e-5
    yg.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_dynamic_activations_match_torchs_scaled_mm() -> None:
    # torch has a (slow) float8 GEMM on CPU too: the emulated path must compute what it computes
    lin = nn.Linear(64, 32, bias=False)
    layer = FP8Linear.from_float(lin, activations="dynamic")
    x = torch.randn(5, 64)
    xq, sx = _quantize_tokens(x)
    expected = torch._scaled_mm(xq, layer.qweight.t(), scale_a=sx, scale_b=layer.scales.float().view(1, -1),
                                out_dtype=torch.float32)
    assert _rel(layer(x), expected) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_equal_the_reference() -> None:
    lin = nn.Linear(256, 128)
    for activations in ("none", "dynamic"):
        layer = FP8Linear.from_float(lin, activations=activations).cuda()
        x = torch.randn(33, 256, device="cuda")
        xa = x
        if activations == "dynamic":
            xq, sx = _quantize_tokens(x)
            xa = xq.float() * sx
        reference = F.linear(xa, layer.dequantize(torch.float32), layer.bias)
        expected = "scaled_mm" if activations == "dynamic" and scaled_mm_available(x.device) else "dequant_gemm"
        assert layer.kernel == expected
        assert _rel(layer(x).float(), reference) < 1e-2


def test_report_rows_bytes_and_kernels() -> None:
    model = nn.Sequential(nn.Linear(576, 256), nn.ReLU(), nn.Linear(256, 64))
    report = ls.compress_(model, FP8(), progress=False)
    first, second = report.all_rows
    assert (first.kind, first.bits, first.info["kernel"], first.info["activations"]) == ("FP8Linear", 8.0, "dequant_gemm_bf16", "none")
    assert first.bytes_before == (576 * 256 + 256) * 4
    assert first.bytes_after == 576 * 256 + 256 * 4 + 256 * 4  # a byte per weight, a float32 scale per row, the bias
    assert model[0].bytes_per_weight <= 1.01  # half of bfloat16
    assert 0.0 < first.error < 0.04 and second.params_after == 256 * 64 + 64
    assert report.children[0].name == "fp8"


def test_dtype_moves_never_cast_codes_and_state_dict_round_trips() -> None:
    layer = FP8Linear.from_float(nn.Linear(64, 32), scale_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    expected = layer(x)
    again = FP8Linear(64, 32, scale_dtype=torch.bfloat16)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again(x), expected)
    layer.to(torch.float64)
    assert layer.qweight.dtype == E4M3 and layer.scales.dtype == torch.bfloat16 and layer.bias.dtype == torch.float64
    assert _rel(layer(x.double()).float(), expected) < 1e-2


transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_fp8_on_every_tiny_architecture(arch: str) -> None:
    model = models.tiny(arch)
    reference = _logits(model)
    linear_like = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and not n.endswith("lm_head")}
    quantized = copy.deepcopy(model)
    report = ls.compress_(quantized, FP8(), progress=False)
    assert {n for n, m in quantized.named_modules() if isinstance(m, FP8Linear)} == linear_like
    assert {r.module for r in report.all_rows} == linear_like
    assert _rel(_logits(quantized), reference) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scale_dtype="float16"), "scale_dtype must be one of 'float32', 'bfloat16' (got 'float16')"),
        (dict(activations="static"), "activations must be one of 'none', 'dynamic' (got 'static')"),
        (dict(clip="hqq"), "clip must be one of 'mse', 'minmax' (got 'hqq')"),
        (dict(targets=()), "targets must not be empty"),
    ],
)
def test_bad_configs_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FP8(**kwargs)


def test_bad_layer_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="in_features must be a positive integer"):
        FP8Linear(0, 4)
    with pytest.raises(ConfigError, match="activations must be one of"):
        FP8Linear(4, 4, activations="static")
    with pytest.raises(ConfigError, match="2-D floating-point"):
        fp8_quantize(torch.ones(4))
    with pytest.raises(ConfigError, match="nn.Linear or a transformers Conv1D"):
        FP8Linear.from_float(nn.Conv2d(2, 2, 1))
