"""Wanda: masks equal a hand-computed |w| * ||x|| selection; OWL allocation (Wanda and SparseGPT); configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.errors import ConfigError
from llmslim.prune import Magnitude, SparseGPT, Wanda, get_mask, owl_sparsities
from llmslim.prune._owl import outlier_ratios
from llmslim.prune.wanda import wanda_scores


def _layer(inp: int = 8, out: int = 4, seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(out, inp, generator=g))
    # channels of very different scales, so |w| alone would choose differently
    scale = torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=g)]
    batches = [torch.randn(5, inp, generator=g) * scale for _ in range(3)]
    return model, batches


def _by_hand(w: torch.Tensor, batches: list[torch.Tensor], pruned_per_row: int) -> torch.Tensor:
    x = torch.cat(batches).double()
    norms = x.pow(2).sum(0).sqrt()  # ||X_j||_2 over every calibration token
    score = w.double().abs() * norms
    keep = torch.ones_like(w, dtype=torch.bool)
    for r in range(w.shape[0]):
        for j in sorted(range(w.shape[1]), key=lambda j: float(score[r, j]))[:pruned_per_row]:
            keep[r, j] = False
    return keep


@pytest.mark.parametrize(
    ("sparsity", "pruned_per_row"),
    [(0.5, 4), (0.25, 2), (0.75, 6), (0.0, 0), (0.3, 2)],  # 0.3 * 8 = 2.4 rounds to 2
)
def test_mask_equals_the_hand_computed_per_row_selection(sparsity: float, pruned_per_row: int) -> None:
    model, batches = _layer()
    w = model[0].weight.detach().clone()
    expected = _by_hand(w, batches, pruned_per_row)
    ls.compress_(model, Wanda(sparsity=sparsity), calibration=batches, progress=False)
    got = model[0].weight != 0
    assert torch.equal(got, expected)
    # and it is not simply magnitude's choice (the channel scales matter)
    if pruned_per_row:
        magnitude = w.abs() >= w.abs().sort(dim=1).values[:, pruned_per_row : pruned_per_row + 1]
        assert not torch.equal(got, magnitude)


def test_layer_scope_and_two_four_use_the_same_scores() -> None:
    model, batches = _layer(inp=8, out=6, seed=3)
    w = model[0].weight.detach().clone()
    norms = torch.cat(batches).pow(2).sum(0).sqrt()
    score = w.abs() * norms
    ls.compress_(model, Wanda(sparsity=0.5, scope="layer"), calibration=batches, progress=False)
    threshold = score.flatten().sort().values[24 - 1]  # 24 of 48 pruned, across rows
    assert torch.equal(model[0].weight != 0, score > threshold)

    model, _ = _layer(inp=8, out=6, seed=3)
    ls.compress_(model, Wanda(pattern="2:4"), calibration=batches, progress=False)
    groups = score.view(6, 2, 4)
    top2 = groups.argsort(dim=-1, descending=True)[..., :2]
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True).view(6, 8)
    assert torch.equal(model[0].weight != 0, expected)


def test_gpt2_conv1d_scores_are_read_transposed() -> None:
    model = models.tiny("gpt2", layers=1)
    layer = model.transformer.h[0].attn.c_attn  # Conv1D: weight [in, out]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    batches = [{"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    w = layer.weight.detach().clone()  # [in, out]
    norms = torch.cat(seen).pow(2).sum(0).sqrt()
    score = w.abs() * norms[:, None]  # input channels along dim 0
    k = round(0.5 * w.shape[0])
    expected = torch.ones_like(w, dtype=torch.bool)
    expected.scatter_(0, score.argsort(dim=0, stable=True)[:k], False)
    ls.compress_(model, Wanda(targets=["transformer.h.0.attn.c_attn"]), calibration=batches, progress=False)
    assert torch.equal(layer.weight != 0, expected)


def test_scores_helper_matches_rows_layout() -> None:
    conv = nn.Conv2d(2, 3, 2)
    norms = torch.arange(1.0, 9.0)  # in * kh * kw = 8
    s = wanda_scores(conv, norms)
    assert s.shape == conv.weight.shape
    torch.testing.assert_close(s.reshape(3, 8), conv.weight.detach().abs().reshape(3, 8) * norms)


@settings(max_examples=30, deadline=None)
@given(
    inp=st.integers(1, 24), out=st.integers(1, 9), sparsity=st.floats(0.0, 0.99),
    scope=st.sampled_from(["row", "layer"]), seed=st.integers(0, 2**16),
)
def test_achieved_sparsity_is_the_target_within_one_weight(inp: int, out: int, sparsity: float, scope: str, seed: int) -> None:
    model, batches = _layer(inp, out, seed)
    report = ls.compress_(model, Wanda(sparsity=sparsity, scope=scope), calibration=batches, progress=False)
    zeros = (model[0].weight == 0).sum(dim=1)
    if scope == "row":  # every row within one weight of its share
        assert bool(((zeros - sparsity * inp).abs() <= 1).all())
    else:
        assert abs(int(zeros.sum()) - sparsity * inp * out) <= 1
    assert report.children[0].rows[0].info["target_sparsity"] == sparsity


# -- OWL --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ratios", "target", "lam", "cap", "expected"),
    [
        ([0.01, 0.03, 0.02], 0.5, 0.08, 1.0, [0.58, 0.42, 0.5]),  # more outliers, lower sparsity
        ([0.02, 0.02, 0.02], 0.5, 0.08, 1.0, [0.5, 0.5, 0.5]),  # nothing to tell the blocks apart
        ([0.01, 0.03], 0.5, 0.0, 1.0, [0.5, 0.5]),  # lambda 0: uniform
        ([0.01, 0.03], 0.05, 0.08, 1.0, [0.1, 0.0]),  # shrunk so no block goes below 0
        ([0.01, 0.03], 0.5, 0.08, 0.52, [0.52, 0.48]),  # shrunk under the cap
        ([0.5], 0.7, 0.1, 1.0, [0.7]),  # one block
    ],
)
def test_owl_sparsities(ratios: list[float], target: float, lam: float, cap: float, expected: list[float]) -> None:
    got = owl_sparsities(ratios, target, lam, cap)
    assert got == pytest.approx(expected, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), target=st.floats(0.0, 0.99),
    lam=st.floats(0.0, 0.5), cap=st.floats(0.5, 1.0),
)
def test_owl_keeps_the_mean_and_the_order(ratios: list[float], target: float, lam: float, cap: float) -> None:
    if target >= cap:
        target = cap / 2
    got = owl_sparsities(ratios, target, lam, cap)
    assert math.fsum(got) / len(got) == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= s < min(cap, 1.0) or s == pytest.approx(0.0) for s in got)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(got[a] >= got[b] - 1e-9 for a, b in zip(order, order[1:]))  # more outliers never prunes more


def _llama_and_batches(layers: int = 4) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    model = models.tiny("llama", layers=layers)
    batches = [{"input_ids": torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    return model, batches


@pytest.mark.parametrize("cls", [Wanda, SparseGPT])
def test_owl_prunes_blocks_with_more_outliers_less_and_keeps_the_mean(cls: type) -> None:
    model, batches = _llama_and_batches()
    p = cls(sparsity=0.6, allocation="owl", owl_lambda=0.1, ignore=["lm_head"])
    ratios, block_of = outlier_ratios(model, ls.Context(batches, progress=False), p, lambda n, m, s: wanda_scores(m, s.channel_norms()), 5.0)
    report = ls.compress_(model, p, calibration=batches, progress=False)
    rows = report.children[0].rows
    per_block = {block_of[r.module]: r.info["target_sparsity"] for r in rows}
    assert len(per_block) == 4 and math.fsum(per_block.values()) / 4 == pytest.approx(0.6)
    blocks = sorted(per_block, key=lambda b: ratios[b])
    assert per_block[blocks[0]] > per_block[blocks[-1]]
    assert max(per_block.values()) - min(per_block.values()) == pytest.approx(0.2)
    for r in rows:  # each layer is at its block's sparsity
        assert abs(r.info["achieved_sparsity"] - per_block[block_of[r.module]]) < 0.01
    assert any(n.startswith("OWL (lambda=0.1") for n in report.children[0].notes)
    assert p.declares() == {}  # per-block sparsities: no uniform promise


def test_owl_sweeps_alone_and_leaves_no_state() -> None:
    a, b = Wanda(allocation="owl"), Wanda(allocation="owl")
    assert a.sweep_key() != b.sweep_key() and Wanda().sweep_key() == Wanda(sparsity=0.3).sweep_key()
    model, batches = _llama_and_batches(2)
    ls.compress_(model, a, calibration=batches, progress=False)
    assert not hasattr(a, "_allocated") and a == Wanda(allocation="owl")


def test_an_earlier_mask_stays_and_counts() -> None:
    model, batches = _layer(inp=16, out=4, seed=1)
    earlier, _ = _layer(inp=16, out=4, seed=1)
    ls.compress_(earlier, Magnitude(sparsity=0.25, scope="row"), progress=False)
    ls.compress_(model, Magnitude(sparsity=0.25, scope="row"), Wanda(sparsity=0.5), calibration=batches, progress=False)
    zeros = model[0].weight == 0
    assert bool(zeros[earlier[0].weight == 0].all())  # magnitude's zeros stay zero ...
    assert (zeros.sum(dim=1) == 8).all()  # ... and count towards Wanda's 8 per row


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"scope": "global"}, "scope must be 'layer' or 'row'"),
        ({"schedule": {"kind": "cubic", "end_step": 10}}, "schedule must be None"),
        ({"pattern": "2:4", "allocation": "owl"}, "allocation must be 'uniform'"),
        ({"owl_lambda": 0.6}, "owl_lambda must be in [0, 0.5]"),
        ({"owl_m": 0.0}, "owl_m must be"),
        ({"allocation": "outliers"}, "allocation must be one of 'uniform', 'owl'"),
        ({"propagate": "sideways"}, "propagate must be one of"),
        ({"sequential": "yes"}, "sequential must be"),
        ({"pattern": "4:2"}, "pattern must be 'unstructured' or 'N:M'"),
    ],
)
@pytest.mark.parametrize("cls", [Wanda, SparseGPT])
def test_bad_configs_are_rejected(cls: type, fields: dict, message: str) -> None:
    label = cls().label
    with pytest.raises(ConfigError, match=f"{label}: " + message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        cls(**fields)


def test_owl_finalize_bakes_each_block_at_its_own_sparsity_without_a_schedule_note() -> None:
    model, batches = _llama_and_batches(2)
    pm = ls.PassManager([Wanda(sparsity=0.5, allocation="owl", ignore=["lm_head"], storage="compressed")])
    ctx = ls.Context(batches, progress=False)
    applied = pm.apply(model, ctx)
    final = pm.finalize(model, ctx)
    targets = [r.info["target_sparsity"] for r in final.all_rows]
    assert targets == [r.info["target_sparsity"] for r in applied.all_rows] and min(targets) < 0.5 < max(targets)
    assert not any("schedule" in n for n in final.children[0].notes)  # below-target layers are OWL's, not a schedule's
