from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim import calibration as C
from llmslim.calibration import CalibrationPass
from llmslim.errors import CalibrationError, PassError
from models import same, snapshot
from toys import ToyWanda

transformers = pytest.importorskip("transformers")
from llmslim import models  # noqa: E402


@dataclasses.dataclass
class Recorder(ls.PassBase):
    """Records the statistics the engine hands each module (test consumer)."""

    targets: tuple = ("Linear", "Conv1D")
    ignore: tuple = ("lm_head",)
    accepts = ("Linear", "Conv1D")
    kinds: tuple = ("xtx", "sqsum", "absmax")
    sequential_: bool = False

    def statistics(self, name, module):
        return set(self.kinds)

    @property
    def sequential(self) -> bool:
        return self.sequential_

    def solve(self, name, module, stats, ctx):
        self.seen[name] = {k: v.clone() for k, v in stats.tensors().items()} | {"n": stats.n}
        self.order.append(name)
        return None

    def apply(self, model, ctx):
        self.seen, self.order = {}, []
        C.calibrate(model, ctx, [self])
        return self.report(modified=False)


def _batches(n=4, seq=12, vocab=128, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, seq), generator=g)
        batch = {"input_ids": ids}
        if pad:
            mask = torch.ones_like(ids)
            mask[0, : int(torch.randint(1, seq // 2, (1,), generator=g))] = 0  # left padding
            batch["attention_mask"] = mask
        out.append(batch)
    return out


def _direct(model, batches, names, *, mask_padding):
    """X^T X of each named layer from plain full-model forwards with hooks (the reference)."""
    sums = {n: 0 for n in names}
    counts = {n: 0 for n in names}
    current = {}
    handles = []
    for n in names:
        def hook(mod, args, _n=n):
            x = args[0]
            mask = current.get("mask") if mask_padding else None
            if mask is not None and x.shape[:-1].numel() == mask.numel():  # token rows (not BERT's pooled CLS)
                x = x.reshape(-1, x.shape[-1])[mask.flatten().bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            sums[_n] = sums[_n] + x.T @ x
            counts[_n] += x.shape[0]

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            current["mask"] = b.get("attention_mask")
            model(**b, **({} if models.is_encoder(model) else {"use_cache": False}))
    for h in handles:
        h.remove()
    return sums, counts


@pytest.mark.parametrize(
    ("arch", "first", "count"),
    [("llama", "model.layers.0", 2), ("qwen2", "model.layers.0", 2), ("mistral", "model.layers.0", 2),
     ("gpt2", "transformer.h.0", 2), ("opt", "model.decoder.layers.0", 2), ("bert", "encoder.layer.0", 2)],
)
def test_block_detection_on_hf_architectures(arch, first, count) -> None:
    blocks = C.find_blocks(models.tiny(arch))
    assert blocks[0][0] == first and len(blocks) == count


def test_block_detection_plain_models_and_named_blocks() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert C.find_blocks(seq) == [("", seq)]
    assert [n for n, _ in C.find_blocks(seq, "")] == ["0", "1", "2"]  # the root Sequential, named
    llama = models.tiny("llama")
    assert [n for n, _ in C.find_blocks(llama, "model.layers")] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(CalibrationError, match=r"blocks='model.layerz' names no module.*model.layers \(2 x LlamaDecoderLayer\)"):
        C.find_blocks(llama, "model.layerz")
    with pytest.raises(CalibrationError, match="must name a non-empty nn.ModuleList"):
        C.find_blocks(llama, "model.norm")


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bert"])
@pytest.mark.parametrize("pad", [False, True])
def test_sequential_hessians_equal_direct_forward_with_original_propagation(arch, pad, sequential) -> None:
    model = models.tiny(arch)
    batches = _batches(pad=pad)
    rec = Recorder(sequential_=sequential)
    ls.compress_(model, rec, calibration=batches, progress=False)
    sums, counts = _direct(model, batches, list(rec.seen), mask_padding=True)
    for name, got in rec.seen.items():
        assert got["n"] == counts[name]
        # per-batch sums are float32 (then added in float64); the reference is float64 throughout
        torch.testing.assert_close(got["xtx"], sums[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["sqsum"], torch.diagonal(sums[name]), rtol=1e-4, atol=1e-4)
    if pad:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        assert all(v["n"] == real for k, v in rec.seen.items() if "pooler" not in k)  # BERT's pooler sees CLS only


def test_compressed_propagation_feeds_the_next_block_the_compressed_outputs() -> None:
    model, batches = models.tiny("llama"), _batches()
    reference = models.tiny("llama")
    wanda = ToyWanda(sparsity=0.5, ignore=("lm_head",))
    ls.compress_(reference, ToyWanda(sparsity=0.5, ignore=("lm_head",)), calibration=batches, progress=False)
    rec = Recorder(targets=("model.layers.1.*",))
    ls.compress_(model, wanda, rec, calibration=batches, progress=False)
    sums, _ = _direct(reference, batches, ["model.layers.1.self_attn.q_proj"], mask_padding=False)
    torch.testing.assert_close(rec.seen["model.layers.1.self_attn.q_proj"]["xtx"], sums["model.layers.1.self_attn.q_proj"], rtol=1e-4, atol=1e-4)


def test_modules_reading_one_input_share_statistics_and_true_sequential_groups_them() -> None:
    model = models.tiny("llama")
    shared = []

    @dataclasses.dataclass
    class Ids(Recorder):
        def solve(self, name, module, stats, ctx):
            shared.append((name.rsplit(".", 1)[1], stats))  # the object itself: a freed one's id can be reused
            return super().solve(name, module, stats, ctx)

    rec = Ids(targets=("model.layers.0.*",), sequential_=True)
    ls.compress_(model, rec, calibration=_batches(), progress=False)
    ids = dict(shared)
    assert ids["q_proj"] is ids["k_proj"] is ids["v_proj"] and ids["v_proj"] is not ids["o_proj"]
    assert ids["gate_proj"] is ids["up_proj"] and ids["up_proj"] is not ids["down_proj"]
    assert [n.rsplit(".", 1)[1] for n in rec.order] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_modules_outside_the_blocks_are_calibrated_from_a_whole_model_forward() -> None:
    model, batches = models.tiny("llama"), _batches()
    rec = Recorder(targets=("lm_head", "model.layers.0.mlp.down_proj"), ignore=())
    ls.compress_(model, rec, calibration=batches, progress=False)
    sums, _ = _direct(model, batches, ["lm_head"], mask_padding=False)
    assert rec.order == ["model.layers.0.mlp.down_proj", "lm_head"]
    torch.testing.assert_close(rec.seen["lm_head"]["xtx"], sums["lm_head"], rtol=1e-4, atol=1e-4)


def test_wanda_toy_prunes_every_arch_and_reports_calibration() -> None:
    for arch in models.ARCHITECTURES:
        model = models.tiny(arch)
        report = ls.compress_(model, ToyWanda(targets=("Linear", "Conv1D"), ignore=("lm_head", "re:.*pooler.*")),
                              calibration=_batches(), progress=False)
        rows = report.all_rows
        assert rows and all(r.sparsity >= 0.5 for r in rows), arch
        assert any(n.startswith("calibration:") and "peak RSS growth" in n for n in report.children[0].notes)


@pytest.mark.parametrize(
    ("batches", "pattern"),
    [
        ([], "needs calibration data"),
        ([{"input_idz": torch.zeros(1, 4, dtype=torch.long)}], "batch 0 does not fit the model"),
    ],
)
def test_bad_data_is_refused_before_anything_changes(batches, pattern) -> None:
    model = models.tiny("llama")
    before = snapshot(model)
    with pytest.raises((CalibrationError, PassError), match=pattern):
        ls.compress_(model, ToyWanda(ignore=("lm_head",)), ctx=ls.Context(batches, progress=False))
    assert same(snapshot(model), before)


def test_nan_activations_name_where() -> None:
    model = models.tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("nan")
    batch = {"input_ids": torch.tensor([[1, 5, 2]])}
    with pytest.raises(PassError, match="batch 0: the inputs of the first block contain NaN"):
        ls.compress_(model, ToyWanda(ignore=("lm_head",)), calibration=[batch], progress=False)


def test_calibrating_from_shards_on_a_meta_skeleton(tmp_path) -> None:
    from safetensors.torch import save_file

    model, batches = models.tiny("llama", seed=3), _batches()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in keys[len(keys) // 2 :]}, str(tmp_path / "b.safetensors"))
    reference = Recorder()
    ls.compress_(model, reference, calibration=batches, progress=False)

    with torch.device("meta"):
        skeleton = models.tiny("llama", seed=3)
    skeleton.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # non-persistent buffers: real
    rec = Recorder()
    rec.seen, rec.order = {}, []
    released = []
    C.calibrate(skeleton, ls.Context(batches, progress=False), [rec], weights=C.ShardedWeights(tmp_path),
                after_block=lambda name, block: released.append(name))
    assert released == ["model.layers.0", "model.layers.1"]
    assert all(p.device.type == "meta" for p in skeleton.model.layers.parameters())  # released after use
    for name, got in reference.seen.items():
        torch.testing.assert_close(rec.seen[name]["xtx"], got["xtx"])


class _ReadsTableDirectly(nn.Module):
    # the table's weight is read without calling its module, so no pre-hook sees it used
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.table.weight[input_ids]
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("direct", [False, True])
def test_from_shards_only_what_runs_before_the_blocks_is_loaded(tmp_path, monkeypatch, direct) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _ReadsTableDirectly() if direct else models.tiny("llama", seed=3)
    tied = {"lm_head.weight"} if not direct and model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, str(tmp_path / "model.safetensors"))
    batches = [{"input_ids": torch.randint(0, 16, (1, 6))} for _ in range(2)]
    reference = Recorder(ignore=("head", "lm_head"))
    ls.compress_(model, reference, calibration=batches, progress=False)
    with torch.device("meta"):
        skeleton = _ReadsTableDirectly() if direct else models.tiny("llama", seed=3)
    if not direct:
        skeleton.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    loads: list[str] = []
    real_load = C.ShardedWeights.load_
    monkeypatch.setattr(C.ShardedWeights, "load_", lambda self, m, prefix, *a, **k: (loads.append(prefix), real_load(self, m, prefix, *a, **k))[1])
    rec = Recorder(ignore=("head", "lm_head"))
    rec.seen, rec.order = {}, []
    C.calibrate(skeleton, ls.Context(batches, progress=False), [rec], weights=C.ShardedWeights(tmp_path))
    head = "head." if direct else "lm_head."
    # the output head after the blocks is loaded only by the fallback (a table read without a call)
    assert (head in loads) == direct
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # everything released
    for name, got in reference.seen.items():
        torch.testing.assert_close(rec.seen[name]["xtx"], got["xtx"])


def _rank_main(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = models.tiny("llama")
    rec = Recorder()
    ls.compress_(model, ToyWanda(ignore=("lm_head",)), rec, calibration=_batches(n=6), progress=False)
    if rank == 0:
        torch.save({"state": model.state_dict(), "stats": rec.seen}, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = models.tiny("llama")
    rec = Recorder()
    ls.compress_(model, ToyWanda(ignore=("lm_head",)), rec, calibration=_batches(n=6), progress=False)
    for name, stats in rec.seen.items():
        assert got["stats"][name]["n"] == stats["n"]
        for kind in ("xtx", "sqsum", "absmax"):
            # X^T X sums a few batches in float32 before the float64 total, so two ranks (each
            # its own half of the batches) round differently from one process: float32 closeness
            tol = 1e-5 if kind == "xtx" else 1e-9
            torch.testing.assert_close(got["stats"][name][kind], stats[kind], rtol=tol, atol=tol)
    for key, value in model.state_dict().items():
        assert torch.equal(got["state"][key], value), key


def test_consecutive_calibration_passes_share_one_sweep(monkeypatch) -> None:
    from llmslim.calibration import _engine

    captures = []
    real = _engine.capture_inputs
    monkeypatch.setattr(_engine, "capture_inputs", lambda *a, **k: captures.append(1) or real(*a, **k))
    model = models.tiny("llama")
    first, second = ToyWanda(sparsity=0.25, ignore=("lm_head",), name="a"), ToyWanda(sparsity=0.5, ignore=("lm_head",), name="b")
    report = ls.compress_(model, first, second, calibration=_batches(), progress=False)
    assert len(captures) == 1  # one capture, one visit per block
    assert [c.name for c in report.children] == ["a", "b"]
    assert all("shared calibration sweep: a, b" in c.notes for c in report.children)
    assert all(r.sparsity >= 0.5 for r in report.children[1].rows)
    captures.clear()
    ls.compress_(models.tiny("llama"), first, ToyWanda(ignore=("lm_head",), propagate="original"), calibration=_batches(), progress=False)
    assert len(captures) == 2  # different sweep settings: two sweeps


def test_a_failure_in_a_shared_sweep_names_the_pass_and_rolls_back() -> None:
    @dataclasses.dataclass
    class Breaks(ToyWanda):
        def solve(self, name, module, stats, ctx):
            if name.endswith("layers.1.mlp.up_proj"):
                raise RuntimeError("singular Hessian")
            return super().solve(name, module, stats, ctx)

    model = models.tiny("llama")
    before = snapshot(model)
    with pytest.raises(PassError) as info:
        ls.compress_(model, ToyWanda(ignore=("lm_head",), name="a"), Breaks(ignore=("lm_head",), name="b"),
                     calibration=_batches(), progress=False)
    msg = str(info.value)
    assert "pass \"b (shared calibration sweep with 'a')\"" in msg and "'model.layers.1.mlp.up_proj'" in msg
    assert same(snapshot(model), before)  # the whole sweep is one step: both passes undone


def test_torchrun_example_gives_the_same_statistics_on_two_ranks() -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent.parent / "examples" / "calibrate_distributed.py")
    one = subprocess.run([sys.executable, script], capture_output=True, text=True, check=True).stdout
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script],
        capture_output=True, text=True, check=True, env={**__import__("os").environ, "LLMSLIM_PROGRESS": "0"},
    ).stdout
    assert "ranks: 1;" in one and "ranks: 2;" in two and "8 batches over 2 ranks" in two
    assert one.split("sum of channel norms: ")[1].split()[0] == two.split("sum of channel norms: ")[1].split()[0]


def test_an_edit_through_data_is_still_propagated() -> None:
    @dataclasses.dataclass
    class Sneaky(ToyWanda):
        def solve(self, name, module, stats, ctx):
            module.weight.data.mul_(0.5)  # bumps no version counter
            return None

    model, batches = models.tiny("llama"), _batches()
    reference = models.tiny("llama")
    with torch.no_grad():
        for n, m in reference.named_modules():
            if n.startswith("model.layers.0.") and isinstance(m, nn.Linear):
                m.weight.mul_(0.5)
    seen = {}

    @dataclasses.dataclass
    class Rec(CalibrationPass):
        def statistics(self, name, module):
            return {"xtx"}

        def solve(self, name, module, stats, ctx):
            seen[name] = stats.xtx.clone()

    q = "model.layers.1.self_attn.q_proj"
    report = ls.compress_(model, Sneaky(targets=("model.layers.0.*",)), Rec(targets=(q,)), calibration=batches, progress=False)
    assert "shared calibration sweep" in report.children[0].notes[-1]  # one sweep: block 0 edited, then reused
    sums, _ = _direct(reference, batches, [q], mask_padding=False)
    torch.testing.assert_close(seen[q], sums[q], rtol=1e-4, atol=1e-4)


def test_original_propagation_with_a_sequential_modifying_pass() -> None:
    @dataclasses.dataclass
    class SeqWanda(ToyWanda):
        sequential = True

    seen = {}

    @dataclasses.dataclass
    class Rec(CalibrationPass):
        def statistics(self, name, module):
            return {"xtx"}

        def solve(self, name, module, stats, ctx):
            seen[name] = stats.xtx.clone()

    q = "model.layers.1.self_attn.q_proj"
    model, reference, batches = models.tiny("llama"), models.tiny("llama"), _batches()
    ls.compress_(model, SeqWanda(targets=("model.layers.0.*",), propagate="original"), Rec(targets=(q,), propagate="original"),
                 calibration=batches, progress=False)
    assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean() >= 0.5  # block 0 was pruned ...
    sums, _ = _direct(reference, batches, [q], mask_padding=False)
    torch.testing.assert_close(seen[q], sums[q], rtol=1e-4, atol=1e-4)  # ... yet block 1 saw the original outputs


@pytest.mark.parametrize("t", [torch.zeros(4, dtype=torch.uint8)[::2][:0], torch.zeros(0, 3), torch.zeros(6, dtype=torch.int16)[::3]],
                         ids=["empty-strided-bytes", "empty-float", "strided-words"])
def test_block_fingerprints_take_any_tensor(t) -> None:
    # a fully pruned layer stores an empty values buffer; the engine fingerprints every block tensor
    from llmslim.calibration._engine import _checksum

    assert _checksum(t) == _checksum(t.clone())
    assert _checksum(t) == 0 if t.numel() == 0 else isinstance(_checksum(t), int)
