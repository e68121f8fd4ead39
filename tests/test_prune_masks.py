"""Masks as parametrizations: training never revives a pruned weight, baking is exact and rolls back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import llmslim as ls
from llmslim.errors import ConfigError, PassError
from llmslim.prune import Magnitude, bake_, get_mask, is_transposed, masked_modules, prune_count, rows_view, set_mask_
from llmslim.testing import make_model
from llmslim.testing import strategies as lst


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, pm: ls.PassManager | None = None, ctx=None) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        loss = (model(x) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if pm is not None:
            pm.step(model, ctx)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99)),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("storage", ["dense", "compressed"])
def test_masks_survive_50_optimizer_steps_and_zeros_are_exact_after_finalize(optimizer, storage) -> None:
    model = _net()
    opt = OPTIMIZERS[optimizer](model.parameters())  # built before pruning: the same Parameters stay
    _train(model, opt, 5)  # momentum and Adam moments are non-zero everywhere before pruning
    ctx = ls.Context(progress=False)
    pm = ls.PassManager([Magnitude(sparsity=0.6, storage=storage)])
    pm.apply(model, ctx)
    pruned = {name: ~get_mask(m).mask.clone() for name, m in masked_modules(model)}
    original = model[0].parametrizations.weight.original
    _train(model, opt, 1)
    # the optimizer moved pruned originals (momentum, decay): the forward's mask is what holds them
    assert bool(original[pruned["0"]].ne(0).any())
    assert bool((model[0].weight[pruned["0"]] == 0).all())
    pm.step(model, ctx)
    assert bool((original[pruned["0"]] == 0).all())  # step() zeroes them again
    _train(model, opt, 49, pm, ctx)
    for name, m in masked_modules(model):
        assert bool((m.weight[pruned[name]] == 0).all())
    pm.finalize(model, ctx)
    for name, mask in pruned.items():
        weight = rows_view(model.get_submodule(name), model.get_submodule(name).weight) if storage == "compressed" else model.get_submodule(name).weight
        assert bool((weight[mask] == 0).all())
        assert int((weight == 0).sum()) >= prune_count(0.6, weight.numel())


def test_the_forward_masks_and_gradients_reach_only_kept_weights() -> None:
    layer = nn.Linear(6, 3)
    keep = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    set_mask_(layer, keep, 0.5)
    x = torch.randn(4, 6)
    expected = x @ torch.where(keep, layer.parametrizations.weight.original, 0).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    layer(x).sum().backward()
    assert bool((layer.parametrizations.weight.original.grad[~keep] == 0).all())
    assert bool((layer.parametrizations.weight.original.grad[keep] != 0).any())


def test_an_inf_in_a_pruned_original_still_gives_an_exact_zero() -> None:
    layer = nn.Linear(2, 1, bias=False)
    set_mask_(layer, torch.tensor([[True, False]]), 0.5)
    with torch.no_grad():
        layer.parametrizations.weight.original[0, 1] = float("inf")
    assert layer.weight[0, 1].item() == 0.0


@given(lst.models(["mlp", "convnet", "attention", "mha"]), st.floats(0.0, 0.95), lst.seeds())
def test_baking_gives_the_parametrized_forward_bit_for_bit(pair, sparsity, seed) -> None:
    model, batch = pair
    targets = ("Linear", "Conv2d")
    ctx = ls.Context(progress=False, seed=seed)
    pm = ls.PassManager([Magnitude(sparsity=sparsity, targets=targets)])
    pm.apply(model, ctx)
    with torch.no_grad():
        masked = model(batch)
    weights = {n: m.parametrizations.weight.original for n, m in masked_modules(model)}
    pm.finalize(model, ctx)
    assert not masked_modules(model) and not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, w in weights.items():
        assert model.get_submodule(name).weight is w  # the same Parameter: an optimizer keeps training it
        assert type(model.get_submodule(name)).__name__ in ("Linear", "Conv2d", "NonDynamicallyQuantizableLinear")
    with torch.no_grad():
        torch.testing.assert_close(model(batch), masked, rtol=0, atol=0)


def test_a_failing_finalize_rolls_back_to_the_masked_model() -> None:
    model = _net()
    ctx = ls.Context(progress=False)
    pm = ls.PassManager([Magnitude()])
    pm.apply(model, ctx)
    x = torch.randn(3, 12)
    before = model(x)

    class Boom(Magnitude):
        def finalize(self, model, ctx):
            super().finalize(model, ctx)
            raise RuntimeError("boom")

    with pytest.raises(PassError, match="boom") as info:
        ls.PassManager([Boom()]).finalize(model, ctx)
    assert info.value.rolled_back
    assert len(masked_modules(model)) == 3
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    ls.PassManager([Magnitude()]).finalize(model, ctx)  # and it still bakes afterwards
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_masks_are_monotone_when_pruning_twice() -> None:
    model = _net()
    ls.compress_(model, Magnitude(sparsity=0.3), progress=False, finalize=False)
    first = get_mask(model[0]).mask.clone()
    ls.compress_(model, Magnitude(sparsity=0.5), progress=False, finalize=False)
    second = get_mask(model[0]).mask
    assert bool((second <= first).all())
    assert abs(float((~second).float().mean()) - 0.5) <= 1 / second.numel()
    assert len(model[0].parametrizations.weight) == 1  # one mask, updated, not two stacked


def test_another_parametrization_on_the_weight_is_refused() -> None:
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    with pytest.raises(ConfigError, match="must be a pruning Mask alone"):
        set_mask_(layer, torch.ones(4, 4, dtype=torch.bool), 0.0)


def test_baking_keeps_other_parametrized_tensors_working() -> None:
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "bias", nn.Identity())
    set_mask_(layer, torch.eye(4, dtype=torch.bool), 0.75)
    bake_(layer)
    assert parametrize.is_parametrized(layer, "bias") and not parametrize.is_parametrized(layer, "weight")
    assert int((layer.weight != 0).sum()) <= 4
    layer(torch.randn(2, 4))


def test_conv1d_rows_are_its_transpose() -> None:
    model, _ = make_model("gpt2", seed=0)
    conv = model.transformer.h[0].attn.c_attn
    assert is_transposed(conv) and not is_transposed(nn.Linear(2, 2))
    assert rows_view(conv, conv.weight).shape == (conv.nf, conv.nx)
