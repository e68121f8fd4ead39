"""The ``distill`` pass: recovery towards the model as it was before the first pass, masks and fake
quantization trained through (Wanda -> QAT -> Distill -> finalize), earlier passes stepped,
rollback on failure, user data and teachers, bad configurations."""

from __future__ import annotations

import copy

import pytest
import torch

import llmslim as ls
from llmslim import evaluate, models
from llmslim.distill import Distill
from llmslim.errors import ConfigError, PassError
from llmslim.prune import Magnitude, Wanda, get_mask
from llmslim.quant import QAT, QuantLinear, SparseQuantLinear
from llmslim.quant._fakequant import get_fake_quant
from llmslim.testing._compare import snapshot, snapshot_diff
from llmslim.testing._models import has_transformers

pytestmark = [pytest.mark.skipif(not has_transformers(), reason="needs transformers"), pytest.mark.usefixtures("one_thread")]

LINEARS = ("model.layers.*",)



def _data(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (n, 2, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": x} for x in ids]


def _dense() -> torch.nn.Module:
    return models.tiny("llama", initializer_range=0.1)  # peaked outputs: pruning moves them measurably


def _kl(model: torch.nn.Module, reference: torch.nn.Module, data: list) -> float:
    ids = torch.cat([b["input_ids"].flatten() for b in data])
    return evaluate.kl_divergence(model, reference, ids, seq_len=16, progress=False)


def test_recovery_moves_a_pruned_model_back_towards_the_original() -> None:
    dense, data = _dense(), _data()
    pruned = copy.deepcopy(dense)
    ls.compress_(pruned, Magnitude(sparsity=0.5, targets=LINEARS), progress=False)
    healed = copy.deepcopy(dense)
    ctx = ls.Context(data, progress=False)
    report = ls.compress_(healed, Magnitude(sparsity=0.5, targets=LINEARS),
                          Distill(steps=20, lr=3e-3, lr_schedule="constant", teacher_dtype="float32"), ctx=ctx)
    assert _kl(healed, dense, data) < 0.5 * _kl(pruned, dense, data)
    row = report.children[1].rows[0]
    assert row.info["loss_end"]["kl"] < 0.5 * row.info["loss_start"]["kl"]
    assert row.info["steps"] == 20 and row.info["ctx_steps"] == 20 and ctx.step == 20
    assert "kept by the manager" in row.info["teacher"] and "float32" in row.info["teacher"]
    assert ctx.original is None and ctx.applied == ()  # the kept copy is dropped after apply
    assert any("stepped after each optimizer step: magnitude" in n for n in report.children[1].notes)
    down = healed.get_submodule("model.layers.0.mlp.down_proj")
    assert float((down.weight == 0).float().mean()) >= 0.5  # still pruned (the mask baked by finalize)


def test_masks_and_fake_quantization_survive_and_finalize_gives_sparse_int4() -> None:
    dense, data = _dense(), _data()
    model = copy.deepcopy(dense)
    pm = ls.PassManager([Wanda(sparsity=0.5, targets=LINEARS), QAT(bits=4, group_size=32, targets=LINEARS, storage="sparse"),
                         Distill(steps=5, lr=3e-3, targets=LINEARS)])
    ctx = ls.Context(data, progress=False)
    name = "model.layers.0.mlp.down_proj"
    pm.apply(model, ctx)
    layer = model.get_submodule(name)
    mask = get_mask(layer).mask.clone()
    assert get_fake_quant(layer) is not None
    assert bool((layer.weight[~mask] == 0).all())  # pruned weights still exactly zero after training
    assert len(set(layer.weight[0, :32].tolist())) <= 16  # one 4-bit group: at most 16 levels
    trained = layer.parametrizations.weight.original.detach().clone()
    fresh = copy.deepcopy(dense)
    ls.compress_(fresh, Wanda(sparsity=0.5, targets=LINEARS), calibration=data, progress=False, finalize=False)
    assert not torch.equal(trained, fresh.get_submodule(name).parametrizations.weight.original)  # it did train
    fake = model(**data[0]).logits.detach()
    pm.finalize(model, ctx)
    final = model.get_submodule(name)
    assert isinstance(final, SparseQuantLinear) and final.bits == 4 and final.weight_sparsity >= 0.5
    assert torch.equal(final.dequantize() == 0, ~mask)
    assert torch.allclose(model(**data[0]).logits, fake, atol=1e-3)
    packed = copy.deepcopy(dense)  # the default storage: packed int4 codes with the zeros in them
    ls.compress_(packed, Wanda(sparsity=0.5, targets=LINEARS), QAT(bits=4, group_size=32, targets=LINEARS),
                 Distill(steps=2, targets=LINEARS), calibration=data, progress=False)
    assert isinstance(packed.get_submodule(name), QuantLinear) and packed.get_submodule(name).weight_sparsity >= 0.5


def test_a_gradual_schedule_advances_during_recovery() -> None:
    prune = Magnitude(sparsity=0.5, targets=LINEARS, schedule={"kind": "linear", "begin_step": 0, "end_step": 4, "frequency": 1})
    model = _dense()
    ctx = ls.Context(_data(), progress=False)
    ls.PassManager([prune, Distill(steps=6, lr=1e-3)]).apply(model, ctx)
    assert get_mask(model.get_submodule("model.layers.1.mlp.up_proj")).sparsity == pytest.approx(0.5)
    assert ctx.step == 6


def test_a_failure_mid_training_rolls_the_model_back() -> None:
    model, data = _dense(), _data()
    ls.compress_(model, Magnitude(sparsity=0.5, targets=LINEARS), progress=False, finalize=False)
    before = snapshot(model)
    bad = [*data[:2], {"input_ids": torch.full((2, 16), 999)}]  # out of the vocabulary: fails at the third batch
    ctx = ls.Context(progress=False)
    with pytest.raises(PassError, match="distill") as info:
        ls.PassManager([Distill(steps=5, lr=1e-2, data=bad)]).apply(model, ctx)
    assert info.value.rolled_back and ctx.step == 0 and ctx.original is None
    assert snapshot_diff(before, snapshot(model)) is None
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_user_data_and_a_given_teacher() -> None:
    teacher = _dense()
    student = models.tiny("llama", seed=3, initializer_range=0.1)
    data = _data(seed=1)
    ctx = ls.Context(teacher=teacher, progress=False)  # no calibration: Distill(data=...) needs none
    before = snapshot(teacher)
    report = ls.compress_(student, Distill(steps=15, lr=3e-3, data=data, hidden_layers=("model.layers.1",)), ctx=ctx)
    info = report.children[0].rows[0].info
    assert info["teacher"].startswith("ctx.teacher on cpu, float32")
    assert set(info["loss_start"]) == {"kl", "hidden", "total"} and info["loss_end"]["total"] < info["loss_start"]["total"]
    assert snapshot_diff(before, snapshot(teacher)) is None  # the teacher is untouched
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    with pytest.raises(ConfigError, match="cannot be written|must be"):
        Distill(data=data).to_spec()
    assert ls.build_pass(Distill(steps=7, hidden_layers=("a=b",)).to_spec()) == Distill(steps=7, hidden_layers=("a=b",))


def test_plain_fine_tuning_is_cross_entropy_only() -> None:
    model, data = _dense(), _data()
    report = ls.compress_(model, Magnitude(sparsity=0.5, targets=LINEARS), Distill(steps=3, kl_weight=0.0, ce_weight=1.0),
                          calibration=data, progress=False)
    info = report.children[1].rows[0].info
    assert set(info["loss_start"]) == {"ce", "total"} and info["teacher"] == "none (cross-entropy only)"
    assert Distill(kl_weight=0.0, ce_weight=1.0).requires == {"calibration"}  # no copy of the original kept
    assert Distill(data=data).requires == {"original"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 0.0}, r"distill: temperature must be a finite number > 0 \(got 0.0\)"),
        ({"temperature": -2.0}, r"temperature must be a finite number > 0 \(got -2.0\)"),
        ({"steps": 0}, r"distill: steps must be an integer >= 1 \(got 0\)"),
        ({"warmup": 5, "steps": 5}, r"warmup must be an integer in \[0, steps\) = \[0, 5\) \(got 5\)"),
        ({"lr": 0.0}, r"lr must be a finite number > 0 \(got 0.0\)"),
        ({"kl_weight": 0.0}, r"kl_weight must be > 0, or ce_weight > 0"),
        ({"top_k": 4, "chunk_size": 8}, "chunk_size must be None when top_k is given"),
        ({"hidden_layers": ("a=b=c",)}, "hidden layers must be names"),
        ({"optimizer": "adam"}, r"optimizer must be one of 'adamw', 'sgd' \(got 'adam'\)"),
        ({"teacher_device": "gpu0"}, r"teacher_device must be None or a torch device \(got 'gpu0'\)"),
        ({"data": "text.txt"}, r"data must be None or a sequence"),
    ],
)
def test_bad_configs_raise_config_error(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Distill(**fields)


def test_bad_layers_and_widths_fail_in_apply_naming_the_pass() -> None:
    data = _data()
    with pytest.raises(PassError) as info:
        ls.compress_(_dense(), Distill(steps=1, hidden_layers=("model.layers.7",)), calibration=data, progress=False)
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError) and "distill: hidden layer 'model.layers.7' is not a module" in str(cause)
    narrow = models.tiny("llama", hidden=32, heads=2, kv_heads=1)
    with pytest.raises(PassError) as info:
        ls.compress_(narrow, Distill(steps=1, hidden_layers=("model.layers.0",), project=False), calibration=data,
                     teacher=_dense(), progress=False)
    assert isinstance(info.value.__cause__, ConfigError)
    assert "distill: hidden layers 'model.layers.0'" in str(info.value.__cause__) and "project=False" in str(info.value.__cause__)
    with pytest.raises(ConfigError, match="no teacher"):
        Distill(steps=1).apply(_dense(), ls.Context(data, progress=False))  # outside a manager, without a teacher
