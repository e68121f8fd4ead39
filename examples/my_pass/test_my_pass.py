"""Property tests for the nm-prune plugin, written with llmslim's test kit."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import llmslim as ls
from llmslim.testing import check_pass, make_model
from llmslim.testing import strategies as lst

NMPrune = ls.get_pass("nm-prune")  # the installed plugin, found through its entry point


def test_default_config_keeps_the_contract():
    for kind in ("mlp", "convnet", "attention"):
        result = check_pass(NMPrune(), *make_model(kind, seed=0))
        assert "declared" in result.passed  # the 2:4 pattern holds in every reported module


@given(lst.passes(NMPrune), lst.models(["mlp", "convnet", "attention"]), lst.seeds())
def test_generated_configs_keep_the_contract(p, pair, seed):
    model, batch = pair
    check_pass(p, model, batch, seed=seed)


@given(lst.invalid_configs(NMPrune))
def test_wrong_types_are_rejected(fields):
    with pytest.raises(ls.errors.ConfigError):
        NMPrune(**fields)


@given(st.sampled_from(["2", "2:", "0:4", "5:4", "2-4", " 2:4"]))
def test_malformed_patterns_are_rejected(pattern):
    with pytest.raises(ls.errors.ConfigError, match="pattern must be 'N:M'"):
        NMPrune(pattern=pattern)
