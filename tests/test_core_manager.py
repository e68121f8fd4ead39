from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim.errors import CalibrationError, ConfigError, OrderError, PassError
from models import TinyNet, batch, same, snapshot
from toys import HalfLinear, ToyHalf, ToyPrune

CTX = dict(progress=False)


@dataclasses.dataclass
class Recorder(ls.PassBase):
    """Appends its name to a shared log on apply/step/finalize (order tests)."""

    log: list | None = None
    targets: tuple = ("Linear",)

    def apply(self, model, ctx):
        self.log.append(("apply", self.label, ctx.step))
        return self.report(modified=False)

    def step(self, model, ctx):
        self.log.append(("step", self.label, ctx.step))

    def finalize(self, model, ctx):
        self.log.append(("finalize", self.label, ctx.step))
        return None


def test_nested_managers_flatten_and_run_in_order() -> None:
    log: list = []
    a, b, c = (Recorder(log=log, name=n) for n in "abc")
    pm = ls.PassManager([a, ls.PassManager([b, ls.PassManager([c])])])
    assert pm.passes == (a, b, c) and len(pm) == 3 and list(pm) == [a, b, c]
    assert isinstance(pm, ls.Pass) and isinstance(pm, ls.Stepped)
    model, ctx = TinyNet(), ls.Context(**CTX)
    report = pm.apply(model, ctx)
    pm.step(model, ctx)
    pm.step(model, ctx)
    pm.finalize(model, ctx)
    assert [e[:2] for e in log] == [("apply", "a"), ("apply", "b"), ("apply", "c")] + [("step", n) for n in "abcabc"] + [
        ("finalize", n) for n in "abc"
    ]
    assert [e[2] for e in log if e[0] == "step"] == [0, 0, 0, 1, 1, 1] and ctx.step == 2
    assert [c.name for c in report.children] == ["a", "b", "c"] and not report.modified


def test_plain_protocol_objects_are_passes() -> None:
    class Plain:  # no base class: the protocol is the contract
        def apply(self, model, ctx):
            model.fc1.weight.requires_grad_(False)
            return ls.Report("plain")

    model = TinyNet()
    report = ls.compress_(model, Plain(), progress=False)
    assert report.children[0].name == "Plain" and not model.fc1.weight.requires_grad


def test_order_rule_rejects_before_any_work() -> None:
    model = TinyNet()
    before = snapshot(model)
    with pytest.raises(OrderError, match=r"pass 'toy-prune' cannot run after pass 'toy-half': weights are packed"):
        ls.compress_(model, ToyPrune(), ToyHalf(), ToyPrune(), progress=False)
    assert same(snapshot(model), before)
    ls.PassManager([ToyPrune(), ToyHalf()]).check()  # the other order is fine


def test_missing_inputs_are_rejected_up_front() -> None:
    @dataclasses.dataclass
    class NeedsData(ls.PassBase):
        requires = frozenset({"calibration"})

        def apply(self, model, ctx):  # pragma: no cover - never reached
            raise AssertionError

    @dataclasses.dataclass
    class NeedsTeacher(NeedsData):
        requires = frozenset({"teacher"})

    with pytest.raises(CalibrationError, match="'NeedsData' needs calibration data"):
        ls.compress_(TinyNet(), ToyPrune(), NeedsData(), progress=False)
    with pytest.raises(ConfigError, match="needs a teacher"):
        ls.compress_(TinyNet(), NeedsTeacher(), progress=False)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("toy", [ToyPrune, ToyHalf])
def test_rollback_is_bit_identical_and_error_names_everything(toy, fail_at) -> None:
    model = TinyNet()
    ls.compress_(model, ToyPrune(sparsity=0.25, targets=("conv",)), progress=False)  # a completed pass
    before = snapshot(model)
    with pytest.raises(PassError) as info:
        ls.compress_(model, ToyPrune(sparsity=0.1, targets=("conv",), name="first"), toy(fail_at=fail_at), progress=False)
    err = info.value
    targets = ["fc1", "fc2", "head"]
    assert err.pass_name == ls.pass_name(toy()) and err.module == targets[fail_at]
    assert err.completed == ("first",) and err.rolled_back and isinstance(err.__cause__, RuntimeError)
    assert f"module {targets[fail_at]!r}" in str(err) and "'first'" in str(err)
    # the failing pass is rolled back; 'first' stays applied (so only conv differs from `before`)
    after = snapshot(model)
    assert {k for k in before if not torch.equal(before[k][1], after[k][1])} <= {"conv.weight"}
    assert all(type(m) is not HalfLinear for m in model.modules())
    model(batch())


def test_rollback_restores_parametrizations_hooks_and_attributes() -> None:
    class Scale(nn.Module):
        def forward(self, w):
            return w * 0

    class Messy:
        def apply(self, model, ctx):
            torch.nn.utils.parametrize.register_parametrization(model.fc1, "weight", Scale())
            model.fc2.register_forward_hook(lambda *a: None)
            model.fc2.out_features = 99
            model.head = nn.Identity()
            model.extra = nn.Linear(1, 1)
            raise KeyError("late failure")

    model = TinyNet()
    before, out = snapshot(model), model(batch())
    with pytest.raises(PassError, match="KeyError"):
        ls.compress_(model, Messy(), progress=False)
    assert same(snapshot(model), before) and torch.equal(model(batch()), out)
    assert not torch.nn.utils.parametrize.is_parametrized(model.fc1)
    assert not model.fc2._forward_hooks and model.fc2.out_features == 16 and not hasattr(model, "extra")


def test_keyboard_interrupt_rolls_back_and_propagates_unchanged() -> None:
    class Interrupted(ToyHalf):
        def apply(self, model, ctx):
            super().apply(model, ctx)
            raise KeyboardInterrupt

    model = TinyNet()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        ls.compress_(model, Interrupted(), progress=False)
    assert same(snapshot(model), before)


def test_pass_returning_garbage_is_a_pass_error() -> None:
    class Bad:
        def apply(self, model, ctx):
            return {"not": "a report"}

    with pytest.raises(PassError, match="must return a Report"):
        ls.compress_(TinyNet(), Bad(), progress=False)


def test_report_totals_are_whole_model_and_rows_are_true() -> None:
    model = TinyNet()
    full = ls.model_bytes(model)
    report = ls.compress_(model, ToyPrune(sparsity=0.5), ToyHalf(), progress=False)
    prune, half = report.children
    assert report.bytes_before == full == prune.bytes_before == prune.bytes_after == half.bytes_before
    assert report.bytes_after == half.bytes_after == ls.model_bytes(model) < full
    assert [r.module for r in prune.rows] == ["fc1", "fc2", "head"]
    assert all(r.sparsity == pytest.approx(0.5, abs=0.02) for r in prune.rows)
    for row in half.rows:
        assert row.kind == "HalfLinear" and row.bits == 16.0
        assert row.bytes_after == ls.model_bytes(model.get_submodule(row.module)) < row.bytes_before
    assert report.compression == pytest.approx(full / ls.model_bytes(model))
    text = str(report)
    assert "toy-half" in text and "fc2" in text and "HalfLinear" in text
    assert report.to_markdown().count("\n") == text.count("\n") + 1  # + the header rule
    assert report.params_before == report.params_after == ls._measure.count_params(model)
    assert ls.Report.from_dict(json.loads(report.to_json())) == report


def test_context_cache_is_invalidated_by_modifying_passes() -> None:
    calls = []

    class Reader:
        def __init__(self, modified):
            self.modified = modified

        def apply(self, model, ctx):
            calls.append(ctx.analysis("norms", lambda: len(calls)))
            return ls.Report("reader", modified=self.modified)

    ctx = ls.Context(**CTX)
    ls.PassManager([Reader(False), Reader(False), Reader(True), Reader(False)]).apply(TinyNet(), ctx)
    assert calls == [0, 0, 0, 3]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_recipe_round_trip(tmp_path, suffix) -> None:
    pm = ls.PassManager(
        [ToyPrune(sparsity=0.3, targets=("re:fc\\d", "head"), ignore=("fc2",)), ToyHalf(name="half \"quoted\"")],
        name="my recipe",
    )
    path = pm.save_recipe(tmp_path / f"recipe{suffix}")
    again = ls.PassManager.from_recipe(path)
    assert again == pm and again.to_recipe() == pm.to_recipe()
    assert ls.PassManager.from_recipe(pm.to_recipe()) == pm


def test_recipe_from_design_toml(tmp_path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[passes]]\npass = "toy-prune"\nsparsity = 0.5\ntargets = ["Linear"]\nignore = ["head"]\n\n[[passes]]\npass = "toy-half"\n')
    pm = ls.PassManager.from_recipe(path)
    assert pm.passes == (ToyPrune(sparsity=0.5, ignore=("head",)), ToyHalf())


@pytest.mark.parametrize(
    ("content", "suffix", "pattern"),
    [
        ("[[passes]\n", ".toml", "valid TOML"),
        ("{", ".json", "valid JSON"),
        ('{"passes": 3}', ".json", "'passes' must be a list"),
        ('{"passes": [], "extra": 1}', ".json", "unknown top-level key"),
        ("passes: []", ".yaml", r"must end in \.json or \.toml"),
        ('{"passes": [{"pass": "toy-prune", "sparsity": -1}]}', ".json", r"sparsity must be in \[0, 1\)"),
    ],
)
def test_bad_recipes(tmp_path, content, suffix, pattern) -> None:
    path = tmp_path / f"r{suffix}"
    path.write_text(content)
    with pytest.raises(ConfigError, match=pattern):
        ls.PassManager.from_recipe(path)
    with pytest.raises(ConfigError, match="readable"):
        ls.PassManager.from_recipe(tmp_path / "missing.json")


def test_compress_argument_checks() -> None:
    with pytest.raises(ConfigError, match="either ctx or"):
        ls.compress_(TinyNet(), ToyPrune(), ctx=ls.Context(), calibration=[batch()])
    model = TinyNet()
    report = ls.compress_(model, [ToyPrune(), {"pass": "toy-half"}], progress=False, finalize=False)
    assert [c.name for c in report.children] == ["toy-prune", "toy-half"]


def test_rollback_can_be_turned_off_and_says_so(caplog) -> None:
    model = TinyNet()
    with pytest.raises(PassError, match="NOT rolled back") as info:
        ls.compress_(model, ctx=ls.Context(progress=False, rollback=False), *[ToyPrune(sparsity=0.5, fail_at=1)])
    assert not info.value.rolled_back
    assert module_sparsity(model.fc1) >= 0.5  # the first module stays pruned: nothing was journaled


def test_manager_logs_each_pass(caplog) -> None:
    with caplog.at_level("INFO", logger="llmslim"):
        ls.compress_(TinyNet(), ToyPrune(), progress=False)
    assert "toy-prune: apply started (after: nothing)" in caplog.text and "toy-prune: apply done" in caplog.text


def module_sparsity(module) -> float:
    return float((module.weight == 0).float().mean())


def test_rollback_survives_remove_parametrizations_on_an_earlier_parametrization() -> None:
    class Zero(nn.Module):
        def forward(self, w):
            return w * 0

    model = TinyNet()
    torch.nn.utils.parametrize.register_parametrization(model.fc1, "weight", Zero())  # from an earlier pass
    before, out = snapshot(model), model(batch())

    class Unparametrize:
        def apply(self, model, ctx):
            torch.nn.utils.parametrize.remove_parametrizations(model.fc1, "weight", leave_parametrized=False)
            raise RuntimeError("late")

    with pytest.raises(PassError):
        ls.compress_(model, Unparametrize(), progress=False)
    assert torch.nn.utils.parametrize.is_parametrized(model.fc1, "weight")
    assert same(snapshot(model), before) and torch.equal(model(batch()), out)
