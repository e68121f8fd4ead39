"""Small models shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """An MLP with a conv front, a norm, a tied-free head: enough kinds for targeting and rollback."""

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1 = nn.Linear(2 * 4 * 4, width)
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(1)
        return self.head(torch.relu(self.fc2(self.norm(self.fc1(h)))))


def batch(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Every state tensor with its owner's class: equal snapshots mean a bit-identical model."""
    owners = {name: type(m).__name__ for name, m in model.named_modules()}
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        out[key] = (owners.get(owner, "?"), t.detach().clone())
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][0] == b[k][0] and a[k][1].dtype == b[k][1].dtype and a[k][1].shape == b[k][1].shape
        and torch.equal(a[k][1].view(torch.uint8) if a[k][1].numel() else a[k][1], b[k][1].view(torch.uint8) if b[k][1].numel() else b[k][1])
        for k in a
    )
