"""QuantLinear: every kernel path equals the dequantized reference; storage, checkpoints, devices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmslim._measure import model_bytes, module_stats
from llmslim.errors import ConfigError
from llmslim.quant import DECODE_MAX_TOKENS, QuantEmbedding, QuantLinear, release_workspace
from llmslim.quant._layout import int4_plan, pack_int4, unpack_int4

BF16_GEMM = "dequant_gemm_bf16"
# (out, in, bits, group_size, symmetric, scale dtype) -> (kernel at few tokens, format)
CASES = [
    ((64, 64, 4, 32, False, torch.bfloat16), "int4pack_mm"),
    ((48, 576, 4, 128, True, torch.bfloat16), "int4pack_mm"),  # 576 = 4 x 128 + 64: a remainder call
    ((40, 100, 4, 32, False, torch.float16), "int4pack_mm"),  # 40 rows padded to 48, 100 = 3 x 32 + 4 (padded to 32)
    ((24, 300, 4, None, False, torch.float32), "int4pack_mm"),  # per channel
    ((16, 1000, 4, 512, False, torch.bfloat16), "int4pack_mm"),  # groups larger than the kernel's
    ((32, 20, 4, None, True, torch.bfloat16), "int4pack_mm"),  # fewer columns than one kernel group
    ((32, 96, 4, 48, False, torch.bfloat16), BF16_GEMM),  # 48 is no multiple of 32: no kernel plan
    ((64, 64, 8, None, True, torch.bfloat16), "int8pack_mm"),
    ((33, 96, 8, None, False, torch.float32), "int8pack_mm"),  # asymmetric: zero-point correction
    ((30, 70, 8, None, True, torch.bfloat16), BF16_GEMM),  # 70 columns: the int8 kernel needs multiples of 32
    ((64, 64, 8, 16, False, torch.bfloat16), BF16_GEMM),  # grouped int8
    ((20, 30, 3, 8, False, torch.bfloat16), BF16_GEMM),
    ((20, 33, 2, None, True, torch.float16), BF16_GEMM),
]


def _layer(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    with torch.no_grad():
        lin.weight[:, ::5] = 0.0  # pruned columns must stay exactly zero
    return lin


def _quant(case):
    out_f, in_f, bits, group, sym, sdt = case
    return _layer(out_f, in_f), QuantLinear.from_float(_layer(out_f, in_f), bits=bits, group_size=group, symmetric=sym, scale_dtype=sdt)


@pytest.mark.parametrize(("case", "kernel"), CASES, ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_every_path_equals_the_dequantized_reference(case, kernel, tokens) -> None:
    lin, q = _quant(case)
    expected = kernel if tokens <= DECODE_MAX_TOKENS.get(kernel, -1) else BF16_GEMM
    assert q.kernel_for(tokens) == expected
    x = torch.randn(tokens, case[1])
    w = q.dequantize(torch.float32)
    reference = x.to(torch.bfloat16).float() @ w.T + lin.bias.detach()  # CPU paths see a bfloat16 activation
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (tokens, case[0])
    # bfloat16 rounding of the output (and of the weight on the GEMM path): about 2**-8 relative
    assert (y - reference).abs().max() <= 1e-2 * reference.abs().max()
    assert bool((w[lin.weight == 0] == 0).all())


@pytest.mark.parametrize(("case", "kernel"), CASES[:2] + CASES[7:9], ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else c)
def test_a_wrong_scale_would_be_caught(case, kernel) -> None:
    # the tolerance above is tight enough to see one group's scale off by 10%
    lin, q = _quant(case)
    x = torch.randn(3, case[1])
    state = q.packed_state()
    state["scales"] = state["scales"].clone()
    state["scales"][:, 0] *= 1.1
    broken = QuantLinear(case[1], case[0], bits=case[2], group_size=case[3], symmetric=case[4], scale_dtype=case[5])
    broken.load_state_dict({**state, "bias": lin.bias.detach()})
    reference = x.to(torch.bfloat16).float() @ q.dequantize(torch.float32).T + lin.bias.detach()
    assert (broken(x) - reference).abs().max() > 1e-2 * reference.abs().max()


def test_leading_dimensions_dtypes_and_autograd() -> None:
    lin, q = _quant(CASES[0][0])
    x = torch.randn(2, 3, 64)
    assert q(x).shape == (2, 3, 64)
    assert q(x.double()).dtype == torch.float64
    x.requires_grad_(True)
    q(x).sum().backward()  # the differentiable path dequantizes in the input's dtype
    assert x.grad is not None and torch.allclose(x.grad[1, 2], q.dequantize().sum(0), atol=1e-5)
    assert q(torch.randn(0, 64)).shape == (0, 64)
    with pytest.raises(ValueError, match="last dimension must be 64"):
        q(torch.randn(2, 63))


def test_two_layers_sharing_the_workspace_do_not_clobber_each_other() -> None:
    a, b = _quant(CASES[0][0])[1], _quant((64, 64, 4, 32, True, torch.bfloat16))[1]
    x = torch.randn(300, 64)
    ya = a(x)
    b(x)  # overwrites the shared dequantization buffer
    assert torch.equal(ya, a(x))
    assert release_workspace() > 0


@pytest.mark.parametrize("case", [c for c, _ in CASES], ids=lambda c: "-".join(map(str, c)))
def test_state_dict_is_portable_and_round_trips(case) -> None:
    lin, q = _quant(case)
    state = q.state_dict()
    out_f, in_f, bits, group, sym, sdt = case
    assert set(state) == {"bias", "qweight", "scales"} | (set() if sym else {"zeros"})
    assert state["qweight"].dtype == torch.uint8 and state["scales"].dtype == sdt
    fresh = QuantLinear(in_f, out_f, bits=bits, group_size=group, symmetric=sym, scale_dtype=sdt)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.codes(), q.codes()) and torch.equal(fresh.dequantize(), q.dequantize())
    x = torch.randn(2, in_f)
    assert torch.equal(fresh(x), q(x)) and fresh.kernel == q.kernel


def test_from_codes_builds_the_same_layer_as_from_float() -> None:
    lin, q = _quant(CASES[1][0])
    codes, state = q.codes(), q.packed_state()
    again = QuantLinear.from_codes(codes, state["scales"], state.get("zeros"), bits=4, group_size=128, bias=lin.bias)
    x = torch.randn(3, 576)
    assert torch.equal(again(x), q(x)) and again.symmetric and again.kernel == q.kernel
    with pytest.raises(ConfigError, match="scale and zero must have shape"):
        QuantLinear.from_codes(codes, state["scales"][:, :2], None, bits=4, group_size=128)


def test_loading_a_mismatched_checkpoint_fails_loudly() -> None:
    _, q = _quant(CASES[0][0])
    state = q.state_dict()
    other = QuantLinear(64, 64, bits=4, group_size=16, symmetric=False)
    with pytest.raises(RuntimeError, match="scales: shape"):
        other.load_state_dict(state)
    with pytest.raises(RuntimeError, match="Missing key"):
        QuantLinear(64, 64, bits=4, group_size=32, symmetric=False).load_state_dict({"bias": state["bias"]})


def test_measurements_are_true() -> None:
    lin, q = _quant(CASES[0][0])
    stats = module_stats(q)
    # 4-bit codes + one bfloat16 (scale, offset) pair per 32 weights + 64 float32 biases
    assert stats.bytes == 64 * 64 // 2 + 64 * 2 * 2 * 2 + 64 * 4 == model_bytes(q)
    assert stats.params == 64 * 64 + 64 and stats.bits == 4.0
    assert stats.sparsity == float((q.dequantize() == 0).float().mean()) >= 0.2
    assert q.bytes_per_weight == pytest.approx(0.5 + 4 / 32)


def test_moving_and_casting_keep_the_codes_and_the_scale_dtype() -> None:
    lin, q = _quant(CASES[1][0])
    codes, w = q.codes(), q.dequantize()
    q.to(torch.float64)
    assert q.weight_dtype == torch.float64 and q.bias.dtype == torch.float64 and q.scale_dtype == torch.bfloat16
    assert torch.equal(q.codes(), codes) and torch.equal(q.dequantize(torch.float32), w) and q.kernel == "int4pack_mm"
    dup = copy.deepcopy(q)
    x = torch.randn(4, 576, dtype=torch.float64)
    assert torch.equal(dup(x), q(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dequantizes_in_the_activation_dtype() -> None:
    lin, q = _quant(CASES[1][0])
    ref_w = q.dequantize()
    q.cuda()
    assert q.kernel == "dequant_gemm" and q.qweight.is_cuda
    x = torch.randn(5, 576, device="cuda", dtype=torch.float16)
    y = q(x)
    reference = x.float() @ ref_w.cuda().T + lin.bias.detach().cuda()
    assert y.dtype == torch.float16 and (y.float() - reference).abs().max() <= 1e-2 * reference.abs().max()
    q.cpu()
    assert q.kernel == "int4pack_mm" and torch.equal(q.dequantize(), ref_w)


def test_conv1d_and_bad_arguments() -> None:
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(48, 64)  # weight (in=64, out=48)
    q = QuantLinear.from_float(conv, bits=8, group_size=None)
    x = torch.randn(3, 64)
    assert q.out_features == 48 and (q(x) - conv(x)).abs().max() < 0.05 * conv(x).abs().max()
    for kwargs, message in [
        (dict(bits=5), "bits must be one of 2, 3, 4, 8"),
        (dict(group_size=0), "group_size must be a positive integer or None"),
        (dict(scale_dtype=torch.int8), "scale_dtype must be bfloat16, float16 or float32"),
    ]:
        with pytest.raises(ConfigError, match=message):
            QuantLinear(8, 8, **kwargs)
    with pytest.raises(ConfigError, match="nn.Linear or a transformers Conv1D"):
        QuantLinear.from_float(nn.Conv2d(2, 2, 1))


def test_int4_layout_model_reproduces_torch_packing() -> None:
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(64, 32), (80, 64), (208, 96), (16, 256)]:
        u = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        packed = pack_int4(u)
        assert packed is not None
        assert torch.equal(unpack_int4(packed[0], rows, cols, packed[1]), u)
    plan = int4_plan(576, 576, 128)
    assert (plan.main, plan.rem, plan.rem_padded, plan.source) == (512, 64, 64, (0, 1, 2, 3, 4))
    assert int4_plan(8, 96, 48) is None and int4_plan(8, 100, None).padded_out == 16


def test_tied_output_layer_reads_the_embedding_table() -> None:
    emb = nn.Embedding(100, 64)
    qe = QuantEmbedding.from_float(emb)
    head = QuantLinear.tied(qe)
    assert head.logical_params == 0 and model_bytes(head) == 0 and head.kernel == "int8pack_mm"
    x = torch.randn(3, 64)
    assert torch.allclose(head(x), x.to(torch.bfloat16).float() @ qe.dequantize().T, rtol=1e-2, atol=1e-2)
    ids = torch.tensor([[1, 5]])
    assert (qe(ids) - emb(ids)).abs().max() <= qe.scales.float().max() / 2 + 1e-6
    assert head.state_dict() == {}
    with pytest.raises(ConfigError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(4, 4, max_norm=1.0))


@pytest.mark.slow
def test_torch_compile_runs_every_cpu_path() -> None:
    for case, _ in (CASES[0], CASES[1], CASES[7], CASES[11]):
        lin, q = _quant(case)
        compiled = torch.compile(q)
        for tokens in (1, 100):
            x = torch.randn(tokens, case[1])
            with torch.no_grad():
                eager = q(x)
                assert (compiled(x) - eager).abs().max() <= 1e-2 * eager.abs().max()


def test_int8_kernel_keeps_float32_scales_unrounded() -> None:
    # a one-hot token reads one column of codes: the exact answer is q[:, j] * s in float32, which
    # a scale rounded to the kernel's bfloat16 would miss by up to 2**-9
    lin = _layer(64, 64)
    q = QuantLinear.from_float(lin, bits=8, group_size=None, symmetric=True, scale_dtype=torch.float32)
    assert q.kernel_for(1) == "int8pack_mm" and q.scales.dtype == torch.float32
    assert not torch.equal(q.scales.to(torch.bfloat16).float(), q.scales)  # the test can see a rounding
    x = torch.zeros(1, 64)
    x[0, 3] = 1.0
    expected = q.dequantize(torch.float32)[:, 3] + lin.bias.detach()
    torch.testing.assert_close(q(x)[0], expected, rtol=1e-6, atol=1e-6)
