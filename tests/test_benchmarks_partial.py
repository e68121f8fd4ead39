"""Partial benchmark runs (``--only``) join existing results only when scored the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import prune_quality  # noqa: E402


def _never(*args, **kwargs):
    raise AssertionError("the model was loaded before the settings were checked")


@pytest.mark.parametrize(("argv", "said"), [
    (["--only", "sparsegpt-50"], "windows 16 (this run: 32)"),
    (["--only", "sparsegpt-50", "--windows", "8"], "windows 16 (this run: 8)"),
])
def test_prune_quality_refuses_to_merge_rows_scored_on_other_windows(monkeypatch, capsys, argv, said) -> None:
    existing = {"settings": {"windows": 16, "seq_len": 512, "protocol": "default"}, "results": {"dense_perplexity": 14.8}}
    monkeypatch.setattr(prune_quality, "_existing", lambda quick: existing)
    monkeypatch.setattr(prune_quality.models, "load_smollm2", _never)
    monkeypatch.setattr(sys, "argv", ["prune_quality.py", *argv])
    with pytest.raises(SystemExit):
        prune_quality.main()
    err = capsys.readouterr().err
    assert said in err and "--windows 16" in err
