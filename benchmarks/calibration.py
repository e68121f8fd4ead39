"""Calibration engine cost: a full statistics sweep over SmolLM2, and a 1.1B model from disk.

1. SmolLM2-135M (float32): X^T X, channel sums of squares and absolute maxima for every linear
   layer of the decoder blocks, from 128 windows of 512 tokens: wall time and peak RSS growth.
2. Memory-bound: a randomly initialised LLaMA-architecture model of 1.1B parameters (TinyLlama's
   shapes: 22 blocks, hidden 2048, MLP 5632, 32 heads, 4 key/value heads, vocabulary 32000,
   untied head) saved as safetensors shards, calibrated block by block from disk (meta
   skeleton) with 32 windows of 512 tokens, X^T X for every linear layer of the blocks. It runs
   in a fresh process so that memory is measured as growth above that process's RSS right
   after its imports (the LLaMA modeling code included). Cached activations are held on the CPU
   in float32; the dense outputs are propagated, so each block's outputs replace its inputs and
   at most two copies are alive; X^T X accumulates in float64 and is freed after each block's
   solve; only the modules that run before the first block (the embedding) are read from disk
   for the capture, never the output head.

Run:  python benchmarks/calibration.py [--quick]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, print_table, table, write_result  # noqa: E402
from llmslim.calibration import CalibrationPass, rss_bytes  # noqa: E402



@dataclasses.dataclass
class Sweep(CalibrationPass):
    """Take the asked statistics of every linear layer in the blocks; keep only their traces."""

    targets: tuple = ("Linear",)
    ignore: tuple = ("lm_head",)
    kinds: tuple = ("xtx", "sqsum", "absmax")

    def statistics(self, name, module):
        return set(self.kinds)

    def solve(self, name, module, stats, ctx):
        self.tokens = stats.n  # the statistics are dropped after this: nothing accumulates across blocks
        return None


def smollm2(windows: int) -> dict:
    import llmslim as ls
    from llmslim import data, models

    model, tokenizer = models.load_smollm2()
    batches = data.calibration_batches(tokenizer, n_samples=windows, seq_len=512)
    sweep = Sweep()
    report = ls.compress_(model, sweep, calibration=batches)
    note = report.children[0].notes[0]
    return {"smollm2_windows": windows, "smollm2_seconds": report.children[0].seconds,
            "smollm2_peak_rss_growth_mib": float(note.split("peak RSS growth ")[1].split(" MiB")[0]), "smollm2_tokens": sweep.tokens}


LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def write_big(folder: Path, layers: int) -> int:
    """Save a random LLaMA-architecture model as safetensors shards; return its parameter count."""
    import transformers

    config = transformers.LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    # Fill it shard by shard so the writer itself never holds the whole model.
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0
    names = list(model.state_dict())
    for i, name in enumerate(names):
        t = model.state_dict()[name]
        value = torch.ones(t.shape) if "norm" in name else torch.randn(t.shape, generator=g) * 0.02
        shard[name] = value
        size += value.numel() * 4
        if size > 1 << 30 or i == len(names) - 1:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / file))
            weight_map.update({k: file for k in shard})
            shard, size, index = {}, 0, index + 1
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return n


def big_child(folder: str, windows: int) -> None:
    """Run in a fresh process: calibrate the big model from its shards, print the figures as JSON."""
    import transformers

    import llmslim as ls
    from llmslim.calibration import PeakMemory, ShardedWeights, calibrate

    transformers.LlamaForCausalLM  # noqa: B018  (transformers imports lazily: import the modeling code first)
    baseline = rss_bytes()  # right after this process's imports
    config = transformers.LlamaConfig.from_pretrained(folder)
    with PeakMemory() as peak:
        peak.start = baseline
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)  # non-persistent buffers: real
        g = torch.Generator().manual_seed(1)
        batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 512), generator=g)} for _ in range(windows)]
        sweep = Sweep(kinds=("xtx",), propagate="original")
        start = time.perf_counter()
        result = calibrate(model, ls.Context(batches, progress=True), [sweep], weights=ShardedWeights(folder), propagate="original")
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_growth": peak.rss_growth, "tokens": result.tokens}))


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    rows = [
        [f"SmolLM2-135M, {r['smollm2_windows']} x 512 tokens, X^T X + norms + max", "in memory", f"{r['smollm2_seconds']:.1f}",
         f"{r['smollm2_peak_rss_growth_mib']:.0f}", "", ""],
        [f"LLaMA {r['big_params'] / 1e9:.2f}B (random), {s['big_windows']} x 512 tokens, X^T X", "block by block from shards",
         f"{r['big_seconds']:.1f}", f"{r['big_peak_rss_growth_mib']:.0f}", f"{r['big_fp32_mib']:.0f}",
         f"{100 * r['big_peak_rss_growth_mib'] / r['big_fp32_mib']:.1f}%"],
    ]
    note = f" **Note:** {s['note']}" if s.get("note") else ""
    for part in ("smollm2", "big"):
        if s.get(f"{part}_note"):
            note += f" **{'SmolLM2' if part == 'smollm2' else '1.1B'} row:** {s[f'{part}_note']}"
    return (
        f"{machine_line(payload)} Memory is peak RSS growth above the process's RSS right after imports; "
        f"cached activations are held on the CPU in float32.{note}\n\n"
        + table(["sweep", "weights", "wall time (s)", "peak RSS growth (MiB)", "float32 model (MiB)", "growth / model"], rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 SmolLM2 windows; a 4-block big model with 4 windows")
    parser.add_argument("--note", default="", help="a remark recorded with the results (e.g. other load on the machine)")
    parser.add_argument("--part", choices=("all", "smollm2", "big"), default="all",
                        help="rerun one part only, keeping the other's figures (and settings) from the last result file; "
                             "--note then goes with that part")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        big_child(args.child, args.windows)
        return
    settings = {"smollm2_windows": 16 if args.quick else 128, "big_windows": 4 if args.quick else 32, "big_layers": 4 if args.quick else 22,
                "note": args.note}
    results: dict = {}
    if args.part != "all":  # keep the other part's figures, with the note they were recorded with
        previous = json.loads((Path(__file__).parent / "results" / f"calibration{'-quick' if args.quick else ''}.json").read_text())
        settings = {**previous["settings"], f"{args.part}_note": args.note, "note": previous["settings"].get("note", "")}
        results = dict(previous["results"])
    if args.part in ("all", "smollm2"):
        results.update(smollm2(settings["smollm2_windows"]))
    if args.part in ("all", "big"):
        folder = Path(tempfile.mkdtemp(prefix="llmslim-big-"))
        try:
            n = write_big(folder, settings["big_layers"])
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--windows", str(settings["big_windows"])],
                                 check=True, capture_output=True, text=True).stdout
            big = json.loads(out.strip().splitlines()[-1])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results.update({"big_params": n, "big_fp32_mib": n * 4 / 2**20, "big_seconds": big["seconds"],
                        "big_peak_rss_growth_mib": big["peak_rss_growth"] / 2**20, "big_tokens": big["tokens"]})
    print_table("calibration engine", ["measure", "value"], [[k, v] for k, v in results.items()])
    print(f"wrote {write_result('calibration', settings, results, quick=args.quick)}")


if __name__ == "__main__":
    main()
