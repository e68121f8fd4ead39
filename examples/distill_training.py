"""Distillation two ways: the ``Distiller`` inside a plain PyTorch loop, and prune -> quantization-
aware training -> distill as one ``compress_`` call.

Run: python examples/distill_training.py

Tiny LLaMA models (``llmslim.models.tiny``) read Python's documentation byte by byte (ASCII
fits their 128-token vocabulary): training windows from the first 55% of the text, scoring windows
from the rest.

1. A narrower student (32 features instead of 64, one layer instead of two) learns from the
   teacher's logits and from its first layer's hidden states, through a learned 32 -> 64
   projection that trains with it (``distiller.trainable_parameters()``).
2. A copy of the teacher is pruned 50% with Wanda, fake-quantized to int4 (``qat``), trained
   towards the model as it was before the first pass (the manager keeps it, in bfloat16 on the
   CPU) and finalized to sparse int4 layers; beside it, the same chain without the training.

Takes a few seconds on a CPU.
"""

from __future__ import annotations

import copy

import torch

import llmslim as ls
from llmslim import data, evaluate, models
from llmslim.distill import Distill, Distiller
from llmslim.prune import Wanda
from llmslim.quant import QAT

SEQ, BATCH = 64, 8


def byte_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """Python's docs as byte ids below 128: (training part, scoring part)."""
    ids = torch.tensor(list(data.docs_text()[:200_000].encode("ascii", "replace")), dtype=torch.long)
    cut = int(data.CALIBRATION_FRACTION * len(ids))
    return ids[:cut], ids[cut:]


def batches(ids: torch.Tensor, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``BATCH`` random windows of ``SEQ`` tokens."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - SEQ, (n, BATCH), generator=g)
    return [{"input_ids": torch.stack([ids[s : s + SEQ] for s in row.tolist()])} for row in starts]


def kl(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> float:
    return evaluate.kl_divergence(model, teacher, ids, seq_len=SEQ, max_windows=32, progress=False)


def train_with_distiller(teacher: torch.nn.Module, train: torch.Tensor, score: torch.Tensor, steps: int) -> dict[str, float]:
    student = models.tiny("llama", hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, seed=1)
    distiller = Distiller(student, teacher, temperature=2.0,
                          hidden_layers=["model.layers.0"], weights={"kl": 1.0, "hidden": 0.5})
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=3e-3)
    before = kl(student, teacher, score)
    student.train()
    for step, batch in enumerate(batches(train, steps, seed=0), 1):
        loss, parts = distiller(batch)  # the teacher runs under no_grad, in eval mode
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % (steps // 5) == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in parts.items()))
    student.eval()
    return {"kl_before": before, "kl_after": kl(student, teacher, score)}


def prune_quantize_distill(teacher: torch.nn.Module, train: torch.Tensor, score: torch.Tensor, steps: int) -> dict[str, float]:
    layers = ("model.layers.*",)  # decoder blocks; the embedding and LM head stay float
    calibration = batches(train, 4, seed=1)
    chain = [Wanda(sparsity=0.5, targets=layers), QAT(bits=4, group_size=32, targets=layers, storage="sparse")]
    plain = copy.deepcopy(teacher)
    ls.compress_(plain, *chain, calibration=calibration, progress=False)
    model = copy.deepcopy(teacher)
    report = ls.compress_(
        model, *copy.deepcopy(chain), Distill(steps=steps, lr=2e-3, batch_size=1, data=batches(train, 16, seed=2)),
        calibration=calibration, progress=False,
    )
    print(report.children[2].notes[1])  # the loss on the first step's batches, before and after
    kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "bits")})
    print(f"decoder layers: {kinds}; model bytes {report.bytes_before:,} -> {report.bytes_after:,}")
    return {"kl_without_training": kl(plain, teacher, score), "kl_distilled": kl(model, teacher, score),
            "bytes_ratio": report.bytes_after / report.bytes_before, "layer_kinds": kinds}


def main(steps: int = 60) -> dict[str, object]:
    torch.manual_seed(0)
    train, score = byte_tokens()
    teacher = models.tiny("llama", initializer_range=0.1)  # stands in for a trained model
    result: dict[str, object] = dict(train_with_distiller(teacher, train, score, steps))
    print(f"distiller loop: KL to the teacher {result['kl_before']:.4f} -> {result['kl_after']:.4f}")
    result.update(prune_quantize_distill(teacher, train, score, steps // 2))
    print(f"wanda 50% + int4: KL to the original {result['kl_without_training']:.4f} without training, "
          f"{result['kl_distilled']:.4f} after distill")
    return result


if __name__ == "__main__":
    main()
