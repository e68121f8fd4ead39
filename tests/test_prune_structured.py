"""Structured pruning (issue 9): channels, heads and layers of LLaMA-family decoders really removed,
generation with a KV cache, exact removal of chosen units, checkpoints of smaller shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim import hf, models
from llmslim.errors import ConfigError, OrderError, TargetError
from llmslim.prune import Channels, Heads, Layers
from llmslim.prune.structured import _importance, decoder, register_importance

pytestmark = pytest.mark.hf

ARCHS = ("llama", "qwen2", "mistral")
DIMS = dict(layers=3, heads=4, kv_heads=2, intermediate=32, hidden=32)


def _tiny(arch: str, seed: int = 0):
    return models.tiny(arch, seed=seed, **DIMS)


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 10), generator=g)} for _ in range(n)]


IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))

PASSES = {
    "channels": lambda: Channels(ratio=0.25),
    "channels-global-activation": lambda: Channels(ratio=0.4, scope="global", importance="activation", round_to=4),
    "heads": lambda: Heads(ratio=0.5),
    "heads-kv": lambda: Heads(ratio=0.5, unit="kv", importance="activation"),
    "layers": lambda: Layers(n=1),
    "layers-last": lambda: Layers(n=2, importance="last"),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("which", list(PASSES))
def test_pruned_model_runs_and_generates_with_a_kv_cache(arch: str, which: str) -> None:
    model = _tiny(arch)
    before = sum(p.numel() for p in model.parameters())
    report = ls.compress_(model, PASSES[which](), calibration=_batches(), progress=False)
    assert sum(p.numel() for p in model.parameters()) < before
    assert report.children[0].params_after < report.children[0].params_before
    assert model(IDS).logits.shape == (1, 6, 128)
    cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)  # the cache (layer_idx, head counts) agrees with full recomputation
    cfg, dec = model.config, decoder(model)
    assert cfg.num_hidden_layers == len(dec.blocks)
    nq, nkv, d = dec.heads(0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen2 derives it
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, head_dim) == (nq, nkv, d)
    widths = {dec.mlp(i)[1].down_proj.in_features for i in range(len(dec.blocks))}
    assert cfg.intermediate_size == max(widths)


@pytest.fixture
def chosen_importance():
    """A custom importance hook: every unit scores 0 except the chosen ones, which score -1."""
    chosen: set[tuple[int, int]] = set()

    def score(groups, model, ctx):
        return torch.tensor([-1.0 if (g.layer, g.index) in chosen else 0.0 for g in groups])

    register_importance("test-chosen", score)
    yield chosen
    del _importance._REGISTRY["test-chosen"]


@settings(max_examples=8, deadline=None)
@given(picks=st.lists(st.sets(st.integers(0, 31), min_size=8, max_size=8), min_size=3, max_size=3))
def test_channels_remove_exactly_the_chosen_set(picks: list[set[int]]) -> None:
    register_importance("test-chosen-ch", lambda groups, model, ctx: torch.tensor(
        [-1.0 if g.index in picks[g.layer] else 0.0 for g in groups]))
    model = _tiny("llama")
    try:
        report = ls.compress_(model, Channels(ratio=0.25, importance="test-chosen-ch"), progress=False)
    finally:
        del _importance._REGISTRY["test-chosen-ch"]
    assert [set(r.info["removed"]) for r in report.children[0].rows] == picks
    assert all(len(r.info["scores"]) == 32 for r in report.children[0].rows)


def test_heads_and_layers_remove_exactly_the_chosen_set(chosen_importance: set[tuple[int, int]]) -> None:
    chosen_importance.update({(0, 1), (0, 2), (1, 0), (1, 3), (2, 1), (2, 3)})  # one query head per kv group
    model = _tiny("qwen2")
    report = ls.compress_(model, Heads(ratio=0.5, importance="test-chosen"), progress=False)
    assert [r.info["removed"] for r in report.children[0].rows] == [[1, 2], [0, 3], [1, 3]]
    chosen_importance.clear()
    chosen_importance.update({(1, 1)})
    model = _tiny("mistral")
    report = ls.compress_(model, Layers(n=1, importance="test-chosen"), progress=False)
    assert report.children[0].rows[0].info["removed"] == [1]
    assert report.children[0].rows[0].module == "model.layers"


def test_kv_groups_go_with_their_query_heads(chosen_importance: set[tuple[int, int]]) -> None:
    chosen_importance.update({(0, 1), (1, 0), (2, 1)})
    model = _tiny("llama")
    reference = _tiny("llama")
    ls.compress_(model, Heads(ratio=0.5, unit="kv", importance="test-chosen"), progress=False)
    attn, ref = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    d = attn.head_dim
    assert torch.equal(attn.k_proj.weight, ref.k_proj.weight[:d])  # kv group 0 kept, 1 gone
    assert torch.equal(attn.q_proj.weight, ref.q_proj.weight[: 2 * d])  # with query heads 0 and 1
    assert torch.equal(attn.o_proj.weight, ref.o_proj.weight[:, : 2 * d])
    assert attn.num_key_value_groups == 2


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(ARCHS), zeroed=st.sets(st.integers(0, 31), min_size=1, max_size=16))
def test_removing_all_zero_channels_leaves_outputs_unchanged(arch: str, zeroed: set[int]) -> None:
    model = _tiny(arch)
    idx = torch.tensor(sorted(zeroed))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[idx] = 0
            layer.mlp.up_proj.weight[idx] = 0
            layer.mlp.down_proj.weight[:, idx] = 0
        expected = model(IDS).logits
    ratio = len(zeroed) / 32
    ls.compress_(model, Channels(ratio=ratio, importance="l1"), progress=False)
    assert all(layer.mlp.down_proj.in_features == 32 - len(zeroed) for layer in model.model.layers)
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_removing_all_zero_heads_leaves_outputs_unchanged() -> None:
    model = _tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            attn, d = layer.self_attn, layer.self_attn.head_dim
            for h in (0, 3):  # one query head in each kv group
                attn.q_proj.weight[h * d:(h + 1) * d] = 0
                attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        expected = model(IDS).logits
    report = ls.compress_(model, Heads(ratio=0.5, importance="l1"), progress=False)
    assert [r.info["removed"] for r in report.children[0].rows] == [[0, 3]] * 3
    torch.testing.assert_close(model(IDS).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_of_a_structurally_pruned_model(arch: str, tmp_path) -> None:
    model = _tiny(arch)
    passes = [Channels(ratio=0.4, scope="global", round_to=2), Heads(ratio=0.5), Layers(n=1)]
    ls.compress_(model, *passes, calibration=_batches(1), progress=False)
    expected = model(IDS).logits
    ls.save(model, tmp_path / "plain")
    # into a model built from the original config: blocks cut, Linear shapes and config replayed
    with torch.device("meta"):
        skeleton = _tiny(arch, seed=3)
    loaded = ls.load(tmp_path / "plain", skeleton)
    assert torch.equal(loaded(IDS).logits, expected)
    assert loaded.config.num_hidden_layers == 2 and loaded.config.num_attention_heads == 2
    assert torch.equal(loaded.generate(IDS, max_new_tokens=4, do_sample=False),
                       model.generate(IDS, max_new_tokens=4, do_sample=False))
    # through the Hugging Face folder: the saved config already says 2 blocks, 2 heads
    hf.save_pretrained(model, None, tmp_path / "hf")
    again = hf.from_pretrained(tmp_path / "hf")
    assert torch.equal(again(IDS).logits, expected)
    assert ls.io.read_manifest(tmp_path / "hf")["structure"]["layers"]["model.layers"]["of"] == 3


def test_structure_then_quantization_round_trips(tmp_path) -> None:
    model = _tiny("llama")
    ls.compress_(model, Channels(ratio=0.5), ls.quant.RTN(bits=8, group_size=16), progress=False)
    expected = model(IDS).logits
    ls.save(model, tmp_path / "c")
    loaded = ls.load(tmp_path / "c", _tiny("llama", seed=4))
    assert torch.equal(loaded(IDS).logits, expected)


def test_unsupported_models_and_orders_are_refused() -> None:
    for arch in ("gpt2", "opt", "bert"):
        with pytest.raises(TargetError, match="LLaMA-family"):
            Channels().select(models.tiny(arch))
    with pytest.raises(TargetError, match="needs more than 2 blocks"):
        Layers(n=2).select(models.tiny("llama", layers=2))
    with pytest.raises(OrderError):
        ls.compress_(_tiny("llama"), ls.quant.RTN(bits=8, group_size=16), Channels(), progress=False)
    with pytest.raises(ConfigError, match="importance must be"):
        Channels(importance="influence")
    with pytest.raises(ConfigError, match="ratio must be"):
        Heads(ratio=1.0)
    assert Layers().requires == {"calibration"} and Channels().requires == frozenset()


def test_report_rows_carry_sizes_removed_units_and_scores() -> None:
    model = _tiny("llama")
    report = ls.compress_(model, Channels(ratio=0.5, importance="l2"), progress=False).children[0]
    row = report.rows[0]
    assert row.module == "model.layers.0.mlp" and row.kind == "LlamaMLP"
    assert row.params_after < row.params_before and row.bytes_after < row.bytes_before
    assert len(row.info["removed"]) == 16 and len(row.info["scores"]) == 32
    assert (row.info["width_before"], row.info["width_after"]) == (32, 16)
