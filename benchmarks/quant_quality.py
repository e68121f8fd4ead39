"""Quality, size and compression time of weight quantization on SmolLM2-135M and all-MiniLM-L6-v2,
ours (rtn, gptq, and the smoothquant+w8a8 / fp8 passes when registered) side by side with torchao
0.18 and ``torch.ao`` in the same run; a GPTQ ablation; the issue's targets, met or not.

Every SmolLM2 row: perplexity on the docs-text evaluation windows, its ratio to float32, KL
divergence to float32, bytes per weight of the quantized linears (codes, scales, zero points),
model bytes, and the wall time of the compression. GPTQ calibrates on seeded 512-token windows of
the calibration split. MiniLM rows: embedding fidelity (mean cosine similarity of sentence
embeddings to the float model's) on evaluation-split sentences.

Run:  python benchmarks/quant_quality.py [--quick] [--only NAME,...]; then python benchmarks/render_docs.py
``--only`` takes row names or section names (``smollm2``, ``ablation``, ``minilm``); the rows run
are merged into the existing result file, so pieces can be rerun (or run in parallel processes).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _quant_peers as peers  # noqa: E402
from _common import RESULTS, machine_line, print_table, table, write_result  # noqa: E402
from _quant_targets import evaluate_targets  # noqa: E402
from llmslim import compress_, data, evaluate, get_pass, models  # noqa: E402
from llmslim.errors import LlmslimError  # noqa: E402
from llmslim.quant import RTN  # noqa: E402
from llmslim.quant.gptq import GPTQ  # noqa: E402

# GPTQ's settings in the main rows (the ablation varies each): the pass's defaults, act-order with
# static groups and a Hessian-weighted MSE search of each group's range
GPTQ_BEST: dict[str, Any] = dict(act_order=True, clip="mse", damp=0.01)

SMOLLM2: dict[str, dict[str, Any]] = {
    "rtn int8": dict(method="rtn", bits=8, group_size=None),
    "rtn int8 bfloat16 scales": dict(method="rtn", bits=8, group_size=None, scale_dtype="bfloat16"),
    "rtn int8 symmetric": dict(method="rtn", bits=8, group_size=None, symmetric=True),
    "rtn int4 g128": dict(method="rtn", bits=4, group_size=128),
    "rtn int4 g128 mse": dict(method="rtn", bits=4, group_size=128, clip="mse"),
    "rtn int4 g128 hqq": dict(method="rtn", bits=4, group_size=128, clip="hqq"),
    "rtn int4 g64": dict(method="rtn", bits=4, group_size=64),
    "rtn int4 g64 mse": dict(method="rtn", bits=4, group_size=64, clip="mse"),
    "rtn int4 g64 hqq": dict(method="rtn", bits=4, group_size=64, clip="hqq"),
    "rtn int4 g64 mse + int8 embedding": dict(method="rtn", bits=4, group_size=64, clip="mse", embeddings=True),
    "rtn int3 g128": dict(method="rtn", bits=3, group_size=128),
    "rtn int3 g128 mse": dict(method="rtn", bits=3, group_size=128, clip="mse"),
    "gptq int4 g128": dict(method="gptq", bits=4, group_size=128, **GPTQ_BEST),
    "gptq int4 g64": dict(method="gptq", bits=4, group_size=64, **GPTQ_BEST),
    "gptq int3 g128": dict(method="gptq", bits=3, group_size=128, **GPTQ_BEST),
    "torchao int8 weight-only": dict(method="torchao", config="int8 weight-only"),
    "torchao int8 dynamic": dict(method="torchao", config="int8 dynamic"),
    "torchao int4 weight-only g64": dict(method="torchao", config="int4 weight-only", group_size=64),
    "torchao int4 weight-only g128": dict(method="torchao", config="int4 weight-only", group_size=128),
    "torchao int4 hqq g64": dict(method="torchao", config="int4 hqq", group_size=64),
    "torchao intx int4 g64 asymmetric": dict(method="torchao", config="intx4 asymmetric", group_size=64),
    "torchao intx int4 g64 hqq scale-only": dict(method="torchao", config="intx4 hqq scale-only", group_size=64),
    "torchao hqq g64 params (dequantized)": dict(method="torchao-hqq", group_size=64),
    "torch.ao quantize_dynamic": dict(method="torch.ao"),
    "smoothquant+w8a8": dict(method="registry", passes=["smoothquant", "w8a8"]),
    "fp8": dict(method="registry", passes=["fp8"]),
    "fp8 clip=mse": dict(method="fp8", clip="mse"),
    "fp8 clip=minmax": dict(method="fp8", clip="minmax"),
}
# one change at a time from "gptq int4 g64"; "calibration" is the number of 512-token windows
ABLATION: dict[str, dict[str, Any]] = {
    "act_order=False": dict(act_order=False),
    "clip=minmax": dict(clip="minmax"),
    "clip=hqq": dict(clip="hqq"),
    "group_size=128": dict(group_size=128),
    "calibration=16": dict(calibration=16),
    "calibration=64": dict(calibration=64),
    "calibration=128": dict(calibration=128),
    "calibration=128 true_sequential=False": dict(calibration=128, true_sequential=False),
    "damp=0.001": dict(damp=0.001),
    "damp=0.1": dict(damp=0.1),
    "true_sequential=False": dict(true_sequential=False),
    "symmetric=True": dict(symmetric=True),
}
MINILM: dict[str, dict[str, Any]] = {
    "rtn int8": dict(method="rtn", bits=8, group_size=None),
    "rtn int4 g64": dict(method="rtn", bits=4, group_size=64),
    "rtn int4 g64 hqq": dict(method="rtn", bits=4, group_size=64, clip="hqq"),
    "gptq int4 g64": dict(method="gptq", bits=4, group_size=64, **GPTQ_BEST),
    "torchao int8 weight-only": dict(method="torchao", config="int8 weight-only"),
    "torchao int4 weight-only g64": dict(method="torchao", config="int4 weight-only", group_size=64),
    "torchao intx int4 g64 asymmetric": dict(method="torchao", config="intx4 asymmetric", group_size=64),
    "torchao hqq g64 params (dequantized)": dict(method="torchao-hqq", group_size=64),
}


@torch.no_grad()
def reference_logprobs(reference: torch.nn.Module, ids: torch.Tensor, windows: int) -> list[torch.Tensor] | None:
    """The float model's log-probabilities per window, kept when small enough (<= 64 windows,
    6.4 GB) so each row needs one forward per window instead of two."""
    if windows > 64:
        return None
    return [torch.log_softmax(reference(input_ids=chunk).logits.float(), -1) for chunk in data.windows(ids, 512, windows).split(1)]


@torch.no_grad()
def score(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor, windows: int,
          cached: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Perplexity of ``model`` and mean ``KL(reference || model)`` over the same windows (the
    numbers of ``evaluate.perplexity`` and ``evaluate.kl_divergence``) in one pass."""
    nll = kl = 0.0
    count = positions = 0
    for i, chunk in enumerate(data.windows(ids, 512, windows).split(1)):
        logq = torch.log_softmax(model(input_ids=chunk).logits.float(), -1)
        logp = cached[i] if cached is not None else torch.log_softmax(reference(input_ids=chunk).logits.float(), -1)
        nll -= logq[:, :-1].gather(-1, chunk[:, 1:, None]).double().sum().item()
        count += chunk[:, 1:].numel()
        kl += F.kl_div(logq, logp, log_target=True, reduction="sum").double().item()
        positions += chunk.numel()
    return math.exp(nll / count), kl / positions


def compress(model: torch.nn.Module, spec: dict[str, Any], calibration: list[Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Apply one row's method to ``model`` (in place where possible); return the model and notes.

    Raises:
        peers.Unavailable: The method does not run here.
    """
    cfg = {k: v for k, v in spec.items() if k not in ("method", "calibration")}
    method = spec["method"]
    if method == "rtn":
        compress_(model, RTN(**cfg), progress=False)
    elif method == "gptq":
        report = compress_(model, GPTQ(**cfg), calibration=calibration, progress=False)
        retries = sum(int(r.info.get("cholesky_retries", 0)) for r in report.all_rows)
        return model, {"calibration_windows": len(calibration), "cholesky_retries": retries}
    elif method == "torchao":
        return model, peers.torchao_(model, cfg["config"], cfg.get("group_size"))
    elif method == "torchao-hqq":
        return model, peers.torchao_hqq_dequantized_(model, cfg["group_size"])
    elif method == "torch.ao":
        return peers.quantize_dynamic(model), {}
    elif method == "fp8":
        compress_(model, get_pass("fp8")(**cfg), progress=False)
    elif method == "registry":
        try:
            passes = [get_pass(name)() for name in cfg["passes"]]
        except (LlmslimError, ImportError) as exc:
            raise peers.Unavailable(f"not registered here: {exc}") from exc
        compress_(model, *passes, calibration=calibration, progress=False)
        return model, {"passes": [p.to_spec() if hasattr(p, "to_spec") else type(p).__name__ for p in passes]}
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, {}


def run_row(model, reference, spec, calibration, measure) -> dict[str, Any]:
    """Compress a copy of ``model`` by ``spec``, time it, measure it; a method that cannot run
    records why."""
    quantized = copy.deepcopy(model)
    names = peers.target_names(model)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    start = time.perf_counter()
    try:
        quantized, notes = compress(quantized, spec, calibration)
    except peers.Unavailable as exc:
        return {"skipped": str(exc)}
    seconds = time.perf_counter() - start
    row = {**measure(quantized), **peers.linear_bytes(quantized, names, shapes), "model_bytes": peers.model_bytes(quantized),
           "seconds": seconds, **{k: v for k, v in notes.items() if v is not None}}
    if spec["method"] == "torchao-hqq":
        row["bytes_per_weight"] = None  # dequantized float weights: quality only
    return row


def _selected(only: set[str] | None, section: str, name: str) -> bool:
    return only is None or section in only or name in only or f"{section}:{name}" in only


def smollm2_section(args, only, results, save) -> None:
    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="default")
    calibrations: dict[int, list[Any]] = {}

    def calibration(n: int) -> list[Any]:
        if n not in calibrations:
            calibrations[n] = data.calibration_batches(text=split.calibration, n_samples=n, seq_len=512, seed=0)
        return calibrations[n]

    def measure(m: torch.nn.Module) -> dict[str, float]:
        ppl, kl = score(m, model, split.evaluation, args.windows, cached)
        return {"perplexity": ppl, "perplexity_ratio": ppl / base, "kl": kl}

    cached = reference_logprobs(model, split.evaluation, args.windows)
    base, _ = score(model, model, split.evaluation, args.windows, cached)
    names = peers.target_names(model)
    results["float32"] = {"perplexity": base, "model_bytes": peers.model_bytes(model), "bytes_per_weight": 4.0,
                          "quantized_layers": len(names)}
    rows = results.setdefault("smollm2", {})
    for name, spec in SMOLLM2.items():
        if _selected(only, "smollm2", name):
            n = spec.get("calibration", args.calibration)
            rows[name] = {"config": spec, **run_row(model, model, spec, calibration(n) if spec["method"] in ("gptq", "registry") else [], measure)}
            print(name, _brief(rows[name]), flush=True)
            save(results, "smollm2", name)
    ablation = results.setdefault("ablation", {})
    base_spec = SMOLLM2["gptq int4 g64"]
    for name, change in ABLATION.items():
        if not _selected(only, "ablation", name) or change.get("calibration") == args.calibration:
            continue
        spec = {**base_spec, **change}
        ablation[name] = {"change": change, **run_row(model, model, spec, calibration(spec.get("calibration", args.calibration)), measure)}
        print("ablation", name, _brief(ablation[name]), flush=True)
        save(results, "ablation", name)


def minilm_section(args, only, results, save) -> None:
    encoder, tokenizer = models.load_minilm(progress=False)
    sentences = data.docs_sentences(args.sentences)
    calibration = data.calibration_batches(tokenizer, n_samples=args.calibration, seq_len=256, seed=0)

    def measure(m: torch.nn.Module) -> dict[str, float]:
        return {"fidelity": evaluate.embedding_fidelity(m, encoder, tokenizer, sentences)}

    rows = results.setdefault("minilm", {})
    rows["float32"] = {"fidelity": 1.0, "bytes_per_weight": 4.0, "model_bytes": peers.model_bytes(encoder)}
    save(results, "minilm", "float32")
    for name, spec in MINILM.items():
        if _selected(only, "minilm", name):
            rows[name] = {"config": spec, **run_row(encoder, encoder, spec, calibration, measure)}
            print("minilm", name, _brief(rows[name]), flush=True)
            save(results, "minilm", name)


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k not in ("config", "change")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 evaluation windows (32 without), 64 MiniLM sentences (256)")
    parser.add_argument("--only", default=None, help="comma-separated row or section names (smollm2, ablation, minilm)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 suits a machine other jobs share)")
    args = parser.parse_args()
    args.windows, args.calibration, args.sentences = (16, 32, 64) if args.quick else (32, 32, 256)
    only = None if args.only is None else {s.strip() for s in args.only.split(",") if s.strip()}
    torch.set_num_threads(args.threads)
    settings = {"windows": args.windows, "seq_len": 512, "protocol": "default", "calibration_windows": args.calibration,
                "minilm_sentences": args.sentences, "gptq_best": GPTQ_BEST, "scale_dtype": "auto"}
    path = RESULTS / f"quant_quality{'-quick' if args.quick else ''}.json"
    results: dict[str, Any] = {}
    if only is not None and path.exists():  # a partial rerun updates the rows it runs
        old = json.loads(path.read_text())
        if old["settings"].get("windows") == args.windows:
            results = old["results"]
    ran: dict[str, dict[str, Any]] = {"smollm2": {}, "ablation": {}, "minilm": {}}

    def save(current: dict[str, Any], section: str | None = None, name: str | None = None) -> None:
        # after every row, so a long run that is stopped keeps what it measured; rows another
        # process wrote meanwhile (--only in parallel) are kept
        if section is not None:
            ran[section][name] = current[section][name]
        merged = current
        previous = json.loads(path.read_text()) if only is not None and path.exists() else None
        if previous is not None and previous["settings"].get("windows") == args.windows:
            merged = {k: v for k, v in previous["results"].items() if k in ("float32", *ran)}  # drops stale keys
            for key, rows in ran.items():
                merged.setdefault(key, {}).update(rows)
            merged["float32"] = current.get("float32", merged.get("float32"))
        merged["targets"] = evaluate_targets(merged)
        write_result("quant_quality", settings, merged, quick=args.quick)
        current["targets"] = merged["targets"]

    if only is None or only & {"smollm2", "ablation"} or any(n in SMOLLM2 or n in ABLATION for n in only):
        smollm2_section(args, only, results, save)
    if only is None or "minilm" in only or any(n.startswith("minilm:") for n in only):
        minilm_section(args, only, results, save)
    save(results)
    final = json.loads(path.read_text())["results"]
    print_table("targets", ["target", "measured", "met"], [[t["target"], t["measured"], t["met"]] for t in final["targets"]])
    print(f"wrote {path}")


def _mb(v: Any) -> Any:
    return v / 1e6 if isinstance(v, (int, float)) else "-"


def _skip_cell(row: dict[str, Any]) -> str:
    return f"did not run: {row['skipped']}"


def _ordered(rows: dict[str, Any], order: dict[str, Any]) -> list[tuple[str, Any]]:
    # rows in the script's order, whichever process (--only) wrote them first
    keys = list(order)
    return sorted(rows.items(), key=lambda kv: keys.index(kv[0]) if kv[0] in keys else len(keys))


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    f32 = r["float32"]
    head = ["SmolLM2-135M", "perplexity", "ratio", "KL (nats/token)", "bytes/weight", "float layers", "model MB", "seconds"]
    main = [["float32", f32["perplexity"], 1.0, 0.0, 4.0, 0, _mb(f32["model_bytes"]), "-"]]
    skipped = []
    for name, v in _ordered(r.get("smollm2", {}), SMOLLM2):
        if "skipped" in v:
            skipped.append(f"- `{name}`: {v['skipped']}")
            continue
        bpw = v["bytes_per_weight"] if v["bytes_per_weight"] is not None else "n/a (simulated)"
        main.append([name, v["perplexity"], v["perplexity_ratio"], v["kl"], bpw, v["float_layers"], _mb(v["model_bytes"]), v["seconds"]])
    abl = r.get("ablation", {})
    base = r.get("smollm2", {}).get("gptq int4 g64", {})
    abl_rows = [["(gptq int4 g64 as shipped)", base.get("perplexity", "-"), base.get("perplexity_ratio", "-"), base.get("kl", "-"), base.get("seconds", "-")]]
    abl_rows += [[name, v["perplexity"], v["perplexity_ratio"], v["kl"], v["seconds"]] if "skipped" not in v else [name, "-", "-", "-", "-"]
                 for name, v in _ordered(abl, ABLATION)]
    mini = [[name, v["fidelity"], v["bytes_per_weight"] if v.get("bytes_per_weight") is not None else "n/a (simulated)",
             v.get("seconds", "-")] if "skipped" not in v else [name, _skip_cell(v), "-", "-"] for name, v in _ordered(r.get("minilm", {}), {"float32": None, **MINILM})]
    targets = table(["target", "measured", "met"], [[t["target"], t["measured"], "yes" if t["met"] is True else ("**no**" if t["met"] is False else t["met"])]
                                                    for t in r["targets"]])
    best = ", ".join(f"{k}={v}" for k, v in s["gptq_best"].items())
    parts = [
        f"{machine_line(payload)} Perplexity and KL divergence to float32 on the first {s['windows']} windows of "
        f"{s['seq_len']} tokens of the docs-text evaluation split ({s['protocol']} protocol); GPTQ calibrates on "
        f"{s['calibration_windows']} seeded 512-token windows of the calibration split ({best}; float32 scales at "
        f"8 bits and bfloat16 below unless said, asymmetric unless said). bytes/weight counts the quantized linears' codes, scales and zero points (biases "
        f"excluded); `float layers` counts targeted linears left in float. `lm_head` and the embedding stay float32 "
        f"except in the `+ int8 embedding` row (the tied table in int8 per row, `lm_head` reading it). Seconds are the compression's wall time on a machine shared with other jobs (distorted, "
        f"upper bounds). The weights come from a GGUF Q4_1 file (4-bit, groups of 32), so int4 g32 would be "
        f"near-lossless and is not shown.",
        table(head, main),
    ]
    if skipped:
        parts.append("Peer methods that did not run here, with the reason:\n\n" + "\n".join(skipped))
    parts += [f"GPTQ ablation (one change at a time from `gptq int4 g64`):\n\n{table(['change', 'perplexity', 'ratio', 'KL', 'seconds'], abl_rows)}",
              f"all-MiniLM-L6-v2, embedding fidelity (mean cosine similarity to float32 over {s['minilm_sentences']} "
              f"evaluation-split sentences):\n\n{table(['MiniLM', 'fidelity', 'bytes/weight', 'seconds'], mini)}",
              f"Targets (issue 6):\n\n{targets}"]
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
