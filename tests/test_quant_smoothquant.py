"""The ``smoothquant`` pass: outlier migration that keeps the float function, then ``w8a8``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.errors import ConfigError, OrderError
from llmslim.quant import W8A8, SmoothQuant
from llmslim.quant._smooth_map import find_couplings, smooth_scales
from llmslim.testing import make_model


def _ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


@settings(max_examples=50, deadline=None)
@given(
    x=st.lists(st.floats(0.0, 1e4), min_size=1, max_size=8),
    w=st.lists(st.floats(0.0, 1e2), min_size=8, max_size=8),
    alpha=st.floats(0.0, 1.0),
)
def test_scales_are_positive_and_balance_the_ranges(x: list[float], w: list[float], alpha: float) -> None:
    xa, wa = torch.tensor(x), torch.tensor(w[: len(x)])
    s = smooth_scales(xa, wa, alpha)
    assert torch.all(s > 0) and torch.all(torch.isfinite(s))
    live = (xa > 1e-3) & (wa > 1e-3) & (s > 1e-5) & (s < 1e5)
    # after smoothing, activation range^alpha == weight range^(1-alpha) (both (x w)^(alpha (1-alpha)));
    # alpha = 0.5 makes the two ranges equal
    lhs, rhs = (xa / s)[live].double().pow(alpha), (wa * s)[live].double().pow(1 - alpha)
    torch.testing.assert_close(lhs, rhs, rtol=1e-3, atol=1e-6)
    assert torch.all(s[(xa == 0) | (wa == 0)] == 1.0)


@pytest.mark.parametrize("scope", ["all", "norms"])
@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_float_function_is_unchanged(arch: str, scope: str) -> None:
    model = models.tiny(arch)
    ids = _ids()
    before = _logits(model, ids)
    report = ls.compress_(model, SmoothQuant(alpha=0.5, scope=scope), calibration=[_ids(1), _ids(2)], progress=False)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
    # BERT is post-norm: only its value->output projections can be smoothed
    assert bool(report.all_rows) == (arch != "bert" or scope == "all"), report.children[0].notes


def test_every_coupling_kind_is_found_on_llama() -> None:
    couplings, notes = find_couplings(models.tiny("llama", heads=4, kv_heads=2))
    kinds = {c.kind for c in couplings}
    assert kinds == {"norm", "heads", "gated"} and not notes
    heads = next(c for c in couplings if c.kind == "heads")
    assert heads.repeat == 2 and heads.head_dim == 16  # grouped value heads, mapped


def test_unsupported_places_are_named_in_notes() -> None:
    _, gpt2 = find_couplings(models.tiny("gpt2"))
    assert any("attn.c_proj" in n for n in gpt2)  # fused q/k/v: no value projection to fold into
    _, bert = find_couplings(models.tiny("bert"))
    assert any("LayerNorm" in n and "post-norm" in n for n in bert)
    _, norms_only = find_couplings(models.tiny("llama"), scope="norms")
    assert any("o_proj" in n for n in norms_only) and any("down_proj" in n for n in norms_only)


def test_a_norm_whose_output_does_not_scale_with_its_weight_is_skipped() -> None:
    class OnePlusNorm(nn.Module):  # Gemma-style: (1 + w) * x / rms(x)
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(dim) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model, batch = make_model("attention", seed=0)
    for block in model.layers:
        block.norm1 = OnePlusNorm(block.q_proj.in_features)
    before = model(batch).detach()
    report = ls.compress_(model, SmoothQuant(), calibration=[batch], progress=False)
    torch.testing.assert_close(model(batch).detach(), before, rtol=1e-4, atol=1e-4)
    assert any("does not scale with its weight" in n for n in report.children[0].notes)


def _with_outliers(seed: int = 0) -> nn.Module:
    # LLM-like activations: a few norm channels 60x the others feed q/k/v and gate/up
    model = models.tiny("llama", seed=seed, hidden=128, intermediate=256)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 77, 100]] *= 60.0
    return model


def test_smoothing_before_w8a8_lowers_the_output_error() -> None:
    calibration, ids = [_ids(s, 4, 32) for s in range(1, 4)], _ids(9, 4, 32)
    reference = _logits(_with_outliers(), ids)
    plain = _with_outliers()
    ls.compress_(plain, W8A8(), progress=False)
    smoothed = _with_outliers()
    report = ls.compress_(smoothed, SmoothQuant(alpha=0.5), W8A8(), calibration=calibration, progress=False)
    error = {name: float((_logits(m, ids) - reference).norm() / reference.norm()) for name, m in (("plain", plain), ("smoothed", smoothed))}
    assert error["smoothed"] < 0.7 * error["plain"], error
    rows = [r for r in report.children[0].rows if r.module.endswith("q_proj")]
    assert all(r.info["outlier_ratio_after"] < r.info["outlier_ratio_before"] / 4 for r in rows)


def test_pruned_zeros_stay_zero() -> None:
    model = models.tiny("llama")
    ls.compress_(model, ls.get_pass("magnitude")(sparsity=0.5), progress=False)
    zeros = {n: (m.weight == 0) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ls.compress_(model, SmoothQuant(), calibration=[_ids(1)], progress=False)
    for name, mask in zeros.items():
        assert torch.all(model.get_submodule(name).weight[mask] == 0), name


@pytest.mark.parametrize("bad", [{"alpha": -0.1}, {"alpha": 1.5}, {"scope": "everything"}, {"alpha": "half"}])
def test_bad_configs_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError):
        SmoothQuant(**bad)


def test_order_and_requirements() -> None:
    model = models.tiny("llama")
    with pytest.raises(OrderError):
        ls.compress_(model, W8A8(), SmoothQuant(), calibration=[_ids()], progress=False)
    with pytest.raises(ls.errors.CalibrationError):
        ls.compress_(model, SmoothQuant(), progress=False)
    assert SmoothQuant(alpha=0.8).to_spec() == {"pass": "smoothquant", "alpha": 0.8}


def test_shares_a_calibration_sweep_with_gptq() -> None:
    from llmslim.quant import GPTQ

    model = models.tiny("llama")
    ids = _ids()
    reference = _logits(model, ids)
    report = ls.compress_(model, SmoothQuant(), GPTQ(bits=8, group_size=None), calibration=[_ids(s, 1, 32) for s in range(3)], progress=False)
    assert [c.name for c in report.children] == ["smoothquant", "gptq"]
    assert any("shared calibration sweep" in n for n in report.children[1].notes)
    assert float((_logits(model, ids) - reference).norm() / reference.norm()) < 0.02
