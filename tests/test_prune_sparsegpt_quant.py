"""SparseGPT with joint quantization (``bits`` set): the solver keeps its mask and its zeros, the
pass leaves packed or sparse quantized layers on every tiny architecture, and beats pruning then
rounding to nearest."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim.errors import ConfigError, OrderError
from llmslim.prune import Magnitude, QuantGrid, SparseGPT, obs_prune
from llmslim.quant import GPTQ, RTN, QuantLinear, SparseQuantLinear, dequantize

transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402


def _batches(n: int = 8, tokens: int = 64) -> list[dict]:
    return [{"input_ids": torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(i))} for i in range(n)]


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), pattern=st.sampled_from([None, (2, 4), (1, 4)]), bits=st.sampled_from([2, 3, 4, 8]),
       group_size=st.sampled_from([None, 4, 8, 12]), symmetric=st.booleans(), block_size=st.sampled_from([4, 8, 128]))
def test_joint_solver_keeps_the_mask_and_its_zeros(seed: int, pattern: tuple[int, int] | None, bits: int,
                                                   group_size: int | None, symmetric: bool, block_size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 24, generator=g) @ (torch.randn(24, 24, generator=g) / 5 + torch.eye(24))
    w, h = torch.randn(10, 24, generator=g), 2 * x.T @ x / 96
    prune = obs_prune(w, h, sparsity=0.5, n_m=pattern, block_size=block_size)
    grid = QuantGrid(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=torch.float32)
    joint = obs_prune(w, h, sparsity=0.5, n_m=pattern, block_size=block_size, quant=grid)
    assert torch.equal(joint.keep, prune.keep)  # the mask is the pruning solve's
    assert bool((joint.weight[~joint.keep] == 0).all())
    assert torch.equal(dequantize(joint.codes, joint.scale, joint.zero, group_size=group_size), joint.weight)
    if bits == 8:  # near-lossless grids: the joint solve lands next to the pruning solve
        assert joint.error == pytest.approx(prune.error, rel=0.05, abs=1e-3)


def test_joint_mode_beats_pruning_then_rtn_on_a_tiny_llama() -> None:
    # 3 bits, where rounding adds most; the output error on the calibration text, which both fit
    model, batches = models.tiny("llama"), _batches(n=4, tokens=32)
    ids = torch.cat([b["input_ids"] for b in batches])
    reference = _out(model, ids)
    errors = {}
    for key, passes in {
        "joint": [SparseGPT(bits=3, group_size=16, storage="compressed", ignore=["lm_head"])],
        "then-rtn": [SparseGPT(ignore=["lm_head"]), RTN(bits=3, group_size=16, storage="sparse")],
    }.items():
        quantized = copy.deepcopy(model)
        ls.compress_(quantized, *passes, calibration=batches, progress=False)
        errors[key] = float((_out(quantized, ids) - reference).norm() / reference.norm())
    assert errors["joint"] < errors["then-rtn"], errors


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_joint_mode_on_every_tiny_architecture(arch: str) -> None:
    model, batches = models.tiny(arch), _batches(n=4, tokens=32)
    pattern = "2:4" if arch in ("gpt2", "opt") else "unstructured"
    report = ls.compress_(model, SparseGPT(bits=4, group_size=32, pattern=pattern, storage="compressed", ignore=["lm_head"]),
                          calibration=batches, progress=False)
    rows = report.children[0].rows
    assert rows
    for row in rows:
        layer = model.get_submodule(row.module)
        assert isinstance(layer, SparseQuantLinear), row.module
        assert layer.format == ("nm" if pattern == "2:4" else "bitmask")
        assert layer.weight_sparsity >= 0.5 - 1 / layer.in_features
        assert row.info["storage"] == layer.format and row.bytes_after < row.bytes_before / 6
    assert torch.isfinite(_out(model, batches[0]["input_ids"])).all()


def test_dense_storage_leaves_packed_quantlinear_with_zero_codes() -> None:
    model = models.tiny("qwen2")
    ls.compress_(model, SparseGPT(bits=8, group_size=None, ignore=["lm_head"]), calibration=_batches(n=4, tokens=32),
                 progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.weight_sparsity >= 0.5


def test_configuration_and_order_rules() -> None:
    with pytest.raises(ConfigError, match="value_dtype must be None with bits set"):
        SparseGPT(bits=4, value_dtype="float16")
    with pytest.raises(ConfigError, match="group_size must be a positive integer or None"):
        SparseGPT(bits=4, group_size=0)
    with pytest.raises(ConfigError, match="bits must be"):
        SparseGPT(bits=5)
    for later in (Magnitude(), GPTQ()):  # the joint mode packs: no pruning or GPTQ after it
        with pytest.raises(OrderError, match="cannot run after pass 'sparsegpt'"):
            ls.PassManager([SparseGPT(bits=4), later]).check()
    ls.PassManager([SparseGPT(), GPTQ()]).check()  # pruning only: a quantizer may follow
    assert SparseGPT(bits=4).declares()["bits"] == 4.0 and "bits" not in SparseGPT().declares()
