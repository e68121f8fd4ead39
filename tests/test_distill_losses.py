"""Distillation losses: hand-computed values, zero for identical inputs, padding excluded, the
chunked and top-k forms agreeing with the full KL, bad settings rejected."""

from __future__ import annotations

import math

import pytest
import torch

from llmslim.distill import AttentionLoss, HiddenLoss, LogitKL, kl_rows
from llmslim.distill._kl import _log1mexp
from llmslim.errors import ConfigError


def _logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_kl_equals_a_hand_computed_value() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[0.0, math.log(3.0)]])
    # p = (1/4, 3/4), q = (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert LogitKL()(s, t).item() == pytest.approx(expected, rel=1e-5)
    # T = 2: p = softmax(0, ln(3)/2) = (1, sqrt 3) / (1 + sqrt 3), q uniform; times T^2
    p = torch.tensor([1.0, math.sqrt(3.0)]) / (1.0 + math.sqrt(3.0))
    expected_t2 = 4.0 * float((p * (p / 0.5).log()).sum())
    assert LogitKL(temperature=2.0)(s, t).item() == pytest.approx(expected_t2, rel=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"chunk_size": 7}, {"top_k": 5}, {"temperature": 3.0}])
def test_kl_is_zero_for_identical_logits(kwargs) -> None:
    x = _logits(3, 4, 50)
    assert abs(LogitKL(**kwargs)(x, x.clone()).item()) < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_vocabulary_chunks_give_the_full_kl_and_its_gradient(temperature: float) -> None:
    t = _logits(6, 37, seed=1)
    s1 = _logits(6, 37, seed=2).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    full = LogitKL(temperature)(s1, t)
    chunked = LogitKL(temperature, chunk_size=8)(s2, t)
    full.backward()
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)


def test_top_k_covering_the_vocabulary_is_the_full_kl_and_smaller_k_stays_finite() -> None:
    t, s = _logits(5, 20, seed=3), _logits(5, 20, seed=4).requires_grad_()
    full = kl_rows(s, t, 1.5)
    torch.testing.assert_close(kl_rows(s, t, 1.5, top_k=20), full, rtol=1e-4, atol=1e-6)
    small = LogitKL(1.5, top_k=3)(s, t)
    small.backward()
    assert torch.isfinite(small) and small.item() >= 0 and torch.isfinite(s.grad).all()
    # the teacher's top token certain: the rest bucket is empty and the loss stays finite
    sure = torch.full((1, 20), -1e4)
    sure[0, 0] = 0.0
    assert torch.isfinite(LogitKL(top_k=2)(s[:1], sure))
    # the rest bucket's log(1 - exp(x)) near x = 0, where float32 exp(x) rounds to 1: finite gradients
    x = torch.tensor([-1e-9, -1e-10, -1e-3, -0.5, -5.0], requires_grad=True)
    _log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # extreme logits on both sides (all the mass in the top k): finite value and gradient
    for scale in (1e3, 1e5):
        big = (_logits(4, 20, seed=9) * scale).requires_grad_()
        loss = LogitKL(0.5, top_k=3)(big, _logits(4, 20, seed=10) * scale)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


def test_padding_positions_are_excluded() -> None:
    t, s = _logits(2, 5, 11, seed=5), _logits(2, 5, 11, seed=6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    base = LogitKL()(s, t, mask)
    s2 = s.clone()
    s2[0, 3:] = 1e3  # garbage where the mask is 0
    assert LogitKL()(s2, t, mask).item() == pytest.approx(base.item())
    assert LogitKL(chunk_size=4)(s2, t, mask).item() == pytest.approx(base.item(), rel=1e-5)
    valid = torch.cat([s[0, :3], s[1]]), torch.cat([t[0, :3], t[1]])
    assert base.item() == pytest.approx(LogitKL()(*valid).item(), rel=1e-6)
    for loss in (HiddenLoss("mse"), HiddenLoss("cosine")):
        assert loss(s2, t, mask).item() == pytest.approx(loss(s, t, mask).item(), rel=1e-6)


def test_hidden_losses_by_hand_and_projection() -> None:
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    t = torch.tensor([[[0.0, 1.0], [0.0, 4.0]]])
    assert HiddenLoss("mse")(s, t).item() == pytest.approx(((1 + 1) / 2 + (0 + 4) / 2) / 2)
    assert HiddenLoss("cosine")(s, t).item() == pytest.approx((1.0 + 0.0) / 2)
    loss = HiddenLoss("mse", student_width=2, teacher_width=3)
    assert loss.proj is not None and tuple(loss.proj.weight.shape) == (3, 2)
    value = loss(s, torch.zeros(1, 2, 3))
    value.backward()
    assert loss.proj.weight.grad is not None
    with pytest.raises(ConfigError, match=r"student width 2 differs from teacher width 3 .*project=False"):
        HiddenLoss("mse", student_width=2, teacher_width=3, project=False)
    with pytest.raises(ConfigError, match="kind must be one of"):
        HiddenLoss("l1")  # type: ignore[arg-type]


def test_attention_loss_compares_rows_and_skips_padded_queries() -> None:
    a = torch.softmax(_logits(1, 2, 4, 4, seed=7), -1)
    b = torch.softmax(_logits(1, 2, 4, 4, seed=8), -1)
    expected = (b * (b.log() - a.log())).sum(-1).mean()
    assert AttentionLoss()(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0]])
    a2 = a.clone()
    a2[:, :, 2:] = torch.softmax(torch.randn(1, 2, 2, 4), -1)
    assert AttentionLoss()(a2, b, mask).item() == pytest.approx(AttentionLoss()(a, b, mask).item())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, r"temperature must be a finite number > 0 \(got 0.0\)"),
        ({"temperature": -1.0}, r"temperature must be a finite number > 0 \(got -1.0\)"),
        ({"temperature": float("nan")}, r"temperature must be a finite number > 0 \(got nan\)"),
        ({"top_k": 0}, r"top_k must be None or an integer >= 1 \(got 0\)"),
        ({"chunk_size": 2.5}, r"chunk_size must be None or an integer >= 1 \(got 2.5\)"),
        ({"top_k": 2, "chunk_size": 4}, "not both"),
    ],
)
def test_bad_logit_settings_raise_config_error(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        LogitKL(**kwargs)


def test_mismatched_logits_are_an_error() -> None:
    with pytest.raises(ConfigError, match="one shape"):
        LogitKL()(torch.zeros(2, 5), torch.zeros(2, 6))
