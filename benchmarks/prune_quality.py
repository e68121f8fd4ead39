"""Pruning quality on SmolLM2-135M: magnitude 50% and 2:4, side by side with torch.nn.utils.prune.

Every linear layer of the decoder blocks (``model.layers.*``: attention and MLP projections; the
embedding and the tied LM head stay dense) is pruned by

* ``magnitude`` at 50% unstructured, each layer on its own (``scope="layer"``);
* ``magnitude`` 2:4 (every group of 4 input weights keeps 2);
* ``torch.nn.utils.prune.l1_unstructured`` at 50% per layer, then ``prune.remove``: the same
  criterion from PyTorch itself, as a reference.

llmslim's models are finalized with compressed storage and float16 values (the real end product,
evaluated as it is); for each, perplexity on the docs-text protocol (ratio to dense), mean KL
divergence to the dense model, and the compressed weight bytes of the pruned layers over their
dense float16 bytes. Wanda and SparseGPT columns come with the calibration-based passes.

Run:  python benchmarks/prune_quality.py [--quick]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmslim as ls  # noqa: E402
from _common import machine_line, print_table, table, write_result  # noqa: E402
from llmslim import data, evaluate, models  # noqa: E402
from llmslim.prune import Magnitude  # noqa: E402

TARGETS = ("model.layers.*",)


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, nn.Linear)]


def _llmslim(pattern: str) -> Callable[[nn.Module], dict[str, Any]]:
    def run(model: nn.Module) -> dict[str, Any]:
        p = Magnitude(pattern=pattern, targets=TARGETS, storage="compressed", value_dtype="float16")
        report = ls.compress_(model, p, progress=False)
        rows = report.children[-1].rows  # finalize: one SparseLinear per pruned linear
        layers = [model.get_submodule(r.module) for r in rows]
        stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())  # values + bitmask/indices
        fp16 = sum(r.info["bytes_fp16"] for r in rows)
        return {
            "layers": len(rows),
            "sparsity": sum(m.weight_sparsity * m.in_features * m.out_features for m in layers) / (fp16 / 2),
            "bytes_ratio": stored / fp16,
            "storage": sorted({r.info["storage"] for r in rows}),
        }

    return run


def _torch_l1(model: nn.Module) -> dict[str, Any]:
    from torch.nn.utils import prune

    layers = _linears(model)
    for _, m in layers:
        prune.l1_unstructured(m, "weight", amount=0.5)
        prune.remove(m, "weight")
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(m.weight.numel() for _, m in layers)
    return {"layers": len(layers), "sparsity": zeros / total, "bytes_ratio": None, "storage": ["dense"]}


METHODS: dict[str, tuple[str, str, Callable[[nn.Module], dict[str, Any]]]] = {
    "magnitude-50": ("llmslim magnitude", "50% unstructured", _llmslim("unstructured")),
    "magnitude-2:4": ("llmslim magnitude", "2:4", _llmslim("2:4")),
    "torch-l1-50": ("torch.nn.utils.prune l1_unstructured", "50% unstructured", _torch_l1),
}


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    rows = [["dense (float32)", "-", 0.0, r["dense_perplexity"], 1.0, 0.0, "-", "-"]]
    for key, (method, pattern, _) in METHODS.items():
        m = r[key]
        ratio = "-" if m["bytes_ratio"] is None else m["bytes_ratio"]
        rows.append([method, pattern, m["sparsity"], m["perplexity"], m["perplexity"] / r["dense_perplexity"], m["kl"], ratio, m["seconds"]])
    body = table(
        ["method", "pattern", "sparsity", "perplexity", "ratio to dense", "KL to dense (nats)", "weight bytes / dense fp16", "prune (s)"],
        rows,
    )
    return (
        f"{machine_line(payload)} SmolLM2-135M-Instruct, the {r['magnitude-50']['layers']} linear layers of "
        f"`model.layers.*` pruned; perplexity and KL on the first {s['windows']} windows of {s['seq_len']} tokens "
        f"(`{s['protocol']}` protocol). Weight bytes: the compressed storage `finalize` leaves (float16 values plus a "
        f"bitmask, or 2-bit indices for 2:4) over the same layers' dense float16 bytes.\n\n{body}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 windows instead of 32")
    args = parser.parse_args()
    settings = {"windows": 4 if args.quick else 32, "seq_len": 512, "protocol": "default", "targets": list(TARGETS)}
    torch.manual_seed(0)

    dense, tokenizer = models.load_smollm2(progress=False)
    tokens = data.split_tokens(tokenizer, protocol=settings["protocol"]).evaluation
    measure = {"seq_len": settings["seq_len"], "max_windows": settings["windows"], "progress": False}
    results: dict[str, Any] = {"dense_perplexity": evaluate.perplexity(dense, tokens, **measure)}
    table_rows = [["dense", "-", 0.0, results["dense_perplexity"], 1.0, 0.0, "-"]]
    for key, (method, pattern, run) in METHODS.items():
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        out = run(model)
        out["seconds"] = time.perf_counter() - start
        out["perplexity"] = evaluate.perplexity(model, tokens, **measure)
        out["kl"] = evaluate.kl_divergence(model, dense, tokens, **measure)
        results[key] = out
        ratio = out["perplexity"] / results["dense_perplexity"]
        table_rows.append([method, pattern, out["sparsity"], out["perplexity"], ratio, out["kl"], out["bytes_ratio"] or "-"])
        del model

    print_table("pruning quality, SmolLM2-135M", ["method", "pattern", "sparsity", "perplexity", "ratio", "KL", "bytes/fp16"], table_rows)
    print(f"wrote {write_result('prune_quality', settings, results, quick=args.quick)}")


if __name__ == "__main__":
    main()
