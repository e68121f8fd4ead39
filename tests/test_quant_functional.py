"""Pure quantization functions: grids, quantize/dequantize round trips, bit packing, clipping search."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmslim.errors import ConfigError
from llmslim.quant import (
    BITS,
    CLIP_METHODS,
    code_range,
    dequantize,
    fake_quantize,
    num_groups,
    pack,
    quant_params,
    quantize,
    relative_error,
    row_bytes,
    search_params,
    unpack,
)
from llmslim.quant._functional import expand_groups
from llmslim.testing import strategies as lst

SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
group_sizes = st.one_of(st.none(), st.integers(1, 48))


def _round_trip(w, bits, group_size, symmetric, scale_dtype=torch.float32):
    scale, zero = quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    q = quantize(w, scale, zero, bits=bits, group_size=group_size)
    return q, scale, zero, dequantize(q, scale, zero, group_size=group_size)


@given(w=lst.weights(), bits=st.sampled_from(BITS), group_size=group_sizes, symmetric=st.booleans(), scale_dtype=st.sampled_from(SCALE_DTYPES))
def test_dequantize_is_within_half_a_step(w, bits, group_size, symmetric, scale_dtype) -> None:
    q, scale, zero, approx = _round_trip(w, bits, group_size, symmetric, scale_dtype)
    qmin, qmax = code_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= qmin and int(q.max()) <= qmax
    step = expand_groups(scale.float(), w.shape[1], group_size)
    # half a step, plus float32 rounding of w / s and of the product
    assert bool(((approx - w).abs() <= step * (0.5 + 1e-5) + 1e-6 * w.abs()).all())
    assert bool((scale.float() > 0).all()) and scale.dtype == scale_dtype


@given(w=lst.weights(pathologies=["zero_rows", "outliers"]), bits=st.sampled_from(BITS), group_size=group_sizes, symmetric=st.booleans())
def test_zeros_stay_exactly_zero(w, bits, group_size, symmetric) -> None:
    w = w.clone()
    w[:, ::3] = 0.0  # pruned columns on top of whatever the weight has
    _, _, zero, approx = _round_trip(w, bits, group_size, symmetric, torch.bfloat16)
    assert bool((approx[w == 0] == 0).all())
    assert (zero is None) == symmetric


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    bits=st.sampled_from(BITS),
    seed=lst.seeds(),
)
def test_packing_is_lossless_and_sized(rows, cols, bits, seed) -> None:
    qmin, qmax = code_range(bits)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(qmin, qmax + 1, (rows, cols), generator=g, dtype=torch.int8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, row_bytes(cols, bits))
    assert torch.equal(unpack(packed, bits, cols), q)


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (8, [-128, -1, 0, 127], [0x80, 0xFF, 0x00, 0x7F]),  # two's complement bytes
        (4, [-8, 7, 0], [0xF0, 0x88]),  # offset binary, low nibble first; padding is code 0
        (2, [-2, -1, 0, 1, 1], [0b11100100, 0b10101011]),
        (3, [-4, -3, -2, -1, 0, 1, 2, 3], [0x88, 0xC6, 0xFA]),  # eight codes in a 24-bit word
    ],
)
def test_documented_bit_layouts(bits, codes, expected) -> None:
    assert pack(torch.tensor([codes], dtype=torch.int8), bits).tolist() == [expected]


@pytest.mark.parametrize(
    ("cols", "group_size", "groups"),
    [(576, 128, 5), (576, 64, 9), (576, None, 1), (576, 1000, 1), (7, 3, 3), (1, 1, 1)],
)
def test_group_counts_with_remainders(cols, group_size, groups) -> None:
    assert num_groups(cols, group_size) == groups
    w = torch.randn(3, cols)
    scale, _ = quant_params(w, bits=4, group_size=group_size, symmetric=True)
    assert scale.shape == (3, groups)


def test_a_short_last_group_gets_its_own_scale() -> None:
    w = torch.cat([torch.full((1, 128), 1.0), torch.full((1, 64), 100.0)], dim=1)
    scale, _ = quant_params(w, bits=4, group_size=128, symmetric=True)
    assert scale[0, 0] == pytest.approx(1 / 7) and scale[0, 1] == pytest.approx(100 / 7)
    assert relative_error(w, fake_quantize(w, bits=4, group_size=128, symmetric=True)) < 1e-6


def test_asymmetric_grid_uses_every_code_on_a_skewed_range() -> None:
    w = torch.linspace(-1.0, 14.0, 16).unsqueeze(0)
    q, scale, zero, approx = _round_trip(w, 4, None, False)
    assert q.tolist() == [list(range(-8, 8))] and int(zero) == -7
    assert torch.allclose(approx, w)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: code_range(5), "bits must be one of 2, 3, 4, 8 (got 5)"),
        (lambda: num_groups(10, 0), "group_size must be a positive integer or None (got 0)"),
        (lambda: num_groups(10, -4), "group_size must be a positive integer or None (got -4)"),
        (lambda: quant_params(torch.ones(3), bits=4, group_size=None, symmetric=True), "weight must be a 2-D floating-point tensor"),
        (lambda: quant_params(torch.ones(2, 2, dtype=torch.int64), bits=4, group_size=None, symmetric=True), "2-D floating-point"),
        (lambda: search_params(torch.ones(2, 2), bits=4, group_size=None, symmetric=True, method="best"), "clip must be one of"),
    ],
)
def test_bad_arguments_say_what_they_must_be(call, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_tiny_weights_keep_a_positive_scale_in_float16() -> None:
    w = torch.randn(4, 32) * 1e-9  # below float16's smallest normal
    q, scale, _, approx = _round_trip(w, 4, 8, True, torch.float16)
    assert bool((scale > 0).all())
    assert bool(((approx - w).abs() <= scale.float().repeat_interleave(8, 1) / 2 + 1e-12).all())


@given(w=lst.weights(), bits=st.sampled_from((2, 3, 4)), group_size=group_sizes, symmetric=st.booleans(), method=st.sampled_from(CLIP_METHODS))
def test_clipping_search_keeps_the_grid_and_never_loses_to_minmax_on_its_objective(w, bits, group_size, symmetric, method) -> None:
    scale, zero = search_params(w, bits=bits, group_size=group_size, symmetric=symmetric, method=method)
    base_s, base_z = quant_params(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert scale.shape == base_s.shape and (zero is None) == symmetric
    if zero is not None:
        assert torch.equal(zero, base_z) or method == "mse"  # hqq keeps the integer zero point
    q = quantize(w, scale, zero, bits=bits, group_size=group_size)
    approx = dequantize(q, scale, zero, group_size=group_size)
    assert bool((approx[w == 0] == 0).all())
    if method == "mse":
        base = fake_quantize(w, bits=bits, group_size=group_size, symmetric=symmetric)
        assert float(((approx - w) ** 2).sum()) <= float(((base - w) ** 2).sum()) * (1 + 1e-6) + 1e-30


def test_clipping_lowers_the_error_on_a_weight_with_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.004] *= 30
    errors = {}
    for method in CLIP_METHODS:
        s, z = search_params(w, bits=4, group_size=128, symmetric=False, method=method)
        errors[method] = relative_error(w, dequantize(quantize(w, s, z, bits=4, group_size=128), s, z, group_size=128))
    assert errors["mse"] < errors["minmax"] * 0.99
    assert errors["hqq"] < errors["minmax"]
