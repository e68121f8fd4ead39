"""The contract catches broken passes with the right check, and lets correct ones through."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import llmslim as ls
from llmslim import _registry
from llmslim.errors import ConfigError, LlmslimError
from llmslim.testing import ContractError, available_checks, check_pass, make_model
from llmslim.testing._compare import snapshot, snapshot_diff
from toys import ToyHalf, ToyPrune

CHECKS = ("runs", "finite", "report", "declared", "finalize", "spec", "rollback", "deterministic", "save_load")


def _prune_(w: torch.Tensor, fraction: float) -> None:
    k = int(fraction * w.numel())
    with torch.no_grad():
        if k:
            w.view(-1)[w.abs().flatten().argsort()[:k]] = 0.0


# -- deliberately broken passes ---------------------------------------------------------------
@dataclasses.dataclass
class LiesAboutSparsity(ls.PassBase):
    """Prunes half of each weight but reports more."""

    sparsity: float = 0.5
    edits_in_place = True

    def apply(self, model, ctx):
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            _prune_(m.weight, self.sparsity)
            rows.append(dataclasses.replace(self.row(name, m, before), sparsity=0.9))
        return self.report(rows)


@dataclasses.dataclass
class PrunesTooLittle(ls.PassBase):
    """Reports honestly, but prunes a tenth where it declares half."""

    sparsity: float = 0.5
    edits_in_place = True

    def apply(self, model, ctx):
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            _prune_(m.weight, 0.1)
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class NarrowsOutput(ls.PassBase):
    """Replaces the last Linear by a narrower one: the output shape changes."""

    targets: tuple = ("Linear",)

    def apply(self, model, ctx):
        name, last = self.select(model)[-1]
        before = self.measure(last)
        new = nn.Linear(last.in_features, 1)
        ls.replace_module_(model, name, new)
        return self.report([self.row(name, new, before)])


@dataclasses.dataclass
class MakesNaN(ls.PassBase):
    """Divides the first weight entry by zero."""

    edits_in_place = True

    def apply(self, model, ctx):
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            with torch.no_grad():
                m.weight.view(-1)[0] = float("nan")
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class LeavesHook(ls.PassBase):
    """Registers a statistics hook on each target and never removes it."""

    def apply(self, model, ctx):
        for _, m in self.modules(model, ctx):
            m.register_forward_hook(lambda mod, args, out: None)
        return self.report(modified=True)


class _Mask(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * (w.abs() > 0.1)


@dataclasses.dataclass
class LeavesMask(ls.PassBase):
    """Puts a mask parametrization on each target; finalize forgets to bake it."""

    def apply(self, model, ctx):
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            parametrize.register_parametrization(m, "weight", _Mask())
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class Unjournaled(ls.PassBase):
    """Edits weights in place but says it does not (edits_in_place=False): nothing is journaled."""

    def apply(self, model, ctx):
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            with torch.no_grad():
                m.weight.mul_(0.5)
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class TouchesOutsideTargets(ls.PassBase):
    """Journals its targets, then also rescales every bias in the model after the loop."""

    edits_in_place = True

    def apply(self, model, ctx):
        rows = [self.row(name, m, self.measure(m)) for name, m in self.modules(model, ctx)]
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, "bias", None) is not None:
                    m.bias.add_(1.0)
        return self.report(rows)


@dataclasses.dataclass
class SwallowsErrors(ls.PassBase):
    """Carries on past any error, so the manager never hears of it."""

    edits_in_place = True

    def apply(self, model, ctx):
        try:
            for _, m in self.modules(model, ctx):
                with torch.no_grad():
                    m.weight.mul_(0.5)
        except Exception:
            pass
        return self.report(modified=True)


@dataclasses.dataclass
class Noisy(ls.PassBase):
    """Adds noise from an unseeded generator: two runs differ."""

    edits_in_place = True

    def apply(self, model, ctx):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            with torch.no_grad():
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 1e-3)
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class SeededNoise(Noisy):
    """Adds noise from ctx.seed: deterministic."""

    def apply(self, model, ctx):
        g = torch.Generator().manual_seed(ctx.seed)
        rows = []
        for name, m in self.modules(model, ctx):
            before = self.measure(m)
            with torch.no_grad():
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * 1e-3)
            rows.append(self.row(name, m, before))
        return self.report(rows)


@dataclasses.dataclass
class FinalizeWithoutReport(ls.PassBase):
    """Finalize halves the storage of every Linear but returns no Report."""

    def apply(self, model, ctx):
        return self.report(modified=False)

    def finalize(self, model, ctx):
        for _, m in self.select(model):
            m.weight = nn.Parameter(m.weight.detach().half().float()[:, :])
            m.register_buffer("spare", torch.zeros(3))
        return None


@dataclasses.dataclass
class SaysUnmodified(ls.PassBase):
    """Changes weights but reports modified=False (cached analyses would go stale)."""

    edits_in_place = True

    def apply(self, model, ctx):
        for _, m in self.modules(model, ctx):
            with torch.no_grad():
                m.weight.mul_(2.0)
        return self.report(modified=False)


@dataclasses.dataclass
class Percent(ls.PassBase):
    """Converts sparsity to a percentage on construction: to_spec writes 50.0, which builds 5000."""

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sparsity = self.sparsity * 100

    def declares(self):
        return {}

    def apply(self, model, ctx):
        return self.report(modified=False)


@dataclasses.dataclass
class RefusesNaN(ls.PassBase):
    """Refuses any model (with a ConfigError), like a calibrated pass whose statistics came out NaN;
    ``scribble`` first changes the model, as a refusal must not."""

    scribble: bool = False

    def apply(self, model, ctx):
        if self.scribble:
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        raise ConfigError("refuses: statistics are NaN")


def _nan_input_model() -> tuple[nn.Module, torch.Tensor]:
    """A finite model whose output on its batch is NaN (the batch holds an Inf, as an overflowing
    pathological model's activations would)."""
    model, batch = make_model("mlp", seed=0, hidden=(16, 12))
    batch = batch.clone()
    batch[0, 0] = float("inf")
    return model, batch


@pytest.fixture
def registered():
    """Register classes for one test, then forget them."""
    names: list[str] = []

    def add(name, cls):
        ls.register(name)(cls)
        names.append(name)
        return cls

    yield add
    for name in names:
        _registry._unregister(name)


def _caught(p, kind: str = "mlp", **kwargs) -> ContractError:
    model, batch = make_model(kind, seed=0, hidden=(16, 12)) if kind == "mlp" else make_model(kind, seed=0)
    with pytest.raises(ContractError) as info:
        check_pass(p, model, batch, **kwargs)
    return info.value


# -- each broken pass is caught by the right check ----------------------------------------------
def test_a_report_that_lies_about_sparsity_fails_report() -> None:
    exc = _caught(LiesAboutSparsity())
    assert exc.check == "report" and exc.module == "0"
    assert "module '0' sparsity says 0.9 but the module measures 0.5" in str(exc)


def test_a_pass_short_of_its_declared_sparsity_fails_declared() -> None:
    exc = _caught(PrunesTooLittle())
    assert exc.check == "declared" and exc.module == "0"
    assert "below the declared 0.5" in str(exc) and "short by 0.4" in str(exc)


def test_a_changed_output_shape_fails_runs() -> None:
    exc = _caught(NarrowsOutput())
    assert exc.check == "runs"
    assert "output has shape (2, 1) after the pass but shape (2, 4) before" in str(exc)


def test_output_structure_is_compared_through_dicts_and_tuples() -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return {"logits": h, "aux": (h.sum(-1), None)} if self.fc.out_features == 3 else {"logits": h}

    @dataclasses.dataclass
    class Widen(ls.PassBase):
        def apply(self, model, ctx):
            model.fc = nn.Linear(4, 5)
            return self.report()

    with pytest.raises(ContractError, match=r"output\['aux'\]\[0\] is missing after the pass") as info:
        check_pass(Widen(), DictModel(), torch.randn(2, 4))
    assert info.value.check == "runs"


def test_a_pass_that_raises_fails_runs_with_its_error() -> None:
    exc = _caught(ToyPrune(fail_at=0))
    assert exc.check == "runs" and exc.module == "0"
    assert "injected failure at module 0" in str(exc)


def test_a_model_that_never_ran_is_reported_as_such() -> None:
    model, _ = make_model("mlp", seed=0)
    with pytest.raises(ContractError, match="does not run on the batch even before the pass") as info:
        check_pass(ToyPrune(), model, torch.randn(2, 99))
    assert info.value.check == "runs"


def test_a_clean_refusal_of_a_model_already_non_finite_skips_every_check() -> None:
    model, batch = _nan_input_model()
    result = check_pass(RefusesNaN(), model, batch)
    assert result.passed == () and set(result.skipped) == set(CHECKS)
    assert "non-finite before the pass, which refused it cleanly" in result.skipped["runs"]
    assert "refuses: statistics are NaN" in result.skipped["save_load"]


def test_refusing_a_finite_model_fails_runs() -> None:
    exc = _caught(RefusesNaN())
    assert exc.check == "runs" and "refuses: statistics are NaN" in str(exc)


def test_a_refusal_that_changed_the_model_fails_runs() -> None:
    model, batch = _nan_input_model()
    # the manager rolls the edit back, so the pass is not caught changing the model: make the
    # refusal outlive the journal by editing without it
    with pytest.raises(ContractError) as info:
        check_pass(RefusesNaN(scribble=True), model, batch)
    assert info.value.check == "runs"


def test_nan_weights_fail_finite() -> None:
    exc = _caught(MakesNaN())
    assert exc.check == "finite"
    assert "NaN" in str(exc)


def test_a_hook_left_behind_fails_finalize() -> None:
    exc = _caught(LeavesHook())
    assert exc.check == "finalize" and exc.module == "0"
    assert "module '0' still has 1 forward hook(s) after finalize (0 before the pass)" in str(exc)


def test_a_parametrization_left_behind_fails_finalize() -> None:
    exc = _caught(LeavesMask())
    assert exc.check == "finalize" and "still has parametrizations on ['weight']" in str(exc)


def test_an_unjournaled_in_place_edit_fails_rollback() -> None:
    exc = _caught(Unjournaled())
    assert exc.check == "rollback" and exc.module == "0"
    assert "on entering module '4'" in str(exc)  # the mid-pass injection: modules 0 and 2 were edited
    assert "tensor 'weight' differs in" in str(exc)


def test_an_edit_outside_the_journaled_targets_fails_rollback_after_apply() -> None:
    exc = _caught(TouchesOutsideTargets(targets=("0",)))
    assert exc.check == "rollback"
    assert "after apply() returned" in str(exc) and "tensor 'bias'" in str(exc)


def test_a_swallowed_failure_fails_rollback() -> None:
    exc = _caught(SwallowsErrors())
    assert exc.check == "rollback" and "was swallowed" in str(exc)


def test_a_pass_with_unseeded_randomness_fails_deterministic() -> None:
    exc = _caught(Noisy())
    assert exc.check == "deterministic"
    assert "two runs with seed 0 give different models: module '0' tensor 'weight' differs in" in str(exc)
    check_pass(SeededNoise(), *make_model("mlp", seed=0))  # the seeded version keeps the contract


def test_a_finalize_that_changes_the_model_silently_fails_report() -> None:
    exc = _caught(FinalizeWithoutReport())
    assert exc.check == "report" and "finalize changed the model" in str(exc)


def test_modified_false_on_a_changed_model_fails_report() -> None:
    exc = _caught(SaysUnmodified())
    assert exc.check == "report" and "modified=False but the pass changed module '0'" in str(exc)


def test_a_spec_that_builds_another_pass_fails_spec(registered) -> None:
    registered("test-percent", Percent)
    exc = _caught(Percent())
    assert exc.check == "spec" and "which is not equal to" in str(exc) and "sparsity=5000.0" in str(exc)


@dataclasses.dataclass
class Compiled(ls.PassBase):
    """Keeps a compiled regular expression in a public field: not plain data, no recipe."""

    pattern: str = "w.*"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pattern = re.compile(self.pattern)

    def apply(self, model, ctx):
        return self.report(modified=False)


def test_a_registered_pass_that_cannot_be_written_fails_spec(registered) -> None:
    registered("test-compiled", Compiled)
    exc = _caught(Compiled())
    assert exc.check == "spec" and "must be plain data" in str(exc)


def test_python_only_targets_skip_spec_with_the_reason(registered) -> None:
    registered("test-toy-prune-sub", type("Sub", (ToyPrune,), {}))
    p = ls.get_pass("test-toy-prune-sub")(targets=(nn.Linear,))
    result = check_pass(p, *make_model("mlp"))
    assert "cannot be written to a recipe" in result.skipped["spec"]


# -- correct passes keep the contract -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "convnet", "attention"])
@pytest.mark.parametrize("cls", [ToyPrune, ToyHalf], ids=["toy-prune", "toy-half"])
def test_the_toy_passes_keep_every_check(cls, kind: str) -> None:
    model, batch = make_model(kind, seed=1, pathologies=("outliers", "zero_rows"))
    result = check_pass(cls(), model, batch)
    expected = [c for c in CHECKS if c not in ("save_load", "declared" if cls is ToyHalf else "")]
    assert list(result.passed) == expected
    assert result.skipped["save_load"] == "checkpoint format arrives with issue 8"


def test_checks_are_listed_in_order() -> None:
    assert available_checks() == CHECKS


def test_check_pass_changes_neither_the_model_nor_the_pass() -> None:
    model, batch = make_model("mlp", seed=2)
    p = ToyPrune(sparsity=0.7)
    before, pass_before = snapshot(model), copy.deepcopy(p)
    check_pass(p, model, batch)
    with pytest.raises(ContractError):
        check_pass(Unjournaled(), model, batch)
    assert snapshot_diff(before, snapshot(model)) is None
    assert p == pass_before


def test_check_pass_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    check_pass(SeededNoise(), *make_model("mlp", seed=0), seed=9)
    assert torch.equal(state, torch.get_rng_state())


def test_skips_need_a_known_check_and_a_reason() -> None:
    model, batch = make_model("mlp", seed=0)
    with pytest.raises(ConfigError, match=r"skip\['finalize'\] must be a non-empty reason \(got ''\)"):
        check_pass(LeavesHook(), model, batch, skip={"finalize": ""})
    with pytest.raises(ConfigError, match="unknown check 'finalise'"):
        check_pass(LeavesHook(), model, batch, skip={"finalise": "typo"})
    with pytest.raises(ConfigError, match="skip must be a mapping"):
        check_pass(LeavesHook(), model, batch, skip=["finalize"])
    result = check_pass(LeavesHook(), model, batch, skip={"finalize": "the hook is the product"})
    assert result.skipped["finalize"] == "the hook is the product" and "finalize" not in result.passed
    assert "skip  finalize: the hook is the product" in str(result)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": 1.5}, "seed must be an integer"), ({"atol": -1.0}, "atol must be a finite number >= 0"),
     ({"forward": 3}, "forward must be callable")],
)
def test_bad_arguments_are_config_errors(kwargs, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_pass(ToyPrune(), *make_model("mlp"), **kwargs)
    with pytest.raises(ConfigError, match="pass_ must have apply"):
        check_pass(object(), *make_model("mlp"))


def test_contract_error_is_an_assertion_error_an_llmslim_error_and_picklable() -> None:
    assert issubclass(ContractError, AssertionError) and issubclass(ContractError, LlmslimError)
    exc = pickle.loads(pickle.dumps(ContractError("report", "it lied", module="fc1", pass_name="p")))
    assert (exc.check, exc.module, exc.pass_name, str(exc)) == ("report", "fc1", "p", "check 'report': it lied [pass 'p']")


def test_calibration_and_teacher_are_supplied_when_required() -> None:
    seen = {}

    @dataclasses.dataclass
    class NeedsBoth(ls.PassBase):
        requires = frozenset({"calibration", "teacher"})

        def apply(self, model, ctx):
            seen["batches"] = len(ctx.calibration)
            seen["teacher"] = ctx.teacher is not None and ctx.teacher is not model
            seen["out"] = tuple(ctx.run(ctx.teacher, ctx.calibration[0]).shape)
            return self.report(modified=False)

    result = check_pass(NeedsBoth(), *make_model("mlp", seed=0))
    assert seen == {"batches": 1, "teacher": True, "out": (2, 4)} and "runs" in result.passed


def test_a_plain_protocol_pass_without_modules_gets_a_note() -> None:
    class Freeze:
        """No base class, no finalize, no working_on."""

        def apply(self, model, ctx):
            return ls.Report("freeze", modified=False)

    result = check_pass(Freeze(), *make_model("mlp"))
    assert "rollback" in result.passed and "spec" in result.skipped and "finalize" in result.passed
    assert any("no failure was injected mid-pass" in note for note in result.notes)


def test_non_finite_models_skip_finite_with_a_reason() -> None:
    model, batch = make_model("mlp", seed=0)
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    result = check_pass(ToyPrune(), model, batch)
    assert "already non-finite before the pass" in result.skipped["finite"]


def test_importing_the_kit_does_not_import_hypothesis() -> None:
    code = (
        "import sys, llmslim; assert 'hypothesis' not in sys.modules, 'llmslim'; "
        "import llmslim.testing; from llmslim.testing import check_pass, make_model; "
        "assert 'hypothesis' not in sys.modules, 'llmslim.testing'; "
        "from llmslim.testing import strategies; assert 'hypothesis' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
