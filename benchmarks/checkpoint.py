"""Compressed checkpoints: size on disk, memory while loading onto a meta skeleton, save/load times.

SmolLM2-135M quantized by ``rtn`` int4 g64 (the shipped defaults otherwise: ``lm_head`` stays
float, tied to the embedding) is saved with ``llmslim.hf.save_pretrained``; then, in a fresh
process, ``llmslim.hf.from_pretrained`` builds the ``transformers`` class on the ``meta`` device
and loads the checkpoint into it. Memory is the peak RSS growth of that process above its RSS
right after its imports (torch, transformers' LLaMA modeling code, llmslim, safetensors). The
child's logits on 256 tokens must equal the parent's bit for bit.

Run:  python benchmarks/checkpoint.py [--note TEXT]; then python benchmarks/render_docs.py
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", default="", help="a remark recorded with the results (e.g. other load on the machine)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import llmslim as ls
    from llmslim import data, evaluate, models
    from safetensors.torch import load_file, save_file

    model, tokenizer = models.load_smollm2(progress=False)
    ls.compress_(model, ls.quant.RTN(bits=4, group_size=64), progress=False)
    ids = data.split_tokens(tokenizer, protocol="default").evaluation[:256].view(1, -1)
    tmp = Path(tempfile.mkdtemp(prefix="llmslim-ckpt-"))
    try:
        start = time.perf_counter()
        folder = ls.hf.save_pretrained(model, None, tmp / "smollm2-rtn")
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
        "logits_bit_exact": exact,
    }
    settings = {"model": "SmolLM2-135M-Instruct", "method": "rtn bits=4 group_size=64 (lm_head float, tied)", "tokens": ids.numel(),
                "note": args.note}
    print_table("checkpoint", ["measure", "value"], [[k, v] for k, v in results.items()])
    print(f"wrote {write_result('checkpoint', settings, results, quick=False)}")


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    mib = 2**20
    rows = [[f"{s['model']}, {s['method']}", f"{r['model_bytes'] / mib:.1f}", f"{r['checkpoint_bytes'] / mib:.1f}",
             f"{100 * (r['disk_over_memory'] - 1):+.2f}%", f"{r['load_peak_rss_growth_bytes'] / mib:.1f}",
             f"{r['growth_over_checkpoint']:.2f}x", f"{r['save_seconds']:.2f}", f"{r['load_seconds']:.2f}",
             "yes" if r["logits_bit_exact"] else "NO"]]
    note = f" **Note:** {s['note']}" if s.get("note") else ""
    return (
        f"{machine_line(payload)} Loading runs in a fresh process onto a `meta` skeleton "
        f"(`llmslim.hf.from_pretrained`); memory is its peak RSS growth above its RSS right after imports.{note}\n\n"
        + table(["model", "in memory (MiB)", "on disk (MiB)", "disk vs memory", "load: peak RSS growth (MiB)",
                 "growth / checkpoint", "save (s)", "load (s)", "logits bit-exact"], rows)
    )


if __name__ == "__main__":
    main()
