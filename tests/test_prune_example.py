"""examples/gradual_pruning.py runs and prunes gradually inside its training loop."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gradual_pruning.py"


def test_gradual_pruning_example_trains_prunes_to_90_percent_and_compresses(capsys: pytest.CaptureFixture[str]) -> None:
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main()
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("step")]
    assert len(progress) == 10
    sparsities = [float(line.split("sparsity ")[1].split()[0]) for line in progress]
    assert sparsities == sorted(sparsities) and sparsities[0] == 0.0  # gradual, never falls
    assert result["sparsity"] >= 0.9 - 1e-3 and result["layers"] == 3
    assert result["accuracy"] > 0.5  # 8 classes: chance is 0.125
    assert result["bytes_ratio"] < 0.15
    assert "SparseLinear" in out and out.rstrip().splitlines()[-1].startswith("final: sparsity 0.900")
