"""Distiller: gradients reach only the student (and projections), hidden states are captured from
the right modules of every tiny Hugging Face architecture, a student gets closer to its teacher,
teachers in other precisions, attention transfer, cross-entropy, and bad settings."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llmslim import models
from llmslim.distill import Distiller, LogitKL
from llmslim.distill._capture import capture
from llmslim.errors import ConfigError
from llmslim.testing._models import has_transformers

pytestmark = [pytest.mark.skipif(not has_transformers(), reason="needs transformers"), pytest.mark.usefixtures("one_thread")]


LAYER0 = {
    "llama": "model.layers.0", "qwen2": "model.layers.0", "mistral": "model.layers.0",
    "opt": "model.decoder.layers.0", "gpt2": "transformer.h.0", "bert": "encoder.layer.0",
}


def _batch(seed: int = 0, batch: int = 2, seq: int = 12, pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, seq - pad :] = 0
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=g), "attention_mask": mask}


def test_gradients_reach_only_the_student_and_the_projections() -> None:
    teacher = models.tiny("llama")
    student = models.tiny("llama", hidden=32, heads=2, kv_heads=1, seed=1)
    d = Distiller(student, teacher, temperature=2.0, hidden_layers=["model.layers.1"])
    assert len(list(d.parameters())) == 1  # the 32 -> 64 projection; no student or teacher parameter
    flags = [p.requires_grad for p in teacher.parameters()]
    loss, parts = d(_batch())
    loss.backward()
    assert set(parts) == {"kl", "hidden"} and all(not v.requires_grad for v in parts.values())
    assert all(p.grad is None for p in teacher.parameters())
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is not None for p in d.trainable_parameters())
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in [*student.parameters(), *d.parameters()]}
    assert not teacher.training


@pytest.mark.parametrize("arch", sorted(LAYER0))
def test_hooks_capture_the_named_layers_of_each_architecture(arch: str) -> None:
    model = models.tiny(arch)
    batch = _batch()
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
        with capture(model, [LAYER0[arch]], "test", "student") as got:
            model(**batch)
    torch.testing.assert_close(got[LAYER0[arch]], states[1])  # hidden_states[1]: the first layer's output
    # identical models: zero hidden loss; a change after layer 0 leaves layer 0's loss at zero
    student = copy.deepcopy(model)
    d = Distiller(student, model, hidden_layers=[LAYER0[arch]], weights={"kl": 0.0})
    assert d(batch)[1]["hidden"].item() < 1e-10
    last = next(m for n, m in student.named_modules() if n == LAYER0[arch].replace(".0", ".1"))
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.5)
    assert d(batch)[1]["hidden"].item() < 1e-10
    if arch != "bert":  # bert has no logits: its "logits" are the last hidden states
        d2 = Distiller(student, model, hidden_layers=[LAYER0[arch]])
        assert d2(batch)[1]["kl"].item() > 0


def test_a_student_trained_with_the_distiller_gets_closer_to_its_teacher() -> None:
    torch.manual_seed(0)
    teacher = models.tiny("llama", seed=0)
    student = models.tiny("llama", seed=1)
    held_out = _batch(seed=99, pad=3)
    d = Distiller(student, teacher, temperature=2.0, hidden_layers=["model.layers.1"], weights={"hidden": 0.1})
    kl = LogitKL()

    def distance() -> float:
        with torch.no_grad():
            return kl(student(**held_out).logits, teacher(**held_out).logits, held_out["attention_mask"]).item()

    before = distance()
    optimizer = torch.optim.AdamW(d.trainable_parameters(), lr=3e-3)
    student.train()
    for step in range(25):
        loss, _ = d(_batch(seed=step, batch=4, seq=16, pad=step % 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert distance() < 0.7 * before


def test_plain_modules_with_tensor_batches_and_labels() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    student = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 5))
    d = Distiller(student, teacher, hidden_layers=["0=0"], weights={"ce": 0.5})  # widths 4 vs 16: projected
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    loss, parts = d(x, labels=y)
    assert set(parts) == {"kl", "ce", "hidden"}
    expected = parts["kl"] + 0.5 * parts["ce"] + parts["hidden"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["ce"].item() == pytest.approx(nn.functional.cross_entropy(student(x), y).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="no labels"):
        d(x)
    # a module without weights has no width to read before it runs: a clear error when they differ
    with pytest.raises(ConfigError, match="without weights"):
        Distiller(student, teacher, hidden_layers=["1"])(x)


def test_a_bfloat16_teacher_runs_on_its_own_precision() -> None:
    teacher = models.tiny("llama").to(torch.bfloat16)
    student = models.tiny("llama").float()
    d = Distiller(student, teacher, hidden_layers=["model.layers.0"])
    loss, parts = d(_batch(pad=2))
    assert loss.dtype == torch.float32 and parts["kl"].item() < 1e-2  # the same weights, rounded
    plain_teacher = nn.Linear(4, 3).to(torch.bfloat16)
    out = Distiller(nn.Linear(4, 3), plain_teacher)(torch.randn(2, 4))  # float input cast for the teacher
    assert torch.isfinite(out[0])


def test_hugging_face_labels_use_the_models_own_shifted_loss() -> None:
    teacher, student = models.tiny("llama"), models.tiny("llama", seed=1)
    batch = {**_batch(), "labels": _batch()["input_ids"]}
    loss, parts = Distiller(student, teacher, weights={"kl": 0.0, "ce": 1.0})(batch)
    assert parts["ce"].item() == pytest.approx(student(**batch).loss.item(), rel=1e-5)
    assert set(parts) == {"ce"}
    alone = Distiller(student, None, weights={"kl": 0.0, "ce": 1.0})  # plain fine-tuning needs no teacher
    assert alone(batch)[1]["ce"].item() == pytest.approx(parts["ce"].item())
    with pytest.raises(ConfigError, match="a teacher is needed"):
        Distiller(student, None)


def test_attention_transfer_needs_eager_attention() -> None:
    teacher, student = models.tiny("llama"), models.tiny("llama", seed=1)
    d = Distiller(student, teacher, attention_layers=[0, (1, 1)], weights={"kl": 0.0})
    with pytest.raises(ConfigError, match="attn_implementation='eager'"):
        d(_batch())
    for m in (teacher, student):
        m.set_attn_implementation("eager")
    loss, parts = d(_batch(pad=3))
    loss.backward()
    assert parts["attention"].item() > 0 and next(student.parameters()).grad is not None
    same = Distiller(copy.deepcopy(teacher), teacher, attention_layers=[1], weights={"kl": 0.0})
    assert same(_batch(pad=3))[1]["attention"].abs().item() < 1e-6
    with pytest.raises(ConfigError, match="out of range"):
        Distiller(student, teacher, attention_layers=[5])(_batch())


def test_bad_settings_raise_config_error() -> None:
    teacher = models.tiny("llama")
    narrow = models.tiny("llama", hidden=32, heads=2, kv_heads=1)
    with pytest.raises(ConfigError, match=r"Distiller: hidden layer 'model.layers.9' is not a module of the student"):
        Distiller(narrow, teacher, hidden_layers=["model.layers.9"])
    with pytest.raises(ConfigError, match="is not a module of the teacher"):
        Distiller(narrow, teacher, hidden_layers=["model.layers.0=model.layer.0"])
    with pytest.raises(ConfigError, match=r"student width 32 differs from teacher width 64.*project=False"):
        Distiller(narrow, teacher, hidden_layers=["model.layers.0"], project=False)
    with pytest.raises(ConfigError, match=r"Distiller: temperature must be a finite number > 0 \(got 0\)"):
        Distiller(narrow, teacher, temperature=0)
    with pytest.raises(ConfigError, match="another model"):
        Distiller(teacher, teacher)
    with pytest.raises(ConfigError, match=r"weights\['kl'\] must be a finite number >= 0"):
        Distiller(narrow, teacher, weights={"kl": -1.0})
    with pytest.raises(ConfigError, match="weights keys"):
        Distiller(narrow, teacher, weights={"mse": 1.0})
    with pytest.raises(ConfigError, match="hidden_loss must be one of"):
        Distiller(narrow, teacher, hidden_loss="l2")
