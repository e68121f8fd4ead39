"""Quantization-aware training (QAT) inside a plain PyTorch training loop.

Run: python examples/qat_training.py

A small MLP first learns a synthetic regression task in float32 (targets from a fixed random
"teacher" network). Rounding it to 3-bit weights (``rtn``) costs accuracy; ``qat`` recovers it:
``PassManager.apply`` puts fake quantization on every layer's weight (every forward sees the
3-bit weight, the gradient passes straight through to the float weight), the loop trains as
usual with any optimizer, and ``pm.finalize`` packs the layers into ``QuantLinear`` modules that
compute exactly what the last training forward computed. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import llmslim as ls
from llmslim.quant import QAT, RTN, QuantLinear

STEPS, BATCH, FEATURES = 150, 128, 32
GRID = dict(bits=2, group_size=32, symmetric=False)


def batch(teacher: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, FEATURES, generator=generator)
    with torch.no_grad():
        return x, teacher(x)


def evaluate(model: nn.Module, teacher: nn.Module) -> float:
    """Mean squared error on a fixed held-out batch."""
    x, y = batch(teacher, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def train(model: nn.Module, teacher: nn.Module, steps: int, lr: float, pm: ls.PassManager | None = None,
          ctx: ls.Context | None = None) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    loss = torch.tensor(0.0)
    for step in range(1, steps + 1):
        x, y = batch(teacher, generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if pm is not None:
            pm.step(model, ctx)  # QAT's step has nothing to update; the call keeps the loop generic
        if pm is not None and step % (steps // 5) == 0:
            print(f"qat step {step:4d}  loss {loss.item():.4f}")
    return loss.item()


def main(steps: int = STEPS) -> dict[str, float]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, 8))
    model = nn.Sequential(nn.Linear(FEATURES, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))
    train(model, teacher, steps * 2, lr=3e-3)  # the float model we start from
    result = {"float": evaluate(model, teacher)}

    rounded = copy.deepcopy(model)
    ls.compress_(rounded, RTN(**GRID), progress=False)  # post-training rounding, no training
    result["rtn"] = evaluate(rounded, teacher)

    pm = ls.PassManager([QAT(**GRID)])
    ctx = ls.Context(progress=False)
    pm.apply(model, ctx)  # fake quantization on every Linear's weight
    result["qat_start"] = evaluate(model, teacher)
    train(model, teacher, steps, lr=1e-3, pm=pm, ctx=ctx)
    result["qat_fake"] = evaluate(model, teacher)
    report = pm.finalize(model, ctx)  # Linear -> QuantLinear, the codes of the last forward
    print(report)
    result["qat"] = evaluate(model, teacher)
    result["layers"] = sum(isinstance(m, QuantLinear) for m in model.modules())
    result["bytes_ratio"] = report.bytes_after / report.bytes_before
    print(f"held-out MSE: float32 {result['float']:.4f}, rtn {GRID['bits']}-bit {result['rtn']:.4f}, "
          f"qat {GRID['bits']}-bit {result['qat']:.4f} (packed; {result['qat_fake']:.4f} fake-quantized)")
    return result


if __name__ == "__main__":
    main()
