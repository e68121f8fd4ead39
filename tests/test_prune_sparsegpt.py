"""SparseGPT: the OBS solver (error below magnitude's, exact counts, dead inputs, damping
retries) and the pass on a real engine sweep (reconstruction error, reports, configuration)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.errors import CalibrationError, ConfigError
from llmslim.prune import (
    Magnitude,
    SparseGPT,
    get_mask,
    inverse_hessian_factor,
    nm_mask,
    obs_prune,
    relative_output_error,
    row_mask,
    unstructured_mask,
)


def _correlated(tokens: int, width: int, seed: int) -> torch.Tensor:
    # inputs with correlated channels of different scales: where OBS compensation has work to do
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    scales = torch.logspace(-0.5, 0.5, width)[torch.randperm(width, generator=g)]
    return (torch.randn(tokens, width, generator=g) @ mix) * scales


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


def _magnitude_rows(w: torch.Tensor, sparsity: float, scope: str = "layer", n_m: tuple[int, int] | None = None) -> torch.Tensor:
    # magnitude pruning with the same pattern and scope: the baseline without compensation
    if n_m is not None:
        return w * nm_mask(w.abs(), *n_m)
    return w * (row_mask(w.abs(), sparsity) if scope == "row" else unstructured_mask(w.abs(), sparsity))


# -- the solver --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "pruned_per_row"),
    [
        ({"sparsity": 0.5}, None),
        ({"sparsity": 0.5, "scope": "row"}, 16),
        ({"sparsity": 0.3, "block_size": 12}, None),  # blocks of 12, 12 and 8 columns
        ({"sparsity": 0.7, "block_size": 32, "scope": "row"}, 22),  # 0.7 * 32 = 22.4
        ({"sparsity": 0.0, "n_m": (2, 4)}, 16),
        ({"sparsity": 0.0, "n_m": (1, 4), "block_size": 6}, 24),  # block rounded up to 8
        ({"sparsity": 0.0, "n_m": (4, 8)}, 16),
    ],
)
def test_solver_prunes_exact_counts_and_beats_magnitude(kwargs: dict, pruned_per_row: int | None) -> None:
    x, w = _correlated(512, 32, seed=0), torch.randn(12, 32, generator=torch.Generator().manual_seed(1))
    h = _hessian(x)
    out = obs_prune(w, h, **kwargs)
    zeros = out.weight == 0
    assert torch.equal(zeros, ~out.keep)
    if pruned_per_row is None:
        assert int(zeros.sum()) == round(kwargs["sparsity"] * w.numel())
    else:
        assert bool((zeros.sum(dim=1) == pruned_per_row).all())
    if "n_m" in kwargs:
        n, m = kwargs["n_m"]
        assert bool(((~zeros).view(12, -1, m).sum(-1) <= n).all())
    measured = ((x @ (w - out.weight).T).norm() / (x @ w.T).norm()).item()
    assert out.error == pytest.approx(measured, rel=1e-3)
    baseline = relative_output_error(w, _magnitude_rows(w, kwargs["sparsity"], kwargs.get("scope", "layer"), kwargs.get("n_m")), h)
    assert out.error < 0.8 * baseline


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_solver_equals_textbook_obs_one_weight_at_a_time(n_m: tuple[int, int] | None) -> None:
    # Brute force in float64: for each column left to right, remove the pruned weights of each row
    # with the OBS update over the columns not yet visited, inverting their Hessian afresh.
    cols = 24
    x, w = _correlated(512, cols, seed=4).double(), torch.randn(5, cols, generator=torch.Generator().manual_seed(5)).double()
    h = _hessian(x)
    d2 = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(cols)])  # [H_F^-1]_00 per column
    ref, pruned = w.clone(), torch.zeros_like(w, dtype=torch.bool)
    if n_m is None:  # one block: the mask is chosen up front, 60 lowest saliencies of the layer
        pruned = ~unstructured_mask(ref.square() / d2, 0.5)
    for j in range(cols):
        if n_m is not None and j % 4 == 0:
            pruned[:, j : j + 4] = ~nm_mask(ref[:, j : j + 4].square() / d2[j : j + 4], *n_m)
        inv = torch.linalg.inv(h[j:, j:])
        for r in range(w.shape[0]):
            if pruned[r, j]:
                ref[r, j:] -= ref[r, j] / inv[0, 0] * inv[0]
    out = obs_prune(w.float(), h.float(), sparsity=0.5, n_m=n_m, damping=0.0, block_size=cols if n_m is None else 8)
    assert torch.equal(out.keep, ~pruned)
    torch.testing.assert_close(out.weight.double(), ref.masked_fill(pruned, 0.0), rtol=1e-3, atol=1e-3)  # float32 solve


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9), cols=st.integers(1, 40), sparsity=st.floats(0.0, 0.99), block=st.integers(1, 50),
    scope=st.sampled_from(["layer", "row"]), seed=st.integers(0, 2**16),
)
def test_achieved_sparsity_is_the_target_within_one_weight(rows: int, cols: int, sparsity: float, block: int, scope: str, seed: int) -> None:
    x = _correlated(4 * cols + 8, cols, seed)  # enough tokens: no dead inputs
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    out = obs_prune(w, _hessian(x), sparsity=sparsity, scope=scope, block_size=block)
    zeros = (out.weight == 0).sum(dim=1).double()
    if scope == "row":
        assert bool(((zeros - sparsity * cols).abs() <= 1).all())
    else:
        assert abs(float(zeros.sum()) - sparsity * rows * cols) <= 1
    assert out.dead == 0 and bool(torch.isfinite(out.weight).all())


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), groups=st.integers(1, 6), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 4)]),
       extra=st.integers(0, 3), block=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_nm_groups_hold_at_most_n_nonzeros(rows: int, groups: int, nm: tuple[int, int], extra: int, block: int, seed: int) -> None:
    n, m = nm
    cols = groups * m + extra % m
    x = _correlated(4 * cols + 8, cols, seed)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    out = obs_prune(w, _hessian(x), sparsity=0.0, n_m=nm, block_size=block, remainder="dense")
    full = groups * m
    nonzero = (out.weight[:, :full] != 0).view(rows, groups, m).sum(-1)
    assert bool((nonzero == n).all())  # exactly N kept (random weights are never zero)
    assert bool((out.weight[:, full:] != 0).all())  # the partial group stays dense


def test_dead_inputs_are_pruned_first_and_stay_finite() -> None:
    x = _correlated(256, 16, seed=2)
    x[:, [3, 9]] = 0.0  # two inputs that never fire
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    out = obs_prune(w, _hessian(x), sparsity=0.25)
    assert out.dead == 2 and bool((out.weight[:, [3, 9]] == 0).all())
    assert int((out.weight == 0).sum()) == 16 and bool(torch.isfinite(out.weight).all())
    assert out.error == pytest.approx(((x @ (w - out.weight).T).norm() / (x @ w.T).norm()).item(), rel=1e-3)


def test_already_pruned_weights_stay_pruned() -> None:
    x, w = _correlated(256, 16, seed=3), torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    pruned = torch.zeros(4, 16, dtype=torch.bool)
    pruned[:, :3] = True
    out = obs_prune(w * ~pruned, _hessian(x), sparsity=0.5, scope="row", pruned=pruned)
    assert bool((out.weight[pruned] == 0).all()) and bool(((out.weight == 0).sum(dim=1) == 8).all())


@pytest.mark.parametrize(
    ("hessian", "damping", "used", "retries"),
    [
        (torch.eye(3) * 4, 0.01, 0.01, 0),
        (torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.0, 10.0, 3),  # indefinite: 0 -> 0.1 -> 1 -> 10
        (torch.tensor([[1.0, 1.0], [1.0, 1.0]]), 0.0, 0.1, 1),  # singular: 0 fails, 10% works
    ],
)
def test_cholesky_failures_retry_with_more_damping(hessian: torch.Tensor, damping: float, used: float, retries: int) -> None:
    u, got_used, got_retries = inverse_hessian_factor(hessian, damping)
    assert (got_used, got_retries) == (pytest.approx(used), retries)
    damped = hessian + used * hessian.diagonal().mean() * torch.eye(len(hessian))
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-5)


def test_a_hessian_that_never_factorises_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="not positive definite"):
        inverse_hessian_factor(torch.full((2, 2), float("nan")), 0.01)


# -- the pass ------------------------------------------------------------------------------------
def _inputs_of(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def _batches(n: int = 6, length: int = 32) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(i))} for i in range(n)]


def _llama_with_outlier_channels() -> nn.Module:
    # Random-init norms make isotropic inputs, where nothing beats magnitude; real LLMs have
    # channels of very different scales. Give the norm gains a 100x spread.
    model = models.tiny("llama", layers=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            norm.weight.copy_(torch.logspace(-1, 1, 64)[torch.randperm(64, generator=g)])
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_is_below_magnitude_and_wanda_on_the_calibration_inputs(pattern: str) -> None:
    from llmslim.prune import Wanda

    batches = _batches()
    dense = _llama_with_outlier_channels()
    names = [n for n, m in dense.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)]
    inputs = _inputs_of(dense, names, batches)  # one block, not true-sequential: every layer sees dense inputs
    sgpt, wanda, mag = (_llama_with_outlier_channels() for _ in range(3))
    report = ls.compress_(sgpt, SparseGPT(pattern=pattern, ignore=["lm_head"]), calibration=batches, progress=False)
    ls.compress_(wanda, Wanda(pattern=pattern, ignore=["lm_head"]), calibration=batches, progress=False)
    ls.compress_(mag, Magnitude(pattern=pattern, ignore=["lm_head"]), progress=False)
    rows = {r.module: r for r in report.children[0].rows}
    for name in names:
        x, w = inputs[name], dense.get_submodule(name).weight.detach()

        def error(model: nn.Module) -> float:
            return float((x @ (w - model.get_submodule(name).weight.detach()).T).norm() / (x @ w.T).norm())

        for model in (sgpt, mag):
            assert float((model.get_submodule(name).weight == 0).float().mean()) == 0.5
        assert rows[name].error == pytest.approx(error(sgpt), rel=1e-3)  # the report says what it did
        assert error(sgpt) < 0.8 * error(mag), name
        assert error(sgpt) < error(wanda), name


def test_report_rows_and_finalize_keep_exact_zeros() -> None:
    model = models.tiny("gpt2")  # Conv1D
    pm = ls.PassManager([SparseGPT(sparsity=0.6, ignore=["lm_head"], storage="compressed", value_dtype="float16")])
    ctx = ls.Context(_batches(), progress=False)
    report = pm.apply(model, ctx)
    masks = {n: get_mask(model.get_submodule(n)).mask.clone() for n in (r.module for r in report.all_rows)}
    for row in report.all_rows:
        assert row.info["pattern"] == "unstructured" and row.info["target_sparsity"] == 0.6
        assert abs(row.info["achieved_sparsity"] - 0.6) < 1e-3 and row.info["cholesky_retries"] == 0
        assert row.info["damping"] == 0.01 and row.info["dead_inputs"] == 0 and 0 < row.error < 1 and row.seconds > 0
    dense_out = model(**_batches(1)[0]).logits
    pm.finalize(model, ctx)
    for name, keep in masks.items():
        layer = model.get_submodule(name)
        assert type(layer).__name__ == "SparseLinear"  # rebuilds [out, in]; the Conv1D mask is [in, out]
        assert bool((layer.weight[~keep.T] == 0).all()) and bool((layer.weight[keep.T] != 0).all())
    torch.testing.assert_close(model(**_batches(1)[0]).logits, dense_out, rtol=2e-2, atol=2e-2)  # float16 values


def test_damping_retries_are_reported() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(2, 1) @ torch.randn(1, 8)  # rank one: singular Hessian
    report = ls.compress_(model, SparseGPT(damping=0.0), calibration=[x], progress=False)
    info = report.children[0].rows[0].info
    assert info["cholesky_retries"] >= 1 and info["damping"] >= 0.1
    assert bool(torch.isfinite(model[0].weight).all()) and (model[0].weight == 0).sum() == 16


def test_shares_one_sweep_with_wanda() -> None:
    from llmslim.prune import Wanda

    model = models.tiny("llama")
    wanda = Wanda(targets=["*.mlp.*"], propagate="compressed")  # sweeps share only equal propagate settings
    report = ls.compress_(model, wanda, SparseGPT(targets=["*.self_attn.*"]), calibration=_batches(), progress=False)
    assert [c.name for c in report.children[:2]] == ["wanda", "sparsegpt"]
    assert any("shared calibration sweep" in n for n in report.children[0].notes)
    assert all(abs(r.info["achieved_sparsity"] - 0.5) < 1e-9 for c in report.children[:2] for r in c.rows)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"block_size": 1.5}, "block_size must be"),
        ({"damping": -0.01}, r"damping must be in \[0, 100\]"),
        ({"damping": float("nan")}, "damping must be"),
        ({"scope": "global"}, "scope must be 'layer' or 'row'"),
        ({"pattern": "2:4", "sparsity": 0.6}, "sparsity must be None or 0.5"),
        ({"schedule": {"kind": "constant"}}, "schedule must be None"),
        ({"remainder": "pad"}, "remainder must be one of"),
    ],
)
def test_bad_configs_are_rejected(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="sparsegpt: " + message):
        SparseGPT(**fields)


def test_a_row_length_m_does_not_divide_fails_before_the_sweep() -> None:
    model = nn.Sequential(nn.Linear(10, 4))
    with pytest.raises(ls.errors.PassError) as info:
        ls.compress_(model, SparseGPT(pattern="2:4"), calibration=[torch.randn(3, 10)], progress=False)
    assert isinstance(info.value.__cause__, ConfigError) and "remainder='dense'" in str(info.value.__cause__)
    assert get_mask(model[0]) is None
