"""How to cut: keep-masks from scores for each pattern and scope (llmslim/prune/_patterns.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llmslim.errors import ConfigError
from llmslim.prune import global_counts, lowest_mask, nm_mask, parse_pattern, prune_count, row_mask, unstructured_mask


@st.composite
def score_tensors(draw, max_rows: int = 9, max_cols: int = 40, ties: bool = True):
    """2-D float scores; with ``ties`` often drawn from a handful of values so ties are common."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if ties and draw(st.booleans()):
        return torch.randint(0, 3, (rows, cols), generator=g).float()
    return torch.randn(rows, cols, generator=g)


FRACTIONS = st.floats(0.0, 1.0, exclude_max=True)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("unstructured", None), ("2:4", (2, 4)), ("1:2", (1, 2)), ("4:8", (4, 8)), ("3:7", (3, 7)), ("15:16", (15, 16))],
)
def test_valid_patterns_parse(pattern, expected) -> None:
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["4:4", "5:4", "0:4", "2-4", "2:", ":4", " 2:4", "dense", "", "2:4:8", "-1:4"])
def test_invalid_patterns_are_config_errors(pattern) -> None:
    with pytest.raises(ConfigError, match="pattern must be 'unstructured' or 'N:M' with 0 < N < M"):
        parse_pattern(pattern)


@pytest.mark.parametrize(("sparsity", "numel", "count"), [(0.0, 10, 0), (0.5, 7, 4), (0.5, 8, 4), (0.25, 10, 3), (0.99, 3, 3), (0.1, 4, 0)])
def test_prune_count_rounds_to_the_nearest_weight(sparsity, numel, count) -> None:
    assert prune_count(sparsity, numel) == count


@given(score_tensors(), FRACTIONS)
def test_unstructured_prunes_exactly_the_count_and_only_the_lowest(scores, sparsity) -> None:
    keep = unstructured_mask(scores, sparsity)
    assert int((~keep).sum()) == prune_count(sparsity, scores.numel())
    if bool((~keep).any()) and bool(keep.any()):
        assert scores[~keep].max() <= scores[keep].min()


@given(score_tensors(), FRACTIONS)
def test_row_scope_prunes_the_count_in_every_row(scores, sparsity) -> None:
    keep = row_mask(scores, sparsity)
    assert ((~keep).sum(dim=1) == prune_count(sparsity, scores.shape[1])).all()
    for r in range(scores.shape[0]):
        if bool((~keep[r]).any()) and bool(keep[r].any()):
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@given(score_tensors(max_cols=24), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 7)]))
def test_every_nm_group_keeps_exactly_n_of_the_highest(scores, n_m) -> None:
    n, m = n_m
    keep = nm_mask(scores, n, m, remainder="dense")
    full = scores.shape[1] // m * m
    groups, kept = scores[:, :full].reshape(scores.shape[0], -1, m), keep[:, :full].reshape(scores.shape[0], -1, m)
    assert (kept.sum(dim=-1) == n).all()
    dropped_max = torch.where(kept, -torch.inf, groups).amax(dim=-1)
    kept_min = torch.where(kept, groups, torch.inf).amin(dim=-1)
    assert (dropped_max <= kept_min).all()
    assert keep[:, full:].all()  # the remainder stays dense


def test_nm_remainder_error_is_a_config_error_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="remainder='dense'"):
        nm_mask(torch.randn(3, 10), 2, 4)
    assert nm_mask(torch.randn(3, 8), 2, 4).sum() == 12


@pytest.mark.parametrize("bad", [(0, 4), (4, 4), (5, 4)])
def test_nm_mask_rejects_n_outside_1_to_m_minus_1(bad) -> None:
    with pytest.raises(ConfigError):
        nm_mask(torch.randn(2, 8), *bad)


def test_masks_are_a_function_of_the_scores_ties_to_the_earlier_weight() -> None:
    scores = torch.ones(2, 4)
    assert unstructured_mask(scores, 0.125).tolist() == [[False, True, True, True], [True, True, True, True]]
    assert row_mask(scores, 0.5).tolist() == [[False, False, True, True]] * 2
    assert nm_mask(scores, 1, 2).tolist() == [[False, True, False, True]] * 2
    assert lowest_mask(scores, 3).tolist() == [[False, False, False, True], [True, True, True, True]]


def test_nan_scores_are_refused() -> None:
    with pytest.raises(ConfigError, match="NaN"):
        unstructured_mask(torch.tensor([[1.0, float("nan")]]), 0.5)


@given(st.lists(score_tensors(max_rows=4, max_cols=12), min_size=1, max_size=4), FRACTIONS)
def test_global_scope_is_one_threshold_over_all_layers(layers, sparsity) -> None:
    counts = global_counts(layers, sparsity)
    assert sum(counts) == prune_count(sparsity, sum(s.numel() for s in layers))
    keeps = [lowest_mask(s, c) for s, c in zip(layers, counts)]
    pruned = torch.cat([s[~k] for s, k in zip(layers, keeps)])
    kept = torch.cat([s[k] for s, k in zip(layers, keeps)])
    if pruned.numel() and kept.numel():
        assert pruned.max() <= kept.min()


@given(st.lists(score_tensors(max_rows=4, max_cols=12, ties=False), min_size=2, max_size=4), FRACTIONS, st.floats(0.05, 1.0))
def test_the_global_cap_bounds_every_layer_and_the_rest_makes_up_for_it(layers, sparsity, cap) -> None:
    cap = max(cap, sparsity)
    counts = global_counts(layers, sparsity, max_layer_sparsity=cap)
    caps = [int(cap * s.numel()) for s in layers]
    assert all(c <= k for c, k in zip(counts, caps))
    want = prune_count(sparsity, sum(s.numel() for s in layers))
    assert sum(counts) == min(want, sum(caps))


def test_a_cap_keeps_a_low_scoring_layer_from_being_emptied() -> None:
    quiet, loud = torch.full((4, 4), 1e-3), torch.randn(4, 4).abs() + 1
    assert global_counts([quiet, loud], 0.5) == [16, 0]  # without a cap the quiet layer vanishes
    assert global_counts([quiet, loud], 0.5, max_layer_sparsity=0.75) == [12, 4]
