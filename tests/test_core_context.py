from __future__ import annotations

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim.errors import ConfigError


class Multi(nn.Module):
    def forward(self, x, y=None, *, scale=1.0):
        return (x if y is None else x + y) * scale


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (torch.ones(2), torch.ones(2)),
        ((torch.ones(2), torch.ones(2)), torch.full((2,), 2.0)),
        ([torch.ones(2), torch.ones(2)], torch.full((2,), 2.0)),
        ({"x": torch.ones(2), "scale": 3.0}, torch.full((2,), 3.0)),
    ],
)
def test_forward_adapter(batch, expected) -> None:
    assert torch.equal(ls.Context().run(Multi(), batch), expected)


def test_run_moves_nested_batches_to_the_device() -> None:
    seen = []
    ctx = ls.Context(device="cpu", forward=lambda m, b: seen.append(b) or 0)
    ctx.run(Multi(), {"a": [torch.ones(1), (torch.zeros(1),)], "b": 3})
    assert seen[0]["a"][0].device.type == "cpu" and seen[0]["b"] == 3


def test_custom_forward_and_iterables() -> None:
    ctx = ls.Context(calibration=(torch.ones(1) for _ in range(3)), forward=lambda m, b: m(b, b))
    assert len(ctx.calibration) == 3  # a generator is materialised once
    assert torch.equal(ctx.run(Multi(), torch.ones(1)), torch.full((1,), 2.0))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"calibration": torch.ones(3)}, "calibration must be a sequence of batches"),
        ({"calibration": 5}, "calibration must be a sequence"),
        ({"forward": 3}, "forward must be callable"),
        ({"teacher": "gpt2"}, "teacher must be an nn.Module"),
        ({"device": "warp-drive"}, "device must be a torch device"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ls.Context(**kwargs)


def test_cache_and_invalidate() -> None:
    ctx = ls.Context()
    calls = []
    for _ in range(2):
        ctx.analysis("a", lambda: calls.append(1) or len(calls))
        ctx.analysis("b", lambda: calls.append(1) or len(calls))
    assert len(calls) == 2
    ctx.invalidate("a")
    assert ctx.analysis("a", lambda: 99) == 99 and ctx.analysis("b", lambda: 0) == 2
    ctx.invalidate()
    assert ctx.analysis("b", lambda: 7) == 7


def test_progress_can_be_turned_off(monkeypatch) -> None:
    assert not ls.Context(progress=False).progress
    monkeypatch.setenv("LLMSLIM_PROGRESS", "0")
    assert not ls.Context(progress=True).progress
    assert list(ls.Context().progress_bar([1, 2], desc="x")) == [1, 2]
    monkeypatch.setenv("LLMSLIM_PROGRESS", "1")
    assert list(ls.Context().progress_bar([1, 2], desc="x")) == [1, 2]
