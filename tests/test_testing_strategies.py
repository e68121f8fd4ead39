"""The kit's strategies: configs construct (or are rejected), models run, pathologies are real."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim._validate import check_choice, check_range
from llmslim.errors import ConfigError, MissingDependencyError
from llmslim.testing import make_model, make_weight, register_profiles
from llmslim.testing import strategies as lst
from llmslim.testing._compare import snapshot, snapshot_diff
from llmslim.testing._configs import invalid_values
from llmslim.testing._models import HUGE, TINY, has_transformers
from toys import ToyPrune

SPARSITY = {"min_value": 0.0, "max_value": 1.0, "exclude_max": True}


@dataclasses.dataclass
class Kitchen(ls.PassBase):
    """Every annotation the strategies understand, with range rules in validate()."""

    flag: bool = False
    steps: int = 3
    ratio: float = 0.25
    mode: Literal["row", "tensor"] = "row"
    group: Literal[32, 64, 128] = 64
    tag: str = "x"
    limit: Optional[float] = None  # noqa: UP007  (Optional spelling on purpose)
    bits: int | None = None
    sizes: tuple[int, ...] = ()
    pair: tuple[int, str] = (1, "a")

    strategy_overrides: ClassVar = {
        "steps": {"min_value": 1, "max_value": 10},
        "ratio": {"min_value": 0.0, "max_value": 1.0, "exclude_min": True},
        "limit": {"min_value": 0.0, "max_value": 5.0},
    }

    def validate(self) -> None:
        check_range(self.label, "steps", self.steps, 1, 10)
        check_range(self.label, "ratio", self.ratio, 0.0, 1.0, lo_open=True)
        if self.limit is not None:
            check_range(self.label, "limit", self.limit, 0.0, 5.0)
        check_choice(self.label, "mode", self.mode, ("row", "tensor"))


@given(lst.passes(Kitchen))
def test_generated_configs_construct_and_respect_the_ranges(p: Kitchen) -> None:
    assert isinstance(p, Kitchen)
    assert 1 <= p.steps <= 10 and 0.0 < p.ratio <= 1.0 and (p.limit is None or 0.0 <= p.limit <= 5.0)
    assert p.mode in ("row", "tensor") and p.group in (32, 64, 128)
    assert isinstance(p.sizes, tuple) and all(isinstance(s, int) for s in p.sizes)
    assert isinstance(p.pair[0], int) and isinstance(p.pair[1], str)


@given(lst.invalid_configs(Kitchen))
def test_invalid_configs_are_rejected_with_config_error(fields: dict) -> None:
    with pytest.raises(ConfigError, match="must"):
        Kitchen(**fields)


@given(lst.passes(ToyPrune, sparsity=SPARSITY, fail_at=[None]))
def test_call_overrides_refine_a_class_without_its_own(p: ToyPrune) -> None:
    assert 0.0 <= p.sparsity < 1.0 and p.fail_at is None


@given(lst.invalid_configs(ToyPrune, sparsity=SPARSITY))
def test_toy_prune_rejects_invalid_configs(fields: dict) -> None:
    with pytest.raises(ConfigError):
        ToyPrune(**fields)


def test_invalid_values_cover_types_ranges_nan_and_targets() -> None:
    bad = invalid_values(ToyPrune, {"sparsity": SPARSITY})
    assert bad["targets"] == [None, 3, [3], ()]
    assert 1.0 in bad["sparsity"] and -0.001 in bad["sparsity"] and any(v != v for v in bad["sparsity"])
    assert "x" in bad["sparsity"] and True in bad["sparsity"]
    assert 1.5 in bad["fail_at"] and None not in bad["fail_at"]  # Optional: None is valid


def test_a_classmethod_hook_can_build_overrides_lazily() -> None:
    @dataclasses.dataclass
    class Lazy(ls.PassBase):
        k: int = 2

        @classmethod
        def strategy_overrides(cls):
            return {"k": st.sampled_from([2, 4])}

    @settings(max_examples=10)
    @given(lst.passes(Lazy))
    def check(p):
        assert p.k in (2, 4)

    check()


@pytest.mark.parametrize(
    ("cls_or_override", "message"),
    [
        ({"nope": [1]}, "unknown field"),
        ({"sparsity": {"low": 0}}, "must be a strategy, a list of choices or a range"),
        ({"sparsity": 0.5}, "must be a strategy, a list of choices or a range"),
    ],
)
def test_malformed_overrides_are_config_errors(cls_or_override, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lst.passes(ToyPrune, **cls_or_override)


def test_classes_the_strategies_cannot_handle_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="need a dataclass pass class"):
        lst.passes(int)

    @dataclasses.dataclass
    class NoDefault(ls.PassBase):
        fn: object = None
        other: dict = dataclasses.field(default_factory=dict)

    lst.passes(NoDefault)  # fields with defaults keep them

    @dataclasses.dataclass
    class Required:
        table: dict
        anything: Any = None

        def apply(self, model, ctx): ...

    with pytest.raises(ConfigError, match="cannot derive values for Required.table"):
        lst.passes(Required)
    assert list(invalid_values(Required)) == ["table"]  # a dict field rejects None; Any accepts all

    @dataclasses.dataclass
    class Loose:
        anything: Any = None

        def apply(self, model, ctx): ...

    with pytest.raises(ConfigError, match="no invalid value can be derived"):
        lst.invalid_configs(Loose)


# -- weights ------------------------------------------------------------------------------------
shapes = st.tuples(st.integers(1, 12), st.integers(1, 20))


@given(shapes, lst.seeds())
def test_outliers_are_far_from_the_bulk(shape, seed: int) -> None:
    clean, w = make_weight(shape, seed), make_weight(shape, seed, "outliers")
    changed = w != clean
    assert changed.any()
    scale = float(clean.std()) if clean.numel() > 1 else 0.0
    scale = scale or float(clean.abs().max()) or 1.0
    assert bool((w[changed].abs() >= 10 * scale * (1 - 1e-6)).all())


@given(shapes, lst.seeds())
def test_zero_rows_tiny_and_huge_do_what_they_say(shape, seed: int) -> None:
    clean = make_weight(shape, seed)
    zero = make_weight(shape, seed, "zero_rows")
    assert int((zero.abs().sum(dim=1) == 0).sum()) >= max(1, shape[0] // 4)
    assert torch.equal(make_weight(shape, seed, "tiny"), clean * TINY)
    assert torch.equal(make_weight(shape, seed, "huge"), clean * HUGE)


@given(lst.weights(pathologies=["zero_rows"], clean=False, ndim=4))
def test_conv_weights_have_the_pathology(w: torch.Tensor) -> None:
    assert w.dim() == 4 and bool((w.flatten(1).abs().sum(dim=1) == 0).any())


def test_bad_pathologies_and_kinds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="pathology must be one of"):
        make_weight((2, 2), pathology="spiky")
    with pytest.raises(ConfigError, match="kind must be one of"):
        make_model("rnn")
    with pytest.raises(ConfigError, match="kinds must be names from"):
        lst.models(["rnn"])
    with pytest.raises(ConfigError, match="unexpected keyword"):
        make_model("mlp", depth=3)


# -- models -------------------------------------------------------------------------------------
@given(lst.models(kinds=["mlp", "convnet", "attention", "mha"]))
def test_models_run_on_their_batch_in_eval_mode(pair) -> None:
    model, batch = pair
    assert not model.training
    with torch.no_grad():
        out = ls.default_forward(model, batch)
    assert isinstance(out, torch.Tensor) and out.shape[0] == (batch.shape[0])


@pytest.mark.parametrize("kind", ["mlp", "convnet", "attention", "mha"])
def test_models_are_deterministic_in_the_seed_and_leave_the_rng_alone(kind: str) -> None:
    state = torch.get_rng_state()
    a, batch_a = make_model(kind, seed=5, pathologies=("outliers", "huge"))
    b, batch_b = make_model(kind, seed=5, pathologies=("outliers", "huge"))
    c, _ = make_model(kind, seed=6)
    assert torch.equal(state, torch.get_rng_state())
    assert snapshot_diff(snapshot(a), snapshot(b)) is None and torch.equal(batch_a, batch_b)
    assert snapshot_diff(snapshot(a), snapshot(c)) is not None


@given(lst.mlps(pathologies=["zero_rows"]))
def test_model_pathologies_reach_the_weights(pair) -> None:
    model, _ = pair
    rows = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert any(bool((w.abs().sum(dim=1) == 0).any()) for w in rows)


@pytest.mark.skipif(not has_transformers(), reason="Hugging Face transformers is not installed")
@settings(max_examples=5)
@given(lst.hf_models())
def test_hf_models_run(pair) -> None:
    model, batch = pair
    with torch.no_grad():
        out = model(**batch)
    assert out[0].shape[:2] == batch["input_ids"].shape


def test_without_transformers_hf_kinds_say_what_to_install_and_strategies_skip(monkeypatch) -> None:
    import unittest

    from llmslim.testing import _models

    monkeypatch.setattr(_models, "has_transformers", lambda: False)
    monkeypatch.setattr(lst, "has_transformers", lambda: False)
    with pytest.raises(MissingDependencyError, match="pip install"):
        make_model("llama")
    assert "hf_models" not in repr(lst.models())

    @settings(max_examples=1)
    @given(lst.hf_models())
    def draw(pair):
        raise AssertionError("drew a model without transformers")

    with pytest.raises(unittest.SkipTest, match="transformers is not installed"):
        draw()


def test_profiles_are_registered() -> None:
    from hypothesis import settings as hs

    register_profiles()
    assert hs.get_profile("ci").deadline is None and hs.get_profile("ci").max_examples <= 25
    assert hs.get_profile("thorough").max_examples >= 500
