"""Hypothesis properties of the core: flattening, spec round-trip, rollback."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import llmslim as ls
from llmslim.errors import PassError
from models import TinyNet, batch, same, snapshot
from toys import ToyHalf, ToyPrune

target_names = st.sampled_from(["Linear", "Conv2d", "fc1", "fc*", "re:fc\\d", "head"])
targets = st.lists(target_names, min_size=1, max_size=3, unique=True).map(tuple)
names = st.none() | st.text(alphabet="abcxyz-_ ", min_size=1, max_size=8)

toy_prunes = st.builds(
    ToyPrune,
    sparsity=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
    targets=targets,
    ignore=st.lists(st.sampled_from(["head", "fc2"]), max_size=1).map(tuple),
    name=names,
).filter(lambda p: not set(p.ignore) & set(p.targets))  # ignoring all one targets is a TargetError
toy_halves = st.builds(ToyHalf, targets=st.sampled_from([("Linear",), ("fc1", "head"), ("re:fc.",)]), name=names)


def _strip(report: ls.Report) -> list:
    """Report content without timings."""
    return [(n.name, n.bytes_before, n.bytes_after, [(r.module, r.kind, r.bytes_after, r.sparsity) for r in n.rows]) for n in report.children]


def _nest(draw, passes: list) -> list:
    """Group a flat list into randomly nested managers, keeping the order."""
    out: list = []
    i = 0
    while i < len(passes):
        k = draw(st.integers(1, len(passes) - i))
        chunk = passes[i : i + k]
        out.append(ls.PassManager(_nest(draw, chunk)) if k > 1 and draw(st.booleans()) else chunk[0] if k == 1 else ls.PassManager(chunk))
        i += k
    return out


@st.composite
def chains(draw):
    prunes = draw(st.lists(toy_prunes, min_size=0, max_size=3))
    half = draw(st.lists(toy_halves, max_size=1))  # at most one, last: the order rule forbids pruning after it
    flat = prunes + half
    if not flat:
        flat = [ToyPrune()]
    return flat, _nest(draw, flat)


@given(chains(), st.integers(0, 3))
def test_nested_manager_behaves_as_flat(chain, seed) -> None:
    flat, nested = chain
    m1, m2 = TinyNet(seed), TinyNet(seed)
    r1 = ls.PassManager(nested).apply(m1, ls.Context(progress=False))
    r2 = ls.PassManager(flat).apply(m2, ls.Context(progress=False))
    assert ls.PassManager(nested).passes == tuple(flat)
    assert _strip(r1) == _strip(r2)
    assert same(snapshot(m1), snapshot(m2))
    assert torch.equal(m1(batch()), m2(batch()))


@given(st.one_of(toy_prunes, toy_halves))
def test_spec_round_trip(p) -> None:
    spec = ls.to_spec(p)
    assert ls.build_pass(spec) == p
    assert ls.build_pass(copy.deepcopy(spec)).to_spec() == spec


@given(st.sampled_from([ToyPrune, ToyHalf]), st.integers(0, 2), st.integers(0, 5), st.booleans())
def test_rollback_at_any_module(cls, fail_at, seed, after_completed) -> None:
    model = TinyNet(seed)
    if after_completed:
        ls.compress_(model, ToyPrune(sparsity=0.5, targets=("conv",)), progress=False)
    before = snapshot(model)
    with pytest.raises(PassError) as info:
        ls.compress_(model, cls(fail_at=fail_at), progress=False)
    assert info.value.module == ["fc1", "fc2", "head"][fail_at]
    assert same(snapshot(model), before)
