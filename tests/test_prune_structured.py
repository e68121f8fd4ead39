"""Structured pruning (issue 9) of every tiny Hugging Face architecture: channels, heads and layers
really removed, generation with a KV cache, exact removal of chosen units, outputs unchanged when
the removed units were zero, checkpoints of smaller shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmslim as ls
from llmslim import hf, models
from llmslim.errors import ConfigError, OrderError, TargetError, TraceError
from llmslim.prune import Channels, Heads, Layers
from llmslim.prune.structured import _importance, channel_groups, decoder, head_groups, kv_groups, register_importance, sliceable

pytestmark = pytest.mark.hf

ARCHS = models.ARCHITECTURES  # llama, qwen2, mistral, gpt2, opt, bert
DECODERS = tuple(a for a in ARCHS if a != "bert")  # bert is an encoder: forward, no generate
DIMS = dict(layers=3, heads=4, kv_heads=2, intermediate=32, hidden=32)


def _tiny(arch: str, seed: int = 0):
    return models.tiny(arch, seed=seed, **DIMS)


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 10), generator=g)} for _ in range(n)]


IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))


def _out(model) -> torch.Tensor:
    return model(input_ids=IDS)[0]  # logits, or BERT's last hidden state


def _matrix(model, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    return sliceable(m).matrix(m, m.weight)  # the logical [out, in] weight (GPT-2's Conv1D transposed)


def _zero_(model, groups) -> None:
    with torch.no_grad():
        for g in groups:
            for s in g.slices:
                w = _matrix(model, s.module)
                (w[s.start:s.stop] if s.dim == 0 else w[:, s.start:s.stop]).zero_()


def _query_units(dec, i: int):
    """Units ``Heads(unit="query")`` scores: query heads (grouped attention) or whole heads with k/v (plain MHA)."""
    nq, nkv, _ = dec.heads(i)
    return kv_groups(dec, i) if nq == nkv else head_groups(dec, i)


PASSES = {
    "channels": lambda: Channels(ratio=0.25),
    "heads": lambda: Heads(ratio=0.5),
    "layers": lambda: Layers(n=1),
    "channels-global-activation": lambda: Channels(ratio=0.4, scope="global", importance="activation", round_to=4),
    "channels-taylor": lambda: Channels(ratio=0.25, importance="taylor"),
    "heads-kv-activation": lambda: Heads(ratio=0.5, unit="kv", importance="activation"),
    "heads-taylor": lambda: Heads(ratio=0.5, importance="taylor"),
    "layers-last": lambda: Layers(n=2, importance="last"),
    "layers-taylor": lambda: Layers(n=1, importance="taylor"),
}
CASES = [(a, w) for a in ARCHS for w in ("channels", "heads", "layers")] + [
    ("qwen2", "channels-global-activation"), ("gpt2", "channels-global-activation"), ("bert", "channels-taylor"),
    ("opt", "channels-taylor"), ("llama", "heads-kv-activation"), ("gpt2", "heads-taylor"), ("bert", "heads-kv-activation"),
    ("mistral", "layers-last"), ("opt", "layers-taylor"), ("bert", "layers-last"),
]


@pytest.mark.parametrize(("arch", "which"), CASES)
def test_pruned_model_runs_and_generates_with_a_kv_cache(arch: str, which: str) -> None:
    model = _tiny(arch)
    before = sum(p.numel() for p in model.parameters())
    report = ls.compress_(model, PASSES[which](), calibration=_batches(), progress=False)
    assert sum(p.numel() for p in model.parameters()) < before
    assert report.children[0].params_after < report.children[0].params_before
    assert _out(model).shape[:2] == (1, 6)
    if arch in DECODERS:
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(cached, plain)  # the cache (layer_idx, head counts) agrees with full recomputation
    cfg, dec = model.config, decoder(model)
    assert cfg.num_hidden_layers == len(dec.blocks)
    counts = [dec.heads(i)[:2] for i in range(len(dec.blocks))]
    if dec.layout.config_heads:  # LLaMA family: the config states the pruned counts (head_dim pinned)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert {(cfg.num_attention_heads, cfg.num_key_value_heads)} == set(counts) and head_dim == dec.heads(0)[2]
    elif "heads" in which:  # OPT, GPT-2, BERT derive head_dim from the count: per-layer lists instead
        assert cfg.num_attention_heads == 4 and cfg.num_attention_heads_per_layer == [c[0] for c in counts]
    widths = [dec.mlp_width(i) for i in range(len(dec.blocks))]
    assert getattr(cfg, dec.layout.config_mlp) == max(widths)
    assert getattr(cfg, "intermediate_size_per_layer", None) in (None, widths)


@pytest.fixture
def chosen_importance():
    """A custom importance hook: every unit scores 0 except the chosen (layer, index) ones, which score -1."""
    chosen: set[tuple[int, int]] = set()

    def score(groups, model, ctx):
        return torch.tensor([-1.0 if (g.layer, g.index) in chosen else 0.0 for g in groups])

    register_importance("test-chosen", score)
    yield chosen
    del _importance._REGISTRY["test-chosen"]


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(ARCHS), picks=st.lists(st.sets(st.integers(0, 31), min_size=8, max_size=8), min_size=3, max_size=3))
def test_channels_remove_exactly_the_chosen_set(arch: str, picks: list[set[int]]) -> None:
    register_importance("test-chosen-ch", lambda groups, model, ctx: torch.tensor(
        [-1.0 if g.index in picks[g.layer] else 0.0 for g in groups]))
    model, reference = _tiny(arch), _tiny(arch)
    try:
        report = ls.compress_(model, Channels(ratio=0.25, importance="test-chosen-ch"), progress=False)
    finally:
        del _importance._REGISTRY["test-chosen-ch"]
    assert [set(r.info["removed"]) for r in report.children[0].rows] == picks
    assert all(len(r.info["scores"]) == 32 for r in report.children[0].rows)
    dec = decoder(model)
    for i, pick in enumerate(picks):  # the kept slices are the original ones, in order
        keep = [j for j in range(32) if j not in pick]
        for rel in dec.layout.mlp_in:
            assert torch.equal(_matrix(model, dec.name(i, rel)), _matrix(reference, dec.name(i, rel))[keep])
        for rel in dec.layout.mlp_out:
            assert torch.equal(_matrix(model, dec.name(i, rel)), _matrix(reference, dec.name(i, rel))[:, keep])


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_and_layers_remove_exactly_the_chosen_set(arch: str, chosen_importance: set[tuple[int, int]]) -> None:
    # one query head per kv group (LLaMA family), or any two heads with their k/v (plain MHA)
    chosen_importance.update({(0, 1), (0, 2), (1, 0), (1, 3), (2, 1), (2, 3)})
    model, reference = _tiny(arch), _tiny(arch)
    report = ls.compress_(model, Heads(ratio=0.5, importance="test-chosen"), progress=False)
    assert [r.info["removed"] for r in report.children[0].rows] == [[1, 2], [0, 3], [1, 3]]
    dec, ref = decoder(model), decoder(reference)
    d = dec.heads(0)[2]
    for i, kept in enumerate(([0, 3], [1, 2], [0, 2])):
        rows = torch.tensor([h * d + k for h in kept for k in range(d)])
        assert torch.equal(_matrix(model, dec.name(i, dec.layout.o)), _matrix(reference, ref.name(i, ref.layout.o))[:, rows])
    chosen_importance.clear()
    chosen_importance.add((1, 1))
    model = _tiny(arch)
    report = ls.compress_(model, Layers(n=1, importance="test-chosen"), progress=False)
    assert report.children[0].rows[0].info["removed"] == [1]
    assert report.children[0].rows[0].module == decoder(model).container


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


def test_gpt2_fused_qkv_loses_the_rows_of_q_k_and_v(chosen_importance: set[tuple[int, int]]) -> None:
    chosen_importance.update({(i, 2) for i in range(3)})
    model, reference = _tiny("gpt2"), _tiny("gpt2")
    ls.compress_(model, Heads(ratio=0.25, importance="test-chosen"), progress=False)
    attn, ref = model.transformer.h[0].attn, reference.transformer.h[0].attn
    rows = [s * 32 + h * 8 + k for s in range(3) for h in (0, 1, 3) for k in range(8)]  # q | k | v, head 2 gone
    assert torch.equal(attn.c_attn.weight, ref.c_attn.weight[:, rows]) and torch.equal(attn.c_attn.bias, ref.c_attn.bias[rows])
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (3, 24, 72)


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(ARCHS), zeroed=st.sets(st.integers(0, 31), min_size=1, max_size=16))
def test_removing_all_zero_channels_leaves_outputs_unchanged(arch: str, zeroed: set[int]) -> None:
    model = _tiny(arch)
    dec = decoder(model)
    _zero_(model, [g for i in range(len(dec.blocks)) for g in channel_groups(dec, i) if g.index in zeroed])
    with torch.no_grad():
        expected = _out(model)
    ls.compress_(model, Channels(ratio=len(zeroed) / 32, importance="l1"), progress=False)
    assert all(decoder(model).mlp_width(i) == 32 - len(zeroed) for i in range(3))
    torch.testing.assert_close(_out(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_all_zero_heads_leaves_outputs_unchanged(arch: str) -> None:
    model = _tiny(arch)
    dec = decoder(model)
    _zero_(model, [g for i in range(3) for g in _query_units(dec, i) if g.index in (0, 3)])  # one per kv group
    with torch.no_grad():
        expected = _out(model)
    report = ls.compress_(model, Heads(ratio=0.5, importance="l1"), progress=False)
    assert [r.info["removed"] for r in report.children[0].rows] == [[0, 3]] * 3
    torch.testing.assert_close(_out(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_of_a_structurally_pruned_model(arch: str, tmp_path) -> None:
    model = _tiny(arch)
    passes = [Channels(ratio=0.4, scope="global", round_to=2), Heads(ratio=0.5), Layers(n=1)]
    ls.compress_(model, *passes, calibration=_batches(1), progress=False)
    expected = _out(model)
    ls.save(model, tmp_path / "plain")
    # into a model built from the original config: blocks cut, layer shapes and config replayed
    with torch.device("meta"):
        skeleton = _tiny(arch, seed=3)
    loaded = ls.load(tmp_path / "plain", skeleton)
    assert torch.equal(_out(loaded), expected)
    assert loaded.config.num_hidden_layers == 2 and decoder(loaded).heads(0)[0] == 2
    if arch in DECODERS:
        assert torch.equal(loaded.generate(IDS, max_new_tokens=4, do_sample=False),
                           model.generate(IDS, max_new_tokens=4, do_sample=False))
    # through the Hugging Face folder: the saved config already says 2 blocks (and 2 heads where it can)
    hf.save_pretrained(model, None, tmp_path / "hf")
    again = hf.from_pretrained(tmp_path / "hf")
    assert torch.equal(_out(again), expected)
    assert ls.io.read_manifest(tmp_path / "hf")["structure"]["layers"][decoder(model).container]["of"] == 3


def test_structure_then_quantization_round_trips(tmp_path) -> None:
    model = _tiny("llama")
    ls.compress_(model, Channels(ratio=0.5), ls.quant.RTN(bits=8, group_size=16), progress=False)
    expected = model(IDS).logits
    ls.save(model, tmp_path / "c")
    loaded = ls.load(tmp_path / "c", _tiny("llama", seed=4))
    assert torch.equal(loaded(IDS).logits, expected)


def test_unsupported_models_and_orders_are_refused() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    for p in (Heads(), Layers()):
        with pytest.raises(TargetError, match="layouts llama, opt, gpt2, bert"):
            p.select(mlp)
    with pytest.raises(TargetError, match="needs more than 2 blocks"):
        Layers(n=2).select(models.tiny("llama", layers=2))
    with pytest.raises(TargetError, match="scale_attn_by_inverse_layer_idx"):
        Layers().select(models.tiny("gpt2", layers=3, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(OrderError):
        ls.compress_(_tiny("llama"), ls.quant.RTN(bits=8, group_size=16), Channels(), progress=False)
    quantized = _tiny("opt")
    ls.compress_(quantized, ls.quant.RTN(bits=8, group_size=16), progress=False)
    with pytest.raises(TargetError, match="not a plain nn.Linear"):
        Channels().select(quantized)  # a matching layout never falls back to the tracer
    assert not isinstance(pytest.raises(TargetError, Channels().select, quantized).value, TraceError)
    with pytest.raises(ConfigError, match="importance must be"):
        Channels(importance="influence")
    with pytest.raises(ConfigError, match="ratio must be"):
        Heads(ratio=1.0)
    assert Layers().requires == {"calibration"} and Channels().requires == frozenset()
    assert Channels(importance="taylor").requires == {"calibration"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_report_rows_carry_sizes_removed_units_and_scores(arch: str) -> None:
    model = _tiny(arch)
    report = ls.compress_(model, Channels(ratio=0.5, importance="l2"), progress=False).children[0]
    row = report.rows[0]
    assert row.module == decoder(model).mlp(0)[0] and row.kind == type(decoder(model).mlp(0)[1]).__name__
    assert row.params_after < row.params_before and row.bytes_after < row.bytes_before
    assert len(row.info["removed"]) == 16 and len(row.info["scores"]) == 32
    assert (row.info["width_before"], row.info["width_after"]) == (32, 16)
