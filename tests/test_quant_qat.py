"""The qat pass: straight-through fake quantization, training, finalize == fake-quant forward,
pruning masks, architectures, configs, and examples/qat_training.py."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import llmslim as ls
from llmslim.errors import ConfigError, OrderError, PassError
from llmslim.prune import Magnitude, get_mask
from llmslim.quant import QAT, FakeQuant, QuantLinear, fake_quantize

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qat_training.py"


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 8))


def _task(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 8, generator=torch.Generator().manual_seed(99)) / 8
    x = torch.randn(128, 64, generator=g)
    return x, torch.tanh(x @ teacher)


def _train(model: nn.Module, pm: ls.PassManager, ctx: ls.Context, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = _task(step)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pm.step(model, ctx)
        losses.append(loss.item())
    return losses


def test_fake_quant_forward_and_straight_through_gradient() -> None:
    layer = nn.Linear(48, 16)
    w = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", FakeQuant(bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16))
    expected = fake_quantize(w, bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
    assert torch.equal(layer.weight, expected)
    upstream = torch.randn(16, 48)
    (layer.weight * upstream).sum().backward()
    assert torch.equal(layer.parametrizations.weight.original.grad, upstream)  # passed straight through


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_qat_training_lowers_the_loss_and_finalize_matches_the_fake_forward(optimizer: str) -> None:
    model = _mlp()
    pm, ctx = ls.PassManager([QAT(bits=3, group_size=32)]), ls.Context(progress=False)
    pm.apply(model, ctx)
    # an optimizer built after apply (the same Parameter objects as before it)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3) if optimizer == "adamw" else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = _train(model, pm, ctx, opt, 60)
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:3]) / 3
    x = torch.randn(40, 64)
    with torch.no_grad():
        fake = model(x)
        weights = [m.weight.clone() for m in model if isinstance(m, nn.Linear)]
    report = pm.finalize(model, ctx)
    packed = [m for m in model if isinstance(m, QuantLinear)]
    assert len(packed) == 3 and [r.bits for r in report.all_rows] == [3.0, 3.0, 3.0]
    for layer, w in zip(packed, weights):
        assert torch.equal(layer.dequantize(torch.float32), w)  # the very weight training saw
    # the float32 (autograd) path computes the fake-quantized forward; the CPU kernels round
    # activations to bfloat16
    xg = x.clone().requires_grad_()
    assert torch.allclose(model(xg), fake, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert float((model(x) - fake).norm() / fake.norm()) < 1e-2


def test_an_optimizer_built_before_apply_keeps_training() -> None:
    model = _mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pm, ctx = ls.PassManager([QAT(bits=4, group_size=None, symmetric=True)]), ls.Context(progress=False)
    pm.apply(model, ctx)
    before = model[0].parametrizations.weight.original.detach().clone()
    _train(model, pm, ctx, opt, 3)
    assert not torch.equal(model[0].parametrizations.weight.original, before)


@pytest.mark.parametrize("together", [True, False])
def test_pruned_zeros_survive_qat_and_finalize(together: bool) -> None:
    model = _mlp(2)
    ctx = ls.Context(progress=False)
    prune, qat = Magnitude(sparsity=0.5), QAT(bits=4, group_size=32)
    if together:  # one manager: the mask is baked by magnitude's finalize, then qat packs
        pm = ls.PassManager([prune, qat])
        pm.apply(model, ctx)
    else:  # a pruned model (masks applied, not finalized), then QAT on its own
        ls.compress_(model, prune, progress=False, finalize=False)
        pm = ls.PassManager([qat])
        pm.apply(model, ctx)
    chain = [type(p).__name__ for p in model[0].parametrizations.weight]
    assert chain == ["Mask", "FakeQuant"]  # the mask first: fake quantization sees the masked weight
    pruned = [~get_mask(m).mask for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)  # decay would revive nothing
    _train(model, pm, ctx, opt, 10)
    for m, zeros in zip([m for m in model if isinstance(m, nn.Linear)], pruned):
        assert bool((m.weight[zeros] == 0).all())
    pm.finalize(model, ctx)
    if not together:
        ls.PassManager([prune]).finalize(model, ctx)  # nothing left to bake: the layers are packed
    packed = [m for m in model if isinstance(m, QuantLinear)]
    assert len(packed) == 3
    for m, zeros in zip(packed, pruned):
        assert bool((m.dequantize(torch.float32)[zeros] == 0).all()) and m.weight_sparsity >= 0.5


def test_pruning_after_qat_is_an_order_error() -> None:
    with pytest.raises(OrderError):
        ls.compress_(_mlp(), QAT(), Magnitude(sparsity=0.5), progress=False)


def test_qat_twice_on_a_weight_is_refused_and_rolled_back() -> None:
    model = _mlp()
    ls.compress_(model, QAT(), progress=False, finalize=False)
    with pytest.raises(PassError, match="already has fake quantization"):
        ls.compress_(model, QAT(bits=8, group_size=None), progress=False, finalize=False)
    assert [type(p).__name__ for p in model[0].parametrizations.weight] == ["FakeQuant"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bits=5), "bits must be one of 2, 3, 4, 8 (got 5)"),
        (dict(group_size=0), "group_size must be a positive integer or None (got 0)"),
        (dict(group_size=12.5), "group_size must be an integer or None (got 12.5)"),
        (dict(scale_dtype="int8"), "scale_dtype must be one of 'auto', 'bfloat16', 'float16', 'float32' (got 'int8')"),
        (dict(symmetric="yes"), "symmetric must be true or false (got 'yes')"),
    ],
)
def test_bad_configs_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        QAT(**kwargs)


def test_the_example_trains_in_a_plain_loop_and_beats_rounding(capsys: pytest.CaptureFixture[str]) -> None:
    result = runpy.run_path(str(EXAMPLE))["main"](steps=60)
    out = capsys.readouterr().out
    assert "QuantLinear" in out and out.rstrip().splitlines()[-1].startswith("held-out MSE")
    assert result["layers"] == 3 and result["bytes_ratio"] < 0.15
    assert result["qat"] < result["qat_start"] and result["qat"] < result["rtn"]
    assert abs(result["qat"] - result["qat_fake"]) < 0.05 * result["qat_fake"]


transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_qat_on_every_tiny_architecture(arch: str) -> None:
    model = models.tiny(arch).train()
    linear_like = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and not n.endswith("lm_head")}
    pm, ctx = ls.PassManager([QAT(bits=4, group_size=32)]), ls.Context(progress=False)
    pm.apply(model, ctx)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out = model(input_ids=ids)
        loss = out.logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean().neg() if hasattr(out, "logits") \
            else out.last_hidden_state.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pm.step(model, ctx)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids)
        fake = out.logits if hasattr(out, "logits") else out.last_hidden_state
    report = pm.finalize(model, ctx)
    assert {n for n, m in model.named_modules() if isinstance(m, QuantLinear)} == linear_like
    assert {r.module for r in report.all_rows} == linear_like
    with torch.no_grad():
        out = model(input_ids=ids)
        packed = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert float((packed - fake).norm() / fake.norm()) < 2e-2  # bfloat16 activations in the packed kernels
    if arch == "gpt2":
        assert not parametrize.is_parametrized(model.transformer.h[0].attn.c_attn)
