"""Speed of packed low-bit layers: ``QuantLinear`` against float32 ``F.linear``, and whole
SmolLM2-135M (prefill, decode, perplexity) float32 vs ``rtn`` int4 g64 vs ``rtn`` int8; and the
``w8a8`` layer and ``smoothquant`` + ``w8a8`` SmolLM2 (benchmarks/_w8a8_speed.py).

Layers: 4096x4096 and 4096x11008 (out x in), 1 token (decoding) and 128 tokens (prefill),
float32 in and out, int8 per channel (symmetric) and int4 g128 (asymmetric). Candidates of one
shape and token count are timed interleaved in one process. torchao's weight-only layers
(``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``, eager, bfloat16 in and out as they are
meant to be used) join when torchao is installed.

Run:  python benchmarks/quant_speed.py [--quick] [--only w8a8]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved, machine_line, print_table, read_bandwidth, table, write_result  # noqa: E402
import _w8a8_speed  # noqa: E402
from llmslim import compress_, data, evaluate, models  # noqa: E402
from llmslim.quant import RTN, QuantLinear  # noqa: E402
from llmslim.testing import make_weight  # noqa: E402

SHAPES = ((4096, 4096), (4096, 11008))
TOKENS = (1, 128)
LAYERS = {"int8": dict(bits=8, group_size=None, symmetric=True), "int4 g128": dict(bits=4, group_size=128, symmetric=False)}
# minimum speedup over float32: (shape, tokens, layer) -> x
TARGETS = {
    ("4096x4096", 1, "int8"): 3.0,
    ("4096x4096", 1, "int4 g128"): 4.3,
    ("4096x11008", 1, "int8"): 2.5,
    ("4096x11008", 1, "int4 g128"): 3.3,
    **{(f"{n}x{k}", 128, layer): 1.5 for n, k in SHAPES for layer in LAYERS},
}
SMOLLM2 = {"float32": None, "rtn int4 g64": dict(bits=4, group_size=64), "rtn int8": dict(bits=8, group_size=None)}


def _torchao_layers(weight: torch.Tensor) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception:  # not installed, or built for another torch
        return {}
    out = {}
    for name, config in (("torchao int8", Int8WeightOnlyConfig()), ("torchao int4 g128", Int4WeightOnlyConfig(group_size=128))):
        layer = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)).to(torch.bfloat16)
        with torch.no_grad():
            layer[0].weight.copy_(weight)
        try:
            quantize_(layer, config)
        except Exception as exc:  # a config this torch/CPU cannot run
            print(f"skip {name}: {type(exc).__name__}: {exc}")
            continue
        out[name] = layer
    return out


@torch.no_grad()
def layer_speed(repeat: int) -> list[dict[str, Any]]:
    rows = []
    for n, k in SHAPES:
        w = make_weight((n, k), seed=0)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        ours = {name: QuantLinear.from_float(lin, **cfg) for name, cfg in LAYERS.items()}
        peers = _torchao_layers(w)
        for tokens in TOKENS:
            x = torch.randn(tokens, k)
            fns = {"float32": lambda: F.linear(x, w)}
            fns.update({name: (lambda m=m: m(x)) for name, m in ours.items()})
            fns.update({name: (lambda m=m: m(x.to(torch.bfloat16)).float()) for name, m in peers.items()})
            ms = {name: 1e3 * t for name, t in interleaved(fns, warmup=2, repeat=repeat).items()}
            weight_bytes = {"float32": w.numel() * 4, **{name: _held_bytes(m) for name, m in ours.items()}}
            rows.append({
                "shape": f"{n}x{k}", "tokens": tokens, "ms": ms,
                "speedup": {name: ms["float32"] / t for name, t in ms.items() if name != "float32"},
                "kernel": {name: m.kernel_for(tokens) for name, m in ours.items()},
                "weight_bytes": weight_bytes,
            })
            print(rows[-1]["shape"], tokens, {name: round(v, 3) for name, v in ms.items()}, flush=True)
    return rows


def _held_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@torch.no_grad()
def smollm2(windows: int, repeat: int) -> dict[str, Any]:
    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="default")
    variants = {}
    for name, cfg in SMOLLM2.items():
        m = model if cfg is None else copy.deepcopy(model)
        if cfg is not None:
            compress_(m, RTN(**cfg), progress=False)
        variants[name] = m
    out: dict[str, Any] = {}
    for name, m in variants.items():
        out[name] = {"bytes": evaluate.model_bytes(m), "perplexity": evaluate.perplexity(m, split.evaluation, max_windows=windows, progress=False)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeat):  # interleaved: every variant once per round
        for name, m in variants.items():
            runs[name].append(evaluate.decode_speed(m, split.evaluation, new_tokens=32, prefill_tokens=128, repeat=1))
    for name, rs in runs.items():
        for key in ("prefill_ms", "decode_tokens_per_s"):
            values = sorted(r[key] for r in rs)
            out[name][key] = values[len(values) // 2]
    return out


def _targets(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for row in layers:
        for layer in LAYERS:
            want = TARGETS.get((row["shape"], row["tokens"], layer))
            if want is not None:
                got = row["speedup"][layer]
                rows.append({"shape": row["shape"], "tokens": row["tokens"], "layer": layer, "target": want, "speedup": got, "met": got >= want})
    return rows


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    names = [n for n in r["layers"][0]["ms"] if n != "float32"]
    bw = s.get("read_bandwidth_gbs")
    ours = [n for n in LAYERS if n in names]

    def floor(row: dict[str, Any]) -> str:
        # the time to read each weight once at the measured bandwidth: what a one-token GEMV cannot beat
        if bw is None or "weight_bytes" not in row or row["tokens"] != 1:
            return "-"
        return " / ".join(f"{row['weight_bytes'][n] / bw / 1e6:.3g}" for n in ("float32", *ours))

    layer_rows = [
        [row["shape"], row["tokens"], row["ms"]["float32"], *[f"{row['ms'][n]:.3g} ({row['speedup'][n]:.2f}x)" for n in names], floor(row)]
        for row in r["layers"]
    ]
    layers = table(["out x in", "tokens", "float32 (ms)", *[f"{n} (ms, speedup)" for n in names],
                    f"read floor (ms): {' / '.join(('float32', *ours))}"], layer_rows)
    targets = table(
        ["out x in", "tokens", "layer", "target", "measured", "met"],
        [[t["shape"], t["tokens"], t["layer"], f"{t['target']}x", f"{t['speedup']:.2f}x", "yes" if t["met"] else "**no**"] for t in r["targets"]],
    )
    smol = table(
        ["SmolLM2-135M", "weight bytes", "perplexity", "prefill 128 tok (ms)", "decode (tok/s)", "decode ceiling (tok/s)"],
        [[n, v["bytes"], v["perplexity"], v["prefill_ms"], v["decode_tokens_per_s"], bw * 1e9 / v["bytes"] if bw else "-"]
         for n, v in r["smollm2"].items()],
    )
    ceiling = (f" The read floor and the decode ceiling divide the bytes of the weights by this machine's measured "
               f"read bandwidth, {bw:.1f} GB/s (summing a 512 MB float32 tensor): no kernel that reads every weight "
               f"once per token can beat them." if bw else "")
    kernels = ", ".join(f"{n}: {k}" for n, k in r["layers"][0]["kernel"].items())
    return (
        f"{machine_line(payload)} Median of {s['repeat']} interleaved runs after warm-up; {s['threads']} threads. "
        f"Paths at 1 token: {kernels}; at 128 tokens every QuantLinear dequantizes into a reused buffer and runs "
        f"the bfloat16 GEMM.\n\n{layers}\n\n{targets}\n\n"
        f"Whole model, batch 1: perplexity on the first {s['windows']} windows of the default protocol; speed "
        f"as in the baseline (median of {s['repeat']} interleaved runs, 32 decoded tokens). `rtn int4 g64` and "
        f"`rtn int8` quantize every linear layer except `lm_head`.{ceiling}\n\n{smol}"
    ) + (f"\n\n{_w8a8_speed.render_markdown(r['w8a8'])}" if "w8a8" in r else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and perplexity windows")
    parser.add_argument("--only", choices=["w8a8"], help="run only this part (written to results/quant_speed_w8a8[-quick].json)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 resists a crowded machine: no spinning barriers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only == "w8a8":
        part = _w8a8_speed.run(args.quick, args.threads)
        print(f"wrote {write_result('quant_speed_w8a8', part.pop('settings'), part, quick=args.quick)}")
        return
    settings = {"threads": args.threads, "repeat": 5 if args.quick else 15, "windows": 4 if args.quick else 16, "layers": {n: dict(c) for n, c in LAYERS.items()}}
    settings["read_bandwidth_gbs"] = read_bandwidth() / 1e9
    print(f"read bandwidth {settings['read_bandwidth_gbs']:.1f} GB/s", flush=True)
    layers = layer_speed(settings["repeat"])
    results = {"layers": layers, "targets": _targets(layers), "smollm2": smollm2(settings["windows"], 3 if args.quick else 5)}
    results["w8a8"] = _w8a8_speed.run(args.quick, args.threads)
    print_table("targets", ["shape", "tokens", "layer", "target", "speedup", "met"], [list(t.values()) for t in results["targets"]])
    print_table("SmolLM2-135M", ["variant", *next(iter(results["smollm2"].values()))], [[n, *v.values()] for n, v in results["smollm2"].items()])
    print(f"wrote {write_result('quant_speed', settings, results, quick=args.quick)}")


if __name__ == "__main__":
    main()
