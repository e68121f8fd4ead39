"""Every registered pass keeps the contract: its default config on fixed models, and generated
configs on generated models.

The pass list is read at collection time, after ``conftest.py`` registered the toy passes;
plugins installed in the environment join automatically. The tables below are the one place a
pass family tunes the generic test: its field overrides for ``passes()``, the model kinds it
applies to, and checks it skips (each with the reason).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim.errors import TargetError
from llmslim.testing import check_pass, make_model
from llmslim.testing import strategies as lst
from llmslim.testing._models import HF_KINDS, has_transformers

PASSES = ls.available_passes()

FRACTION = {"min_value": 0.0, "max_value": 1.0, "exclude_max": True}

# pass name -> {field: strategy, range dict or list of choices} for strategies.passes()
OVERRIDES: dict[str, dict[str, Any]] = {
    "toy-prune": {"sparsity": FRACTION, "fail_at": [None]},  # fail_at is the toy's own failure switch
    "toy-half": {"fail_at": [None]},
    "toy-wanda": {"sparsity": FRACTION},
    # generated layer sizes (7, 13, 33 ...) rarely split into groups of M: keep the remainder dense
    # rather than fail (the "error" policy has its own tests in tests/test_prune_magnitude.py)
    "magnitude": {"remainder": ["dense"]},
    "wanda": {"remainder": ["dense"]},
    "sparsegpt": {"remainder": ["dense"]},
}

DEFAULT_KINDS: tuple[str, ...] = ("mlp", "convnet", "attention", "mha", *(HF_KINDS if has_transformers() else ()))
# pass name -> the model kinds it applies to (default: DEFAULT_KINDS)
KINDS: dict[str, tuple[str, ...]] = {
    # swaps nn.MultiheadAttention.out_proj for a module without .weight, which MHA reads directly
    "toy-half": tuple(k for k in DEFAULT_KINDS if k != "mha"),
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: no input statistics
    "toy-wanda": tuple(k for k in DEFAULT_KINDS if k != "mha"),
    "gptq": tuple(k for k in DEFAULT_KINDS if k != "mha"),  # likewise: calibration needs out_proj to run
    # the same for the calibrated pruning passes: out_proj never runs, so it has no statistics
    "wanda": tuple(k for k in DEFAULT_KINDS if k != "mha"),
    "sparsegpt": tuple(k for k in DEFAULT_KINDS if k != "mha"),
}

# pass name -> {check: reason} handed to check_pass
SKIPS: dict[str, dict[str, str]] = {}

# pass name -> fields the default-config test sets instead of the defaults: a training pass's
# defaults are sized for real models, here it trains a few steps
DEFAULT_FIELDS: dict[str, dict[str, Any]] = {"distill": {"steps": 3}}


def _applicable(p: Any, model: Any) -> bool:
    """Whether the pass selects at least one module of ``model`` (passes without ``select``: yes)."""
    select = getattr(p, "select", None)
    if not callable(select):
        return True
    try:
        return bool(select(model))
    except TargetError:
        return False


@pytest.mark.parametrize("name", PASSES)
def test_default_config_keeps_the_contract(name: str) -> None:
    p = ls.get_pass(name)(**DEFAULT_FIELDS.get(name, {}))
    ran = []
    for kind in KINDS.get(name, DEFAULT_KINDS):
        model, batch = make_model(kind, seed=0)
        if _applicable(p, model):
            check_pass(p, model, batch, skip=SKIPS.get(name), seed=0)
            ran.append(kind)
    if not ran:
        pytest.skip(f"pass {name!r} selects no module of the model kinds {KINDS.get(name, DEFAULT_KINDS)}")


@pytest.mark.parametrize("name", PASSES)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_generated_configs_keep_the_contract(name: str, data: st.DataObject) -> None:
    cls = ls.get_pass(name)
    if not dataclasses.is_dataclass(cls):
        pytest.skip(f"pass {name!r} is not a dataclass: its fields cannot be generated")
    p = data.draw(lst.passes(cls, **OVERRIDES.get(name, {})), label="pass")
    model, batch = data.draw(lst.models(KINDS.get(name, DEFAULT_KINDS)), label="model")
    assume(_applicable(p, model))
    event(f"model: {type(model).__name__}")
    check_pass(p, model, batch, skip=SKIPS.get(name), seed=data.draw(lst.seeds(), label="seed"))
