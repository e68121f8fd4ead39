"""Re-fitting kept weights to the dense outputs: refit_kept's optimum and the passes' ``refit`` field."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim import models
from llmslim.errors import ConfigError
from llmslim.prune import SparseGPT, Wanda, refit_kept


def _problem(seed: int, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * inp, inp, generator=g) @ torch.randn(inp, inp, generator=g)
    h = x.T @ x / x.shape[0] + 0.1 * torch.eye(inp)  # correlated, well conditioned
    return torch.randn(out, inp, generator=g), h, torch.rand(out, inp, generator=g) > 0.5


def _loss(v: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    return float(((v - w) @ h * (v - w)).sum())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 12), st.integers(1, 8))
def test_refit_never_revives_a_pruned_weight_and_never_raises_the_error(seed: int, out: int, inp: int, iters: int) -> None:
    w, h, keep = _problem(seed, out, inp)
    fitted = refit_kept(w, w * keep, keep, h, damping=0.0, iterations=iters)
    assert bool((fitted[~keep] == 0).all())
    assert _loss(fitted, w, h) <= _loss(w * keep, w, h) * (1 + 1e-5) + 1e-6


def test_refit_reaches_each_rows_least_squares_optimum() -> None:
    w, h, keep = _problem(3, 4, 10)
    fitted = refit_kept(w, torch.zeros_like(w), keep, h, damping=0.0, iterations=30)
    for r in range(w.shape[0]):
        k = keep[r]
        # the optimum of tr((v - w) H (v - w)^T) over v supported on k: H_kk v_k = (H w)_k
        exact = torch.linalg.solve(h[k][:, k].double(), (h.double() @ w[r].double())[k])
        torch.testing.assert_close(fitted[r, k].double(), exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("scale", [1e-42, 1e-30, 1.0, 1e30])
def test_refit_does_not_depend_on_the_hessians_scale(scale: float) -> None:
    # activations of ~1e-21 square to float32 denormals: the fit must neither turn NaN nor move
    w, h, keep = _problem(5, 3, 8)
    expected = refit_kept(w, w * keep, keep, h, damping=0.01, iterations=8)
    fitted = refit_kept(w, w * keep, keep, h * scale, damping=0.01, iterations=8)
    assert bool(torch.isfinite(fitted).all())
    torch.testing.assert_close(fitted, expected, rtol=1e-3 if scale > 1e-38 else 0.1, atol=1e-3 if scale > 1e-38 else 0.1)


def test_refit_without_input_energy_returns_the_masked_start() -> None:
    w, _, keep = _problem(6, 3, 5)
    fitted = refit_kept(w, w * keep, keep, torch.zeros(5, 5), iterations=4)
    assert torch.equal(fitted, w * keep)


def _batches(n: int = 4) -> list[dict]:
    return [{"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(n)]


def _first_block(report: ls.Report) -> dict[str, float]:
    return {r.module: r.error for r in report.children[0].rows if r.module.startswith("model.layers.0.")}


@pytest.mark.parametrize("cls", [Wanda, SparseGPT])
def test_refit_keeps_the_mask_and_lowers_each_layers_error(cls: type) -> None:
    plain, fitted = models.tiny("llama"), models.tiny("llama")
    a = ls.compress_(plain, cls(sparsity=0.5, ignore=["lm_head"], propagate="original"), calibration=_batches(), progress=False)
    b = ls.compress_(fitted, cls(sparsity=0.5, ignore=["lm_head"], propagate="original", refit=10), calibration=_batches(), progress=False)
    # compress_ finalizes (masks baked into zeros): the same zeros, and different kept weights
    zeros = {n: m.weight == 0 for n, m in plain.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
    moved = {n: m.weight for n, m in fitted.named_modules() if n in zeros}
    assert zeros and all(torch.equal(zeros[n], moved[n] == 0) for n in zeros)
    assert not torch.equal(dict(plain.named_modules())["model.layers.0.mlp.down_proj"].weight, moved["model.layers.0.mlp.down_proj"])
    errors = _first_block(b)
    assert all(r.info["refit"] == 10 for r in b.children[0].rows)
    if cls is SparseGPT:  # the same inputs in block 0: the re-fit error is never above the sweep's
        assert all(errors[n] <= e + 1e-6 for n, e in _first_block(a).items())
    else:  # Wanda's rows report the error only when X^T X was collected for the re-fit
        assert all(e is None for e in _first_block(a).values()) and all(0 <= e < 1 for e in errors.values())


@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [
        (Wanda, {"refit": -1}, "wanda: refit must be an integer in [0, 1000] (got -1)"),
        (SparseGPT, {"refit": 1001}, "sparsegpt: refit must be an integer in [0, 1000] (got 1001)"),
        (SparseGPT, {"refit": 5, "bits": 4}, "sparsegpt: refit must be 0 with bits set"),
        (Wanda, {"damping": -0.1}, "wanda: damping must be in [0, 100]"),
    ],
)
def test_bad_refit_configs_are_rejected(cls: type, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        cls(**fields)
