"""The magnitude pass: configuration, targets, the score hook, N:M on every layer kind, reports."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError, OrderError, PassError
from llmslim.models import ARCHITECTURES, tiny
from llmslim.prune import Magnitude, PruneBase, get_mask, masked_modules, prune_count, rows_view
from llmslim.testing import check_pass, make_model
from llmslim.testing import strategies as lst


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": float("nan")}, "sparsity must be"),
        ({"sparsity": "0.5"}, "sparsity must be"),
        ({"pattern": "4:4"}, "0 < N < M"),
        ({"pattern": "5:4"}, "0 < N < M"),
        ({"pattern": "0:4"}, "0 < N < M"),
        ({"pattern": "2by4"}, "pattern must be 'unstructured' or 'N:M'"),
        ({"pattern": "2:4", "sparsity": 0.7}, r"sparsity must be None or 0.5 \(1 - N/M\)"),
        ({"pattern": "2:4", "scope": "global"}, "scope must be 'layer' or 'row' with an N:M pattern"),
        ({"scope": "model"}, "scope must be one of"),
        ({"max_layer_sparsity": 0.4}, "max_layer_sparsity must be >= sparsity"),  # any scope: a contradiction
        ({"max_layer_sparsity": 1.5}, r"max_layer_sparsity must be in \(0, 1\]"),
        ({"scope": "global", "max_layer_sparsity": 0.0}, r"max_layer_sparsity must be in \(0, 1\]"),
        ({"scope": "global", "sparsity": 0.6, "max_layer_sparsity": 0.5}, "max_layer_sparsity must be >= sparsity"),
        ({"remainder": "pad"}, "remainder must be one of"),
        ({"storage": "csr"}, "storage must be one of"),
        ({"value_dtype": "int8"}, "value_dtype must be one of"),
    ],
)
def test_bad_configurations_are_config_errors_at_construction(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Magnitude(**kwargs)


# valid schedules and patterns constrain each other, so most drawn base configurations are filtered
@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(lst.invalid_configs(Magnitude))
def test_generated_invalid_configurations_are_rejected(fields) -> None:
    with pytest.raises(ConfigError):
        Magnitude(**fields)


def test_sparsity_defaults_to_half_or_the_pattern_share() -> None:
    assert Magnitude().final_sparsity == 0.5
    assert Magnitude(pattern="1:4").final_sparsity == 0.75
    assert Magnitude(pattern="2:4", sparsity=0.5).declares() == {"pattern": "2:4", "sparsity": 0.5}
    assert Magnitude(pattern="2:4", remainder="dense").declares() == {"pattern": "2:4"}
    assert Magnitude(scope="global").declares() == {}


def test_magnitude_is_registered_and_refuses_to_follow_packing() -> None:
    assert ls.get_pass("magnitude") is Magnitude
    assert Magnitude.produces == {"masks"}
    with pytest.raises(OrderError, match="prune before quantizing"):
        ls.PassManager(["toy-half", Magnitude()]).check()


# -- achieved = target ------------------------------------------------------------------------
@given(lst.models(["mlp", "convnet", "attention", "mha"]), st.floats(0.0, 0.99), st.sampled_from(["layer", "row"]))
def test_each_layer_prunes_its_target_within_one_weight(pair, sparsity, scope) -> None:
    model, _ = pair
    report = ls.compress_(model, Magnitude(sparsity=sparsity, scope=scope, targets=("Linear", "Conv2d")), progress=False, finalize=False)
    for name, module in masked_modules(model):
        mask = rows_view(module, get_mask(module).mask)
        if scope == "layer":
            assert int((~mask).sum()) == prune_count(sparsity, mask.numel())
        else:  # per output row: within one weight of every row
            assert bool(((~mask).sum(1) == prune_count(sparsity, mask.shape[1])).all())
        assert abs(float((~mask).float().mean()) - sparsity) <= (1 if scope == "layer" else mask.shape[0]) / mask.numel()
    for row in report.all_rows:
        assert row.info["target_sparsity"] == sparsity
        assert row.sparsity >= row.info["achieved_sparsity"] - 1e-12  # zeros already there count too


@given(lst.models(["mlp", "attention"]), st.floats(0.0, 0.99), st.one_of(st.none(), st.floats(0.05, 1.0)))
def test_global_scope_meets_the_target_over_all_layers_and_each_cap(pair, sparsity, cap) -> None:
    model, _ = pair
    cap = None if cap is None else max(cap, sparsity)
    report = ls.compress_(model, Magnitude(sparsity=sparsity, scope="global", max_layer_sparsity=cap), progress=False, finalize=False)
    masks = [get_mask(m).mask for _, m in masked_modules(model)]
    pruned, total = sum(int((~k).sum()) for k in masks), sum(k.numel() for k in masks)
    if cap is None:
        assert pruned == prune_count(sparsity, total)
    else:
        assert all(int((~k).sum()) <= math.floor(cap * k.numel()) for k in masks)
        assert pruned == min(prune_count(sparsity, total), sum(math.floor(cap * k.numel()) for k in masks))
    assert "global:" in report.children[0].notes[0]


def test_global_scope_uses_one_threshold() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.01).add_(torch.rand(8, 8) * 1e-3)
        model[1].weight.fill_(1.0).add_(torch.rand(8, 8))
    ls.compress_(model, Magnitude(sparsity=0.5, scope="global"), progress=False)
    assert float((model[0].weight == 0).float().mean()) == 1.0 and float((model[1].weight == 0).float().mean()) == 0.0


# -- N:M --------------------------------------------------------------------------------------
def _groups_ok(rows: torch.Tensor, n: int, m: int) -> bool:
    full = rows.shape[1] // m * m
    return bool(((rows[:, :full].reshape(rows.shape[0], -1, m) != 0).sum(-1) <= n).all())


@given(lst.models(["mlp", "convnet", "attention"]), st.sampled_from(["2:4", "1:4", "4:8", "1:2", "3:5"]), st.sampled_from(["dense", "compressed"]))
def test_every_n_m_group_holds_at_most_n_nonzeros(pair, pattern, storage) -> None:
    model, batch = pair
    n, m = (int(x) for x in pattern.split(":"))
    ls.compress_(model, Magnitude(pattern=pattern, remainder="dense", storage=storage, targets=("Linear", "Conv2d")), progress=False)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or type(module).__name__ == "SparseLinear":
            assert _groups_ok(rows_view(module, module.weight.detach()), n, m), name
    model(batch)


def test_n_m_runs_along_the_input_dimension_of_gpt2_conv1d() -> None:
    model, batch = make_model("gpt2", seed=0, head_dim=8, hidden=16)
    ls.compress_(model, Magnitude(pattern="2:4"), progress=False)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight (in, out)
    w = conv.weight.detach()
    assert _groups_ok(w.t(), 2, 4)
    assert not _groups_ok(w, 2, 4), "groups along the output dimension would be a different pattern"
    check_pass(Magnitude(pattern="2:4"), *make_model("gpt2", seed=0, head_dim=8, hidden=16))


def test_a_row_length_m_does_not_divide_is_an_error_before_any_change() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"module '4' has rows of 6 weights.*remainder='dense'"):
        Magnitude(pattern="2:4").apply(model, ls.Context(progress=False))
    with pytest.raises(PassError) as info:
        ls.compress_(model, Magnitude(pattern="2:4"), progress=False)
    assert isinstance(info.value.__cause__, ConfigError)
    assert not masked_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    report = ls.compress_(model, Magnitude(pattern="2:4", remainder="dense"), progress=False)
    assert [row.sparsity for row in report.all_rows] == [0.5, 0.5, 1 / 3, 0.5, 0.5, 1 / 3][: len(report.all_rows)]


# -- the score hook ---------------------------------------------------------------------------
class Largest(Magnitude):
    """Prune the largest weights first: a pruning method in one method."""

    def score(self, name, module, ctx):
        return -module.weight.detach().abs()


class ByPosition(PruneBase):
    """A score that ignores the weights: later input columns are more important."""

    def score(self, name, module, ctx):
        w = module.weight
        return torch.arange(w.shape[1], dtype=torch.float32).expand_as(w).clone()


def test_an_overridden_score_drives_the_mask() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 8))
    w = layer[0].weight.detach().clone()
    ls.compress_(layer, Largest(sparsity=0.25), progress=False)
    pruned = layer[0].weight == 0
    assert w.abs()[pruned].min() >= w.abs()[~pruned].max()
    model = nn.Sequential(nn.Linear(8, 4))
    ls.compress_(model, ByPosition(pattern="1:2"), progress=False)
    assert bool((model[0].weight[:, 0::2] == 0).all()) and bool((model[0].weight[:, 1::2] != 0).all())


@given(lst.models(["mlp", "attention"]), st.sampled_from(["unstructured", "2:4"]))
def test_a_subclass_with_one_method_keeps_the_contract(pair, pattern) -> None:
    model, batch = pair
    check_pass(Largest(pattern=pattern, remainder="dense"), model, batch)


def test_a_score_of_the_wrong_shape_is_a_clear_error() -> None:
    class Bad(Magnitude):
        def score(self, name, module, ctx):
            return torch.ones(3)

    with pytest.raises(PassError, match=r"score\(\) must return a tensor shaped like '0''s weight \(4, 4\)"):
        ls.compress_(nn.Sequential(nn.Linear(4, 4)), Bad(), progress=False)


# -- real architectures -----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_magnitude_on_every_tiny_hugging_face_architecture(arch, pattern) -> None:
    model = tiny(arch, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    report = ls.compress_(model, Magnitude(pattern=pattern), progress=False)
    rows = report.children[0].rows
    kinds = {row.kind for row in rows}
    assert kinds <= {"ParametrizedLinear", "ParametrizedConv1D"}
    if arch == "gpt2":
        assert "ParametrizedConv1D" in kinds
    for row in rows:
        assert row.info["achieved_sparsity"] == pytest.approx(0.5, abs=1 / 64)
        module = model.get_submodule(row.module)
        assert float((module.weight == 0).float().mean()) >= 0.5 - 1 / module.weight.numel()
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.isfinite(out[0]).all()


def test_report_rows_say_target_achieved_pattern_and_bytes_per_storage_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    report = ls.compress_(model, Magnitude(pattern="2:4", storage="compressed", value_dtype="float16"), progress=False)
    applied, final = report.children[0].rows[0], report.children[1].rows[0]
    assert applied.info["pattern"] == "2:4" and applied.info["target_sparsity"] == 0.5 == applied.info["achieved_sparsity"]
    assert applied.info["bytes_dense"] == 64 * 32 * 4 and applied.info["bytes_fp16"] == 64 * 32 * 2
    assert applied.info["bytes_nm"] == applied.info["bytes_bitmask"] == 64 * 32 // 2 * 2 + 64 * 32 // 8
    assert final.info["storage"] == "nm" and final.bytes_after == applied.info["bytes_nm"]
    assert final.bytes_after / applied.info["bytes_fp16"] <= 0.57
    assert final.bits == pytest.approx(9.0)


class Injected(PruneBase):
    """Scores from elsewhere (as a calibration sweep hands them over), one module at a time."""

    def apply(self, model, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        rows = []
        for name, module in self.modules(model, ctx):
            rows.append(self.mask_module_(name, module, ctx, scores=torch.rand(module.weight.shape, generator=g)))
        return self.report(rows)


@given(lst.models(["mlp", "attention", "gpt2"]), st.sampled_from(["unstructured", "2:4"]), st.sampled_from(["layer", "row"]))
def test_masking_one_module_at_a_time_reuses_the_mechanics_and_keeps_the_contract(pair, pattern, scope) -> None:
    model, batch = pair
    p = Injected(pattern=pattern, scope=scope, remainder="dense", sparsity=0.5)
    check_pass(p, model, batch)
    ls.compress_(model, p, progress=False, finalize=False)
    for _, module in masked_modules(model):
        mask = rows_view(module, get_mask(module).mask)
        if pattern == "unstructured" and scope == "layer":
            assert int((~mask).sum()) == prune_count(0.5, mask.numel())


def test_mask_module_refuses_global_scope() -> None:
    layer = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="scope='global' needs apply"):
        Injected(scope="global").mask_module_("", layer, ls.Context(progress=False))
