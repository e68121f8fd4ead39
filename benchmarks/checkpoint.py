"""Compressed checkpoints: size on disk, memory while loading onto a meta skeleton, save/load times.

SmolLM2-135M quantized by ``gptq`` int4 g64 from ``--calibration`` windows of 512 tokens of the
docs-text calibration split (the shipped defaults otherwise: ``lm_head`` stays float, tied to the
embedding) is saved with ``llmslim.hf.save_pretrained``; then, in a fresh
process, ``llmslim.hf.from_pretrained`` builds the ``transformers`` class on the ``meta`` device
and loads the checkpoint into it. Memory is the peak RSS growth of that process above its RSS
right after its imports (torch, transformers' LLaMA modeling code, llmslim, safetensors). The
child's logits on 256 tokens must equal the parent's bit for bit.

``--part big``: the 1.1B-parameter random LLaMA of benchmarks/calibration.py (TinyLlama's shapes,
written as float32 safetensors shards) is GPTQ-quantized (int4 g128 with min/max grids, which
take a quarter of the solve time of the default ``clip="mse"`` search and the same memory; the
shipped defaults otherwise, ``lm_head`` float) block by block from its shards onto a ``meta`` skeleton, with 32
windows of 512 random tokens, and written block by block by ``llmslim.io.StreamingSave`` as a
sharded checkpoint; in a fresh process whose peak RSS growth above its post-import RSS is
measured. Another fresh process loads the checkpoint onto a ``meta`` skeleton (memory and time
measured the same way) and evaluates it: perplexity on random-token windows beside the float
model's (read from its shards) on the same windows; it is a random model, so both are near the
vocabulary size and only their ratio means anything.

Run:  python benchmarks/checkpoint.py [--part all|smollm2|big] [--quick] [--note TEXT];
      then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
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


def child(folder: str, ids_file: str) -> None:
    """Fresh process: load the checkpoint onto a meta skeleton; print the figures as JSON."""
    import transformers
    from safetensors.torch import load_file, save_file

    from llmslim import hf
    from llmslim.calibration import PeakMemory, rss_bytes

    transformers.LlamaForCausalLM  # noqa: B018  (transformers imports lazily: import the modeling code first)
    ids = load_file(ids_file)["ids"]
    baseline = rss_bytes()
    with PeakMemory() as peak:
        peak.start = baseline
        start = time.perf_counter()
        model = hf.from_pretrained(folder)
        seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"logits": logits.contiguous()}, ids_file + ".out")
    print(json.dumps({"load_seconds": seconds, "peak_rss_growth": peak.rss_growth}))


def _big_skeleton(config):
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # non-persistent buffers: not in the shards
    return model


def big_save_child(float_dir: str, out: str, windows: int, group_size: int, clip: str) -> None:
    """Fresh process: GPTQ from the shards with a streaming save; print the figures as JSON."""
    import transformers

    import llmslim as ls
    from llmslim.calibration import PeakMemory, ShardedWeights, rss_bytes

    transformers.LlamaForCausalLM  # noqa: B018  (transformers imports lazily: import the modeling code first)
    baseline = rss_bytes()  # right after this process's imports
    config = transformers.LlamaConfig.from_pretrained(float_dir)
    with PeakMemory() as peak:
        peak.start = baseline
        start = time.perf_counter()
        model = _big_skeleton(config)
        g = torch.Generator().manual_seed(1)
        batches = [{"input_ids": torch.randint(0, config.vocab_size, (1, 512), generator=g)} for _ in range(windows)]
        passes = [ls.quant.GPTQ(bits=4, group_size=group_size, clip=clip)]
        source = ShardedWeights(float_dir)
        with ls.io.StreamingSave(model, out, source=source, recipe=ls.PassManager(passes).to_recipe(), shard_bytes=2**29) as saver:
            report = ls.compress_(model, *passes, ctx=ls.Context(batches, weights=source, after_block=saver))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_growth": peak.rss_growth, "notes": list(report.children[0].notes),
                      "error_mean": sum(r.error for r in report.all_rows) / len(report.all_rows)}))


def big_load_child(out: str, float_dir: str, windows: int) -> None:
    """Fresh process: load the streamed checkpoint onto a meta skeleton, evaluate; print JSON."""
    import transformers

    import llmslim as ls
    from llmslim import evaluate
    from llmslim.calibration import PeakMemory, ShardedWeights, rss_bytes

    transformers.LlamaForCausalLM  # noqa: B018
    baseline = rss_bytes()
    config = transformers.LlamaConfig.from_pretrained(float_dir)
    with PeakMemory() as peak:
        peak.start = baseline
        start = time.perf_counter()
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        ls.load(out, model)
        seconds = time.perf_counter() - start
    ids = torch.randint(0, config.vocab_size, (windows * 512,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        finite = bool(torch.isfinite(model(ids[None, :512]).logits).all())
    ppl = evaluate.perplexity(model, ids, seq_len=512, max_windows=windows, progress=False)
    del model
    reference = _big_skeleton(config)
    ShardedWeights(float_dir).load_(reference, "", "cpu")
    ppl_float = evaluate.perplexity(reference, ids, seq_len=512, max_windows=windows, progress=False)
    print(json.dumps({"load_seconds": seconds, "peak_rss_growth": peak.rss_growth, "ppl": ppl, "ppl_float": ppl_float,
                      "logits_finite": finite}))


def big(layers: int, windows: int, group_size: int, clip: str, eval_windows: int) -> dict:
    from calibration import write_big  # benchmarks/calibration.py: the 1.1B model as shards

    tmp = Path(tempfile.mkdtemp(prefix="llmslim-ckpt-big-"))
    try:
        n = write_big(tmp, layers)
        out = tmp / "int4"
        run = [sys.executable, __file__]
        saved = json.loads(subprocess.run([*run, "--child-big-save", str(tmp), str(out), str(windows), str(group_size), clip],
                                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
        disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        shards = len(list(out.glob("*.safetensors")))
        loaded = json.loads(subprocess.run([*run, "--child-big-load", str(out), str(tmp), str(eval_windows)],
                                           check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fp32 = n * 4
    return {
        "big_params": n, "big_fp32_bytes": fp32, "big_checkpoint_bytes": disk, "big_checkpoint_files": shards,
        "big_save_seconds": saved["seconds"], "big_save_peak_rss_growth_bytes": saved["peak_rss_growth"],
        "big_save_growth_over_fp32": saved["peak_rss_growth"] / fp32, "big_gptq_error_mean": saved["error_mean"],
        "big_load_seconds": loaded["load_seconds"], "big_load_peak_rss_growth_bytes": loaded["peak_rss_growth"],
        "big_load_growth_over_checkpoint": loaded["peak_rss_growth"] / disk, "big_ppl": loaded["ppl"],
        "big_ppl_float": loaded["ppl_float"], "big_logits_finite": loaded["logits_finite"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", default="", help="a remark recorded with the results (e.g. other load on the machine)")
    parser.add_argument("--part", choices=("all", "smollm2", "big"), default="all",
                        help="rerun one part only, keeping the other's figures from the last result file; --note then goes with that part")
    parser.add_argument("--quick", action="store_true", help="big part only: 2 blocks, 4 windows (writes checkpoint-quick.json)")
    parser.add_argument("--calibration", type=int, default=32, help="SmolLM2 part: GPTQ calibration windows of 512 tokens")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-big-save", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--child-big-load", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.child_big_save:
        a = args.child_big_save
        big_save_child(a[0], a[1], int(a[2]), int(a[3]), a[4])
        return
    if args.child_big_load:
        a = args.child_big_load
        big_load_child(a[0], a[1], int(a[2]))
        return
    big_settings = {"big_layers": 2 if args.quick else 22, "big_windows": 4 if args.quick else 32, "big_group_size": 128,
                    # the shipped clip="mse" search takes ~4x the solve time of min/max grids: too long for this
                    # machine's budget; memory does not depend on it (the search loops over its grid)
                    "big_clip": "minmax", "big_eval_windows": 1 if args.quick else 2}
    if args.quick and args.part != "big":
        parser.error("--quick applies to --part big only")
    if args.part == "big":
        path = Path(__file__).parent / "results" / f"checkpoint{'-quick' if args.quick else ''}.json"
        previous = json.loads(path.read_text()) if path.exists() else {"settings": {}, "results": {}}
        settings = {**previous["settings"], **big_settings, "big_note": args.note}
        results = {**previous["results"], **big(settings["big_layers"], settings["big_windows"], settings["big_group_size"],
                                                  settings["big_clip"], settings["big_eval_windows"])}
        print_table("checkpoint (1.1B streamed)", ["measure", "value"], [[k, v] for k, v in results.items() if k.startswith("big_")])
        print(f"wrote {write_result('checkpoint', settings, results, quick=args.quick)}")
        return
    smollm2_results, smollm2_settings = smollm2(args.note, args.calibration)
    if args.part == "all":
        bigger = big(**{k.removeprefix("big_"): v for k, v in big_settings.items()})
        smollm2_results.update(bigger)
        smollm2_settings.update(big_settings)
    elif (Path(__file__).parent / "results" / "checkpoint.json").exists():  # keep the big part's figures
        previous = json.loads((Path(__file__).parent / "results" / "checkpoint.json").read_text())
        smollm2_results.update({k: v for k, v in previous["results"].items() if k.startswith("big_")})
        smollm2_settings.update({k: v for k, v in previous["settings"].items() if k.startswith("big_")})
    print_table("checkpoint", ["measure", "value"], [[k, v] for k, v in smollm2_results.items()])
    print(f"wrote {write_result('checkpoint', smollm2_settings, smollm2_results, quick=False)}")


def smollm2(note: str, windows: int) -> tuple[dict, dict]:
    """SmolLM2 gptq int4 g64: save, load in a fresh process; figures and settings."""
    import llmslim as ls
    from llmslim import data, evaluate, models
    from safetensors.torch import load_file, save_file

    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="default")
    batches = data.calibration_batches(text=split.calibration, n_samples=windows, seq_len=512)
    start = time.perf_counter()
    ls.compress_(model, ls.quant.GPTQ(bits=4, group_size=64), calibration=batches, progress=False)
    quantize_seconds = time.perf_counter() - start
    ids = split.evaluation[:256].view(1, -1)
    tmp = Path(tempfile.mkdtemp(prefix="llmslim-ckpt-"))
    try:
        start = time.perf_counter()
        folder = ls.hf.save_pretrained(model, None, tmp / "smollm2-gptq")
        save_seconds = time.perf_counter() - start
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        save_file({"ids": ids}, str(tmp / "ids.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(tmp / "ids.safetensors")],
                             check=True, capture_output=True, text=True).stdout
        loaded = json.loads(out.strip().splitlines()[-1])
        with torch.no_grad():
            exact = bool(torch.equal(load_file(str(tmp / "ids.safetensors.out"))["logits"], model(ids).logits))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mem = evaluate.model_bytes(model)
    results = {
        "model_bytes": mem, "checkpoint_bytes": disk, "disk_over_memory": disk / mem,
        "save_seconds": save_seconds, "load_seconds": loaded["load_seconds"],
        "load_peak_rss_growth_bytes": loaded["peak_rss_growth"], "growth_over_checkpoint": loaded["peak_rss_growth"] / disk,
        "logits_bit_exact": exact, "quantize_seconds": quantize_seconds,
    }
    settings = {"model": "SmolLM2-135M-Instruct", "method": f"gptq bits=4 group_size=64, {windows} calibration windows of 512 "
                "(lm_head float, tied)", "tokens": ids.numel(), "note": note}
    return results, settings


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    mib = 2**20
    rows = [[f"{s['model']}, {s['method']}", f"{r['model_bytes'] / mib:.1f}", f"{r['checkpoint_bytes'] / mib:.1f}",
             f"{100 * (r['disk_over_memory'] - 1):+.2f}%", f"{r['load_peak_rss_growth_bytes'] / mib:.1f}",
             f"{r['growth_over_checkpoint']:.2f}x", f"{r['save_seconds']:.2f}", f"{r['load_seconds']:.2f}",
             "yes" if r["logits_bit_exact"] else "NO"]]
    note = f" **Note:** {s['note']}" if s.get("note") else ""
    text = (
        f"{machine_line(payload)} Loading runs in a fresh process onto a `meta` skeleton "
        f"(`llmslim.hf.from_pretrained`); memory is its peak RSS growth above its RSS right after imports.{note}\n\n"
        + table(["model", "in memory (MiB)", "on disk (MiB)", "disk vs memory", "load: peak RSS growth (MiB)",
                 "growth / checkpoint", "save (s)", "load (s)", "logits bit-exact"], rows)
    )
    if "big_params" in r:
        big_note = f" **Note:** {s['big_note']}" if s.get("big_note") else ""
        big_rows = [[f"LLaMA {r['big_params'] / 1e9:.2f}B (random, {s['big_layers']} blocks), gptq int4 g{s['big_group_size']} {s.get('big_clip', 'mse')}, "
                     f"{s['big_windows']} x 512 tokens", f"{r['big_fp32_bytes'] / mib:.0f}", f"{r['big_checkpoint_bytes'] / mib:.0f}",
                     str(r["big_checkpoint_files"]), f"{r['big_save_peak_rss_growth_bytes'] / mib:.0f}",
                     f"{100 * r['big_save_growth_over_fp32']:.1f}%", f"{r['big_save_seconds']:.0f}",
                     f"{r['big_load_peak_rss_growth_bytes'] / mib:.0f}", f"{r['big_load_growth_over_checkpoint']:.2f}x",
                     f"{r['big_load_seconds']:.1f}", f"{r['big_ppl']:.0f} / {r['big_ppl_float']:.0f}"]]
        text += (
            f"\n\nQuantized from its float32 shards on disk and streamed to a sharded checkpoint block by block "
            f"(`--part big`); both memory figures are peak RSS growth of a fresh process above its RSS right after imports. "
            f"Perplexity is on {s['big_eval_windows']} window(s) of 512 random tokens (a random model: only the ratio "
            f"to float32 means anything).{big_note}\n\n"
            + table(["model", "float32 (MiB)", "checkpoint (MiB)", "files", "quantize + save: peak RSS growth (MiB)",
                     "growth / float32", "quantize + save (s)", "load: peak RSS growth (MiB)", "growth / checkpoint",
                     "load (s)", "perplexity int4 / float32"], big_rows)
        )
    return text


if __name__ == "__main__":
    main()
