"""examples/distill_training.py runs: the Distiller loop brings a narrower student closer to its
teacher, and prune -> QAT -> distill beats the same chain without training."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from llmslim.testing._models import has_transformers

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distill_training.py"


@pytest.mark.skipif(not has_transformers(), reason="needs transformers")
def test_distill_example_trains_and_heals(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster
    try:
        result = runpy.run_path(str(EXAMPLE))["main"](steps=40)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("step")]) == 5
    assert result["kl_after"] < 0.8 * result["kl_before"]
    assert result["kl_distilled"] < 0.8 * result["kl_without_training"]
    assert result["layer_kinds"] == ["SparseQuantLinear"] and result["bytes_ratio"] < 0.35
