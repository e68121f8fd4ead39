"""Gradual magnitude pruning inside a plain PyTorch training loop.

Run: python examples/gradual_pruning.py

A small MLP learns a synthetic classification task (labels from a fixed random "teacher"
network) while ``magnitude`` pruning follows Zhu & Gupta's cubic schedule from 0% to 90%
sparsity: ``PassManager.apply`` masks the model, ``pm.step`` after each optimizer step prunes a
little more, ``pm.finalize`` stores the pruned layers compressed. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import llmslim as ls
from llmslim.prune import Magnitude, masked_modules

STEPS, BATCH, FEATURES, CLASSES = 200, 64, 32, 8


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the weights the forward sees (masked or compressed)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear"]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def batch(teacher: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(BATCH, FEATURES, generator=generator)
    with torch.no_grad():
        return x, teacher(x).argmax(dim=-1)


def accuracy(model: nn.Module, teacher: nn.Module) -> float:
    x, y = batch(teacher, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float((model(x).argmax(dim=-1) == y).float().mean())


def main(steps: int = STEPS) -> dict[str, float]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(FEATURES, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    model = nn.Sequential(nn.Linear(FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    prune = Magnitude(
        sparsity=0.9, schedule={"kind": "cubic", "begin_step": steps // 6, "end_step": steps * 5 // 6, "frequency": 10},
        storage="compressed", value_dtype="float16",
    )
    pm = ls.PassManager([prune])
    ctx = ls.Context(progress=False)
    pm.apply(model, ctx)  # masks at the schedule's initial sparsity (0%)

    generator = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(1, steps + 1):
        x, y = batch(teacher, generator)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pm.step(model, ctx)  # after the optimizer step: re-zero pruned weights, prune more on schedule
        if step % (steps // 10) == 0:
            target = prune.sparsity_at(step)
            print(f"step {step:4d}  loss {loss.item():.4f}  sparsity {sparsity(model):.3f} (schedule {target:.3f})")

    masked = len(masked_modules(model))
    report = pm.finalize(model, ctx)  # masks baked; Linear layers become SparseLinear (fp16 values)
    print(report)
    result = {
        "loss": loss.item(),
        "sparsity": sparsity(model),
        "accuracy": accuracy(model, teacher),
        "layers": masked,
        "bytes_ratio": report.bytes_after / report.bytes_before,
    }
    print(f"final: sparsity {result['sparsity']:.3f}, accuracy {result['accuracy']:.3f}, "
          f"bytes {report.bytes_before:,} (masked, float32) -> {report.bytes_after:,} (compressed, float16 values)")
    return result


if __name__ == "__main__":
    main()
