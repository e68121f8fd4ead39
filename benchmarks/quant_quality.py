"""Quality and size of round-to-nearest quantization on SmolLM2-135M: perplexity ratio and KL
divergence to float32, bytes per weight of the quantized linear layers (scales and zero points
included), for int8 and int4 g64/g128 with min/max grids and with the clipping searches.

Run:  python benchmarks/quant_quality.py [--quick]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, print_table, table, write_result  # noqa: E402
from llmslim import compress_, data, evaluate, models  # noqa: E402
from llmslim.quant import RTN, QuantLinear  # noqa: E402

CONFIGS = {
    "int8": dict(bits=8, group_size=None),
    "int4 g128": dict(bits=4, group_size=128),
    "int4 g128 mse": dict(bits=4, group_size=128, clip="mse"),
    "int4 g128 hqq": dict(bits=4, group_size=128, clip="hqq"),
    "int4 g64": dict(bits=4, group_size=64),
    "int4 g64 mse": dict(bits=4, group_size=64, clip="mse"),
}
# most bytes per weight allowed (codes, scales and zero points of the quantized linears)
TARGETS = {"int8": 1.02, "int4 g128": 0.56, "int4 g64": 0.59}


def bytes_per_weight(model: torch.nn.Module) -> float:
    """Storage of the QuantLinear layers' codes, scales and zero points per weight they hold."""
    held = weights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m._tied_to is None:
            held += evaluate.model_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
            weights += m.in_features * m.out_features
    return held / weights


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 windows instead of 64")
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = {"windows": 4 if args.quick else 64, "seq_len": 512, "protocol": "default", "configs": CONFIGS}
    model, tokenizer = models.load_smollm2(progress=False)
    ids = data.split_tokens(tokenizer, protocol="default").evaluation
    base = evaluate.perplexity(model, ids, max_windows=settings["windows"], progress=False)
    results = {"float32": {"perplexity": base, "model_bytes": evaluate.model_bytes(model)}, "configs": {}}
    for name, cfg in CONFIGS.items():
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        report = compress_(quantized, RTN(**cfg), progress=False)
        seconds = time.perf_counter() - start
        ppl = evaluate.perplexity(quantized, ids, max_windows=settings["windows"], progress=False)
        kl = evaluate.kl_divergence(quantized, model, ids, max_windows=settings["windows"], progress=False)
        errors = [r.error for r in report.all_rows if r.error is not None]
        results["configs"][name] = {
            "perplexity": ppl, "perplexity_ratio": ppl / base, "kl": kl, "bytes_per_weight": bytes_per_weight(quantized),
            "model_bytes": evaluate.model_bytes(quantized), "mean_weight_error": sum(errors) / len(errors), "seconds": seconds,
        }
        print(name, {k: round(v, 4) for k, v in results["configs"][name].items()}, flush=True)
        del quantized
    results["targets"] = [
        {"config": n, "max_bytes_per_weight": t, "bytes_per_weight": results["configs"][n]["bytes_per_weight"],
         "met": results["configs"][n]["bytes_per_weight"] <= t}
        for n, t in TARGETS.items()
    ]
    print_table("rtn on SmolLM2-135M", ["config", "ppl ratio", "KL", "B/weight"],
                [[n, v["perplexity_ratio"], v["kl"], v["bytes_per_weight"]] for n, v in results["configs"].items()])
    print(f"wrote {write_result('quant_quality', settings, results, quick=args.quick)}")


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    rows = [["float32", r["float32"]["perplexity"], 1.0, 0.0, 4.0, r["float32"]["model_bytes"], "-"]]
    rows += [[n, v["perplexity"], v["perplexity_ratio"], v["kl"], v["bytes_per_weight"], v["model_bytes"], v["mean_weight_error"]]
             for n, v in r["configs"].items()]
    body = table(["SmolLM2-135M", "perplexity", "ratio", "KL (nats/token)", "bytes/weight", "model bytes", "mean rel. weight error"], rows)
    targets = table(["config", "bytes/weight", "target", "met"],
                    [[t["config"], t["bytes_per_weight"], f"<= {t['max_bytes_per_weight']}", "yes" if t["met"] else "**no**"] for t in r["targets"]])
    return (
        f"{machine_line(payload)} Perplexity and KL on the first {s['windows']} windows of {s['seq_len']} tokens "
        f"({s['protocol']} protocol). `rtn` with its defaults otherwise (asymmetric, bfloat16 scales, `lm_head` "
        f"and the embedding left in float32); bytes/weight counts the quantized linears' codes, scales and zero "
        f"points.\n\n{body}\n\n{targets}"
    )


if __name__ == "__main__":
    main()
