"""The package surface: __all__, import cost, lazy heavy dependencies, measurement helpers."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

import llmslim as ls
from llmslim._measure import module_stats


def test_all_is_exactly_the_public_surface() -> None:
    import types

    public = {n for n in dir(ls) if not n.startswith("_") and not isinstance(getattr(ls, n), types.ModuleType)}
    public = (public | {"errors", "testing", "prune", "quant", "distill"}) - {"annotations", "Any"}
    assert set(ls.__all__) == public | {"__version__"}
    for name in ls.__all__:
        assert getattr(ls, name) is not None


def test_import_is_cheap_and_pulls_no_heavy_optional_dependency() -> None:
    code = (
        "import time, sys; import torch; t = time.perf_counter(); import llmslim; dt = time.perf_counter() - t; "
        "llmslim.available_passes(); "
        "print(dt, [m for m in ('transformers', 'matplotlib', 'hypothesis', 'safetensors') if m in sys.modules])"
    )
    # best of three: the figure is the import's cost, not the machine's noise
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1) for _ in range(3)]
    assert min(float(r[0]) for r in runs) < 0.3
    assert all(r[1].strip() == "[]" for r in runs)


def test_model_bytes_counts_true_storage_and_tied_weights_once() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.BatchNorm1d(4)})
    model.register_buffer("packed", torch.zeros(7, dtype=torch.uint8))
    model.register_buffer("halves", torch.zeros(3, dtype=torch.float16))
    # 40 tied floats + BN: weight, bias, running_mean, running_var (4 each, fp32) + num_batches (int64)
    assert ls.model_bytes(model) == 40 * 4 + 4 * 4 * 4 + 8 + 7 + 3 * 2


def test_module_stats_sees_the_masked_weight_and_packed_attributes() -> None:
    lin = nn.Linear(4, 4, bias=False)

    class Mask(nn.Module):
        def forward(self, w):
            return w * (torch.arange(16).view(4, 4) % 4 != 0)

    torch.nn.utils.parametrize.register_parametrization(lin, "weight", Mask())
    stats = module_stats(lin)
    assert stats.sparsity == 0.25 and stats.params == 16 and stats.bits == 32.0

    class Packed(nn.Module):
        weight_bits, weight_sparsity, logical_params = 4, 0.0, 64

        def __init__(self):
            super().__init__()
            self.register_buffer("q", torch.zeros(32, dtype=torch.uint8))

    assert module_stats(Packed()) == type(stats)(params=64, bytes=32, sparsity=0.0, bits=4.0)
