"""Importance hooks of structured pruning: first-order Taylor (sum of |gradient x weight| over a group)
and magnitudes read through the logical [out, in] matrix (GPT-2's transposed Conv1D)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmslim as ls
from llmslim import models
from llmslim.prune.structured import calibration_loss, channel_groups, decoder, trace
from llmslim.prune.structured._importance import group_scores


def _net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def test_taylor_sums_each_entrys_first_order_change_of_the_loss() -> None:
    model = _net()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(3)]
    ctx = ls.Context(calibration=batches, forward=lambda m, b: F.mse_loss(m(b[0]), b[1]))  # a forward returning the loss
    groups = trace(model).spaces[0].groups()
    scores = group_scores("taylor", groups, model, ctx, "test")

    def slope(param: torch.Tensor, index: tuple[int, ...]) -> float:  # d mean loss / d alpha, the entry scaled by (1 + alpha)
        eps, values = 1e-6, []
        with torch.no_grad():
            kept = float(param[index])
            for alpha in (eps, -eps):
                param[index] = kept * (1 + alpha)
                values.append(sum(float(ctx.forward(model, b)) for b in batches) / len(batches))
            param[index] = kept
        return (values[0] - values[1]) / (2 * eps)  # = g * w of that entry

    for group, score in zip(groups, scores):
        entries = []
        for s in group.slices:
            m = model.get_submodule(s.module)
            for i in range(s.start, s.stop):
                if s.dim == 0:
                    entries += [(m.weight, (i, j)) for j in range(m.weight.shape[1])] + [(m.bias, (i,))]
                else:
                    entries += [(m.weight, (j, i)) for j in range(m.weight.shape[0])]
        slopes = [slope(p, index) for p, index in entries]
        assert float(score) == pytest.approx(sum(abs(v) for v in slopes), rel=1e-6, abs=1e-12)
    assert not any(p.grad is not None for p in model.parameters())  # .grad fields untouched


@pytest.mark.hf
def test_taylor_reads_gpt2_conv1d_through_its_transpose() -> None:
    model = models.tiny("gpt2", layers=1, hidden=32, intermediate=16)
    batch = {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))}
    dec = decoder(model)
    scores = group_scores("taylor", channel_groups(dec, 0), model, ls.Context(calibration=[batch]), "test")
    loss = model(**batch, labels=batch["input_ids"]).loss  # the next-token loss calibration_loss uses
    loss.backward()
    fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj  # weights stored [in, out]
    manual = (fc.weight.grad * fc.weight).abs().sum(0) + (fc.bias.grad * fc.bias).abs() + (proj.weight.grad * proj.weight).abs().sum(1)
    torch.testing.assert_close(scores.float(), manual.detach(), rtol=1e-4, atol=1e-7)
    l2 = group_scores("l2", channel_groups(dec, 0), model, ls.Context(), "test")
    torch.testing.assert_close(l2.float(), (fc.weight.square().sum(0) + proj.weight.square().sum(1)).sqrt().detach())


@pytest.mark.hf
def test_calibration_loss_per_kind_of_model() -> None:
    llama = models.tiny("llama")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = llama(input_ids=ids, attention_mask=mask)
    logits, target = out.logits[:, :-1], ids[:, 1:]
    keep = mask[:, 1:].bool()
    expected = F.cross_entropy(logits[keep], target[keep])  # padding positions left out
    torch.testing.assert_close(calibration_loss(llama, {"input_ids": ids, "attention_mask": mask}, out), expected)
    bert = models.tiny("bert")
    hidden = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(calibration_loss(bert, {"input_ids": ids}, bert(input_ids=ids)), 0.5 * hidden.square().mean())
    scalar = torch.tensor(2.5)
    assert calibration_loss(bert, {}, scalar) is scalar
