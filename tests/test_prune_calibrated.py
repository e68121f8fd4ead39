"""Wanda and SparseGPT on every tiny Hugging Face architecture, through finalize; sweep options."""

from __future__ import annotations

import pytest
import torch

import llmslim as ls
from llmslim import models
from llmslim.prune import CalibratedPrune, SparseGPT, Wanda, get_mask, masked_modules

pytest.importorskip("transformers")

PASSES = {"wanda": Wanda, "sparsegpt": SparseGPT}


def _batches(n: int = 4, length: int = 24) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(i))} for i in range(n)]


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("kind", sorted(PASSES))
def test_every_architecture_prunes_and_keeps_exact_zeros_after_finalize(arch: str, pattern: str, kind: str) -> None:
    model = models.tiny(arch)
    batch = _batches(1)[0]
    expected = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and n != "lm_head"}
    pm = ls.PassManager([PASSES[kind](pattern=pattern, ignore=["lm_head"])])
    ctx = ls.Context(_batches(), progress=False)
    report = pm.apply(model, ctx)
    rows = report.children[0].rows
    assert {r.module for r in rows} == {n for n, _ in masked_modules(model)} == expected
    for r in rows:
        assert r.info["pattern"] == pattern and r.info["achieved_sparsity"] == 0.5
        assert (r.error is None) == (kind == "wanda")
    masks = {r.module: get_mask(model.get_submodule(r.module)).mask.clone() for r in rows}
    with torch.no_grad():
        before = model(**batch)
    pm.finalize(model, ctx)
    for name, keep in masks.items():
        layer = model.get_submodule(name)
        assert not hasattr(layer, "parametrizations")
        assert bool((layer.weight[~keep] == 0).all())  # pruned: exactly zero
        if kind == "wanda":
            assert bool((layer.weight[keep] != 0).all())  # Wanda moves no kept weight
    with torch.no_grad():
        after = model(**batch)
    key = "logits" if hasattr(before, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(after, key), getattr(before, key))  # finalize changes nothing the forward sees


@pytest.mark.parametrize("kind", sorted(PASSES))
@pytest.mark.parametrize(
    "option", [{"sequential": True}, {"propagate": "original"}, {"propagate": "compressed"}, {"scope": "layer"}, {"scope": "row"}]
)
def test_sweep_options_run_and_change_what_is_measured(kind: str, option: dict) -> None:
    base, other = models.tiny("llama", layers=2), models.tiny("llama", layers=2)
    ls.compress_(base, PASSES[kind](ignore=["lm_head"]), calibration=_batches(), progress=False)
    report = ls.compress_(other, PASSES[kind](ignore=["lm_head"], **option), calibration=_batches(), progress=False)
    assert all(abs(r.info["achieved_sparsity"] - 0.5) < 0.01 for r in report.children[0].rows)
    differs = [n for n, m in base.named_modules() if hasattr(m, "weight") and n.startswith("model.layers")
               and not torch.equal(m.weight, other.get_submodule(n).weight)]
    if any(getattr(PASSES[kind](), k) != v for k, v in option.items()):
        assert differs, f"{option} gave the same model as the default"
    else:
        assert not differs
    if option == {"sequential": True}:  # the first group of the first block sees the same inputs either way
        assert not any(n.startswith("model.layers.0.self_attn.") and n.endswith(("q_proj", "k_proj", "v_proj")) for n in differs)


def test_class_attributes_keep_both_families_contracts() -> None:
    for cls in PASSES.values():
        assert issubclass(cls, CalibratedPrune)
        # read from an instance, as the plan check does (SparseGPT's depends on its bits field)
        assert cls.requires == frozenset({"calibration"}) and cls().produces == frozenset({"masks"})
        assert "packed" in cls.rejects_after and cls.edits_in_place
        assert cls().targets == ("Linear", "Conv1D")
        assert ls.get_pass(cls().label) is cls
        assert ls.build_pass(cls(sparsity=0.3, sequential=True).to_spec()) == cls(sparsity=0.3, sequential=True)


def test_nothing_prunes_packed_weights() -> None:
    with pytest.raises(ls.errors.OrderError, match="packed"):
        ls.PassManager([ls.get_pass("rtn")(), Wanda()]).apply(models.tiny("llama"), ls.Context(_batches(), progress=False))
