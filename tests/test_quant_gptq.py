from __future__ import annotations

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError
from llmslim.quant import RTN
from llmslim.quant.gptq import GPTQ, gptq_quantize

transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402


def _batches(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (1, seq), generator=g)} for _ in range(n)]


def _layer_problem(seed=0, out=16, inp=48, tokens=512):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs with a few loud channels: where error feedback pays
    x = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * 0.3
    x[:, :3] *= 8
    w = torch.randn(out, inp, generator=g)
    return w, x


def _output_error(w, wq, x):
    return ((x @ (w - wq).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, False), (4, None, True), (3, 16, False), (4, 20, False)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(act_order, bits, group_size, symmetric) -> None:
    from llmslim.quant import dequantize, quantize, search_params

    w, x = _layer_problem()
    h = 2 * x.T @ x / x.shape[0]
    out = gptq_quantize(w, h, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order, scale_dtype=torch.float32)
    gptq_w = dequantize(out["codes"], out["scale"], out["zero"], group_size=group_size if group_size and group_size < 48 else None)
    scale, zero = search_params(w, bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float32)
    rtn_w = dequantize(quantize(w, scale, zero, bits=bits, group_size=group_size), scale, zero, group_size=group_size)
    assert _output_error(w, gptq_w, x) < 0.8 * _output_error(w, rtn_w, x)


def test_pruned_zeros_stay_exactly_zero_through_error_feedback() -> None:
    w, x = _layer_problem(seed=1)
    w[w.abs() < 0.7] = 0.0
    h = 2 * x.T @ x / x.shape[0]
    from llmslim.quant import dequantize

    out = gptq_quantize(w, h, bits=4, group_size=16, symmetric=False, keep_zeros=w == 0, scale_dtype=torch.float32)
    assert (dequantize(out["codes"], out["scale"], out["zero"], group_size=16)[w == 0] == 0).all()


def test_a_singular_hessian_is_retried_with_more_damping() -> None:
    w = torch.randn(4, 8)
    h = torch.ones(8, 8) - 1e-3 * torch.eye(8)  # rank one minus a little: indefinite until damped
    out = gptq_quantize(w, h, bits=4, group_size=None, symmetric=True, damp=1e-6)
    assert out["retries"] > 0 and out["damp"] > 1e-6


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_gptq_pass_on_every_tiny_architecture(arch) -> None:
    model = models.tiny(arch)
    rtn_model = models.tiny(arch)
    batches = _batches()
    report = ls.compress_(model, GPTQ(bits=4, group_size=16), calibration=batches, progress=False)
    ls.compress_(rtn_model, RTN(bits=4, group_size=16), progress=False)
    rows = report.all_rows
    assert rows and all(r.kind == "QuantLinear" and r.bits == 4.0 for r in rows)
    assert all(r.error is not None and r.error < 0.5 for r in rows)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds - {"QuantLinear"} or arch in ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")
    ids = batches[0]["input_ids"]
    ref = models.tiny(arch)
    def outputs(m):
        with torch.no_grad():
            o = m(input_ids=ids)
        return getattr(o, "logits", None) if getattr(o, "logits", None) is not None else o.last_hidden_state
    gptq_err = (outputs(model) - outputs(ref)).norm()
    rtn_err = (outputs(rtn_model) - outputs(ref)).norm()
    assert gptq_err < rtn_err  # on its own calibration data GPTQ tracks the float model better


def test_gptq_after_pruning_keeps_every_zero() -> None:
    from llmslim.prune import Magnitude

    model = models.tiny("llama")
    report = ls.compress_(model, Magnitude(sparsity=0.5, ignore=("lm_head",)), GPTQ(bits=4, group_size=16),
                          calibration=_batches(), progress=False)
    for row in report.children[1].rows:
        q = model.get_submodule(row.module)
        assert q.weight_sparsity >= 0.5 - 1e-6, row.module


@pytest.mark.parametrize("act_order", [False, True])
def test_a_float32_solve_matches_the_float64_one(act_order) -> None:
    w, x = _layer_problem(seed=2, out=32, inp=96)
    h = 2 * x.T @ x / x.shape[0]
    kw = {"bits": 4, "group_size": 16, "symmetric": False, "act_order": act_order, "scale_dtype": torch.float32}
    f64 = gptq_quantize(w, h, solve_dtype=torch.float64, **kw)
    f32 = gptq_quantize(w, h, solve_dtype=torch.float32, **kw)
    assert (f64["solve_dtype"], f32["solve_dtype"]) == ("float64", "float32")
    assert (f64["codes"] == f32["codes"]).float().mean() > 0.99  # a code or two may round the other way
    assert f32["loss"] == pytest.approx(f64["loss"], rel=0.02)


def test_auto_solves_wide_layers_in_float32(monkeypatch) -> None:
    from llmslim.quant import gptq as gptq_module

    monkeypatch.setattr(gptq_module, "FLOAT64_MAX_COLUMNS", 48)
    w, x = _layer_problem()  # 48 columns
    h = 2 * x.T @ x / x.shape[0]
    assert gptq_quantize(w, h, bits=4, group_size=16, symmetric=False)["solve_dtype"] == "float64"
    assert gptq_quantize(w[:, :40], h[:40, :40], bits=4, group_size=16, symmetric=False)["solve_dtype"] == "float64"
    monkeypatch.setattr(gptq_module, "FLOAT64_MAX_COLUMNS", 47)
    assert gptq_quantize(w, h, bits=4, group_size=16, symmetric=False)["solve_dtype"] == "float32"
    model = nn.Sequential(nn.Linear(48, 8))
    report = ls.compress_(model, GPTQ(bits=4, group_size=16, ignore=()), calibration=[torch.randn(16, 48)], progress=False)
    assert report.all_rows[0].info["solve_dtype"] == "float32"


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"bits": 5}, "bits must be"), ({"group_size": 0}, "group_size must be"), ({"damp": 0.0}, "damp must be"),
     ({"block_size": 0}, "block_size must be"), ({"clip": "max"}, "clip must be"),
     ({"solve_dtype": "float16"}, "solve_dtype must be one of")],
)
def test_bad_configs(kwargs, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        GPTQ(**kwargs)


def test_quantizing_twice_is_refused_up_front() -> None:
    with pytest.raises(ls.errors.OrderError, match="cannot run after pass 'rtn'"):
        ls.PassManager([RTN(), GPTQ()]).check()


def test_weighted_grid_search_lowers_the_hessian_weighted_error_of_a_group() -> None:
    from llmslim.quant import dequantize, quantize, search_params
    from llmslim.quant.gptq import _weighted_mse_params

    g = torch.Generator().manual_seed(3)
    cols = torch.randn(32, 16, generator=g)
    cols[:, 0] *= 6  # an outlier column that carries little of the output
    importance = torch.rand(1, 16, generator=g) + 0.05
    importance[0, 0] = 0.01

    def weighted(s, z):
        approx = dequantize(quantize(cols, s, z, bits=4, group_size=None), s, z, group_size=None)
        return float(((approx - cols) ** 2 * importance).sum())

    ours = weighted(*_weighted_mse_params(cols, importance, bits=4, symmetric=False, scale_dtype=torch.float32))
    plain = weighted(*search_params(cols, bits=4, group_size=None, symmetric=False, method="mse", scale_dtype=torch.float32))
    minmax = weighted(*search_params(cols, bits=4, group_size=None, symmetric=False, scale_dtype=torch.float32))
    assert ours <= plain + 1e-9 and ours < minmax
