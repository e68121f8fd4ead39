"""Schedules: plain functions of the step, and gradual pruning through PassManager.step."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError
from llmslim.prune import SCHEDULES, Magnitude, Schedule, cubic, get_mask, masked_modules, prune_count

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@st.composite
def schedules(draw, kinds=tuple(SCHEDULES)):
    final = draw(st.floats(0.0, 0.99))
    begin = draw(st.integers(0, 20))
    return Schedule(
        draw(st.sampled_from(kinds)),
        final=final,
        initial=draw(st.floats(0.0, final)),
        begin_step=begin,
        end_step=draw(st.integers(begin + 1, begin + 60)),
        frequency=draw(st.integers(1, 9)),
    )


@given(schedules())
def test_schedules_never_fall_start_at_initial_and_reach_final_at_end_step(s) -> None:
    values = [s(t) for t in range(s.end_step + 5)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(v == s.initial for v in values[: s.begin_step])
    assert values[s.end_step] == s.final and values[-1] == s.final
    assert all(s.initial <= v <= s.final for v in values)


@given(schedules(kinds=("linear", "cubic")))
def test_sparsity_changes_only_on_update_steps(s) -> None:
    for t in range(s.begin_step + 1, s.end_step):
        if (t - s.begin_step) % s.frequency:
            assert s(t) == s(t - 1)


@given(schedules(kinds=("cubic",)))
def test_cubic_is_zhu_and_gupta_at_every_update(s) -> None:
    span = s.end_step - s.begin_step
    for t in range(s.begin_step, s.end_step, s.frequency):
        expected = s.final + (s.initial - s.final) * (1 - (t - s.begin_step) / span) ** 3
        assert s(t) == pytest.approx(expected, abs=1e-12)


def test_cubic_prunes_fast_first_and_slowly_at_the_end() -> None:
    values = [cubic(t, initial=0.0, final=0.8, begin_step=0, end_step=10) for t in range(11)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert steps == sorted(steps, reverse=True) and steps[0] > 3 * steps[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cubic", "final": 0.5, "end_step": 0}, "end_step must be > begin_step=0"),
        ({"kind": "linear", "final": 0.5, "begin_step": 5, "end_step": 5}, "end_step must be > begin_step=5"),
        ({"kind": "cubic", "final": 1.0, "end_step": 9}, r"final must be in \[0, 1\)"),
        ({"kind": "cubic", "final": 0.5, "initial": 0.6, "end_step": 9}, r"initial must be in \[0, 0.5\]"),
        ({"kind": "cubic", "final": 0.5, "begin_step": -1, "end_step": 9}, "begin_step must be in"),
        ({"kind": "cubic", "final": 0.5, "end_step": 9, "frequency": 0}, "frequency must be in"),
        ({"kind": "cubic", "final": 0.5, "end_step": 9.5}, "end_step must be an integer"),
        ({"kind": "exponential", "final": 0.5, "end_step": 9}, "Schedule: kind must be one of"),
    ],
)
def test_bad_schedules_are_config_errors(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Schedule(**kwargs)


def test_a_constant_schedule_needs_no_end_step() -> None:
    s = Schedule("constant", final=0.5, begin_step=3)
    assert [s(t) for t in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 4))


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
@pytest.mark.parametrize("kind", ["cubic", "linear", "constant"])
def test_gradual_pruning_is_monotone_and_ends_at_the_final_sparsity(kind, scope) -> None:
    model, ctx = _model(), ls.Context(progress=False)
    p = Magnitude(sparsity=0.8, schedule={"kind": kind, "initial": 0.1, "begin_step": 2, "end_step": 12, "frequency": 3}, scope=scope)
    pm = ls.PassManager([p])
    pm.apply(model, ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for t in range(1, 16):
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pm.step(model, ctx)
        masks = {n: get_mask(m).mask.clone() for n, m in masked_modules(model)}
        if history:
            assert all(bool((masks[n] <= history[-1][n]).all()) for n in masks), f"a weight came back at step {t}"
        history.append(masks)
        pruned = sum(int((~k).sum()) for k in masks.values())
        total = sum(k.numel() for k in masks.values())
        target = p.sparsity_at(t)
        if scope == "global":
            assert pruned == prune_count(target, total)
        elif scope == "layer":
            assert all(int((~k).sum()) == prune_count(target, k.numel()) for k in masks.values())
        else:
            assert all(bool(((~k).sum(1) == prune_count(target, k.shape[1])).all()) for k in masks.values())
    assert p.sparsity_at(12) == 0.8
    report = pm.finalize(model, ctx)
    if scope != "global":  # global: the layers' shares differ, the total was checked above
        assert all(abs(row.info["achieved_sparsity"] - 0.8) <= 1 / 64 for row in report.all_rows)


def test_apply_starts_at_the_initial_sparsity_and_reports_it() -> None:
    model = _model()
    p = Magnitude(sparsity=0.9, schedule={"kind": "cubic", "initial": 0.2, "end_step": 100})
    report = ls.compress_(model, p, progress=False, finalize=False)
    for row in report.all_rows:
        assert row.info["target_sparsity"] == 0.2
        assert abs(row.sparsity - 0.2) <= 1 / 64
    assert p.declares() == {"sparsity": 0.2}
    done = ls.PassManager([p]).finalize(model, ls.Context(progress=False))
    assert "below the final sparsity 0.9 (at 0.2)" in done.children[0].notes[0]


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ("cubic", "schedule must be None or a mapping with a \"kind\""),
        ({"end_step": 10}, "schedule must be None or a mapping with a \"kind\""),
        ({"kind": "cubic", "end": 10}, "schedule must be a mapping with keys from"),
        ({"kind": "cubic", "final": 0.9, "end_step": 10}, r"sparsity is the final value"),
        ({"kind": "cubic"}, r"schedule\['end_step'\] must be > begin_step=0 for a cubic schedule"),
        ({"kind": "cubic", "end_step": 10, "initial": 0.7}, r"schedule\['initial'\] must be in \[0, 0.5\]"),
        ({"kind": "cubic", "end_step": 10.0}, r"schedule\['end_step'\] must be an integer"),
        ({"kind": "cubic", "end_step": 10, "frequency": 0}, r"schedule\['frequency'\] must be in \[1, inf\]"),
        ({"kind": "step", "end_step": 10}, r"schedule\['kind'\] must be one of 'constant', 'linear', 'cubic'"),
    ],
)
def test_schedules_are_checked_at_construction(schedule, match) -> None:
    with pytest.raises(ConfigError, match=match):
        Magnitude(schedule=schedule)


def test_n_m_patterns_take_no_schedule() -> None:
    with pytest.raises(ConfigError, match="schedule must be None with an N:M pattern"):
        Magnitude(pattern="2:4", schedule={"kind": "linear", "end_step": 10})


def test_a_schedule_round_trips_through_recipes() -> None:
    schedule = {"kind": "cubic", "initial": 0.05, "begin_step": 10, "end_step": 1000, "frequency": 50}
    p = Magnitude(sparsity=0.75, schedule=schedule)
    recipe = ls.PassManager([p]).to_recipe()
    assert recipe["passes"][0] == {"pass": "magnitude", "sparsity": 0.75, "schedule": schedule}
    assert ls.PassManager.from_recipe(recipe).passes[0] == p
    toml = 'passes = [{pass = "magnitude", sparsity = 0.75, schedule = {kind = "cubic", end_step = 1000, frequency = 50}}]'
    built = ls.PassManager.from_recipe(tomllib.loads(toml)).passes[0]
    assert built.schedule_spec == Schedule("cubic", final=0.75, end_step=1000, frequency=50)
