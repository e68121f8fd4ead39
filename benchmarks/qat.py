"""Quantization-aware training and float8 weights on SmolLM2-135M.

QAT: starting from the float32 model, ``qat`` (int4, groups of 64, asymmetric: at step 0 exactly
``rtn`` int4 g64) trains for ``--steps`` steps on windows of the docs-text *calibration* split,
then ``finalize`` packs it into ``QuantLinear`` layers, and the packed model is evaluated. The
control is a float32 fine-tune with the same steps, data, optimizer and learning rate: part of
any gain on the evaluation split is the model learning the text's domain, which the control
measures. Rows: float32, ``rtn`` int4 g64 (no training), QAT int4 g64 (packed), the float
fine-tune, and (for reference) ``rtn`` int4 g64 of the fine-tuned model. The token embedding
(tied to the LM head, which stays float32 as ``rtn`` leaves it) is frozen in both runs.

fp8: ``fp8`` with float32 per-channel scales (min/max, and ``clip="mse"``), weight-only, and with
dynamic per-token float8 activations (emulated on CPU): perplexity, KL divergence to float32 and bytes per weight of the
linear layers (targets: perplexity within 1% of float32, at most 1.01 bytes per weight, i.e.
half of bfloat16 plus the scales).

Perplexity and KL are on the first ``--windows`` windows of 512 tokens of the evaluation split.

Run:  python benchmarks/qat.py [--quick] [--steps N] [--lr LR]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmslim as ls  # noqa: E402
from _common import machine_line, print_table, table, write_result  # noqa: E402
from llmslim import data, evaluate, models  # noqa: E402
from llmslim.quant import FP8, QAT, RTN, FP8Linear, QuantLinear  # noqa: E402

GRID = dict(bits=4, group_size=64)
FP8_RATIO, FP8_BYTES = 1.01, 1.01  # targets: perplexity ratio, bytes per weight (bfloat16 is 2)


def linear_bytes_per_weight(model: nn.Module) -> float:
    """Stored bytes of the packed linear layers' weights (codes, scales, zero points) per weight."""
    held = weights = 0
    for m in model.modules():
        if isinstance(m, (QuantLinear, FP8Linear)) and getattr(m, "_tied_to", None) is None:
            held += evaluate.model_bytes(m) - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)
            weights += m.in_features * m.out_features
    return held / weights


def train_(model: nn.Module, batches: list[Any], *, lr: float, pm: ls.PassManager | None, ctx: ls.Context | None,
           label: str) -> dict[str, Any]:
    """Train ``model`` in place on ``batches`` (causal LM loss); the token embedding is frozen."""
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for step, batch in enumerate(batches, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if pm is not None:
            pm.step(model, ctx)
        losses.append(loss.item())
        if step % max(1, len(batches) // 10) == 0:
            print(f"{label} step {step}/{len(batches)} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    model.eval()
    model.get_input_embeddings().weight.requires_grad_(True)
    del optimizer
    return {"seconds": time.perf_counter() - start, "first_loss": sum(losses[:5]) / len(losses[:5]),
            "last_loss": sum(losses[-5:]) / len(losses[-5:])}


@torch.no_grad()
def measure(model: nn.Module, reference: nn.Module, ids: torch.Tensor, windows: int, base: float) -> dict[str, float]:
    ppl = evaluate.perplexity(model, ids, max_windows=windows, progress=False)
    kl = evaluate.kl_divergence(model, reference, ids, max_windows=windows, progress=False)
    return {"perplexity": ppl, "perplexity_ratio": ppl / base, "kl": kl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 steps, 2 evaluation windows, no dynamic-fp8 row")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 80, quick 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--batch", type=int, default=1, help="windows per training step")
    parser.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (both runs)")
    parser.add_argument("--windows", type=int, default=None, help="evaluation windows of 512 tokens (default 32, quick 2)")
    parser.add_argument("--no-dynamic", action="store_true", help="skip the fp8 row with dynamic float8 activations")
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = args.steps or (8 if args.quick else 80)
    windows = args.windows or (2 if args.quick else 32)
    settings = {"steps": steps, "seq_len": args.seq_len, "batch": args.batch, "lr": args.lr, "optimizer": "AdamW (no weight decay)",
                "grad_clip": 1.0, "autocast": "bfloat16", "frozen": "token embedding (tied LM head)", "grid": GRID,
                "windows": windows, "eval_seq_len": 512, "protocol": "default", "data": "docs-text calibration split",
                "command": " ".join(["python benchmarks/qat.py", *sys.argv[1:]])}
    model, tokenizer = models.load_smollm2(progress=False)
    ids = data.split_tokens(tokenizer, protocol="default").evaluation
    batches = data.calibration_batches(tokenizer, n_samples=steps * args.batch, seq_len=args.seq_len, seed=0)
    batches = [{"input_ids": torch.cat([b["input_ids"] for b in batches[i:i + args.batch]])} for i in range(0, len(batches), args.batch)]
    base = evaluate.perplexity(model, ids, max_windows=windows, progress=False)
    results: dict[str, Any] = {"float32": {"perplexity": base, "perplexity_ratio": 1.0, "kl": 0.0, "bytes_per_weight": 4.0}}

    rtn = copy.deepcopy(model)
    ls.compress_(rtn, RTN(**GRID), progress=False)
    results["rtn int4 g64"] = {**measure(rtn, model, ids, windows, base), "bytes_per_weight": linear_bytes_per_weight(rtn)}
    del rtn
    print("rtn", results["rtn int4 g64"], flush=True)

    qat = copy.deepcopy(model)
    pm, ctx = ls.PassManager([QAT(**GRID)]), ls.Context(progress=False)
    pm.apply(qat, ctx)
    training = train_(qat, batches, lr=args.lr, pm=pm, ctx=ctx, label="qat")
    pm.finalize(qat, ctx)
    results["qat int4 g64"] = {**measure(qat, model, ids, windows, base), "bytes_per_weight": linear_bytes_per_weight(qat), "training": training}
    del qat
    print("qat", results["qat int4 g64"], flush=True)

    tuned = copy.deepcopy(model)
    training = train_(tuned, batches, lr=args.lr, pm=None, ctx=None, label="float")
    results["float32 fine-tune"] = {**measure(tuned, model, ids, windows, base), "bytes_per_weight": 4.0, "training": training}
    print("float fine-tune", results["float32 fine-tune"], flush=True)
    ls.compress_(tuned, RTN(**GRID), progress=False)
    results["fine-tune, then rtn int4 g64"] = {**measure(tuned, model, ids, windows, base), "bytes_per_weight": linear_bytes_per_weight(tuned)}
    del tuned

    fp8_rows = [("fp8", {}), ("fp8 clip=mse", {"clip": "mse"}), ("fp8 dynamic activations", {"activations": "dynamic"})]
    for name, cfg in fp8_rows[: 2 if args.quick or args.no_dynamic else 3]:
        f8 = copy.deepcopy(model)
        start = time.perf_counter()
        ls.compress_(f8, FP8(**cfg), progress=False)
        seconds = time.perf_counter() - start
        results[name] = {**measure(f8, model, ids, windows, base), "bytes_per_weight": linear_bytes_per_weight(f8),
                         "model_bytes": evaluate.model_bytes(f8), "seconds": seconds}
        print(name, results[name], flush=True)
        del f8
    fp8 = min((results[n] for n, _ in fp8_rows[:2]), key=lambda v: v["perplexity"])
    results["targets"] = [
        {"target": "qat int4 g64 perplexity below rtn int4 g64", "value": results["qat int4 g64"]["perplexity"],
         "bound": results["rtn int4 g64"]["perplexity"], "met": results["qat int4 g64"]["perplexity"] < results["rtn int4 g64"]["perplexity"]},
        {"target": f"fp8 (best of minmax, mse) perplexity ratio <= {FP8_RATIO}", "value": fp8["perplexity_ratio"], "bound": FP8_RATIO, "met": fp8["perplexity_ratio"] <= FP8_RATIO},
        {"target": f"fp8 bytes per weight <= {FP8_BYTES} (bfloat16: 2)", "value": fp8["bytes_per_weight"], "bound": FP8_BYTES, "met": fp8["bytes_per_weight"] <= FP8_BYTES},
    ]
    print_table("SmolLM2-135M: QAT and fp8", ["model", "perplexity", "ratio", "KL", "B/weight"],
                [[n, v["perplexity"], v["perplexity_ratio"], v["kl"], v["bytes_per_weight"]] for n, v in results.items() if n != "targets"])
    print(f"wrote {write_result('qat', settings, results, quick=args.quick)}")


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    rows = []
    for name, v in r.items():
        if name == "targets":
            continue
        t = v.get("training")
        loss = f"{t['first_loss']:.3f} -> {t['last_loss']:.3f} ({t['seconds']:.0f} s)" if t else "-"
        rows.append([name, v["perplexity"], v["perplexity_ratio"], v["kl"], v["bytes_per_weight"], loss])
    body = table(["SmolLM2-135M", "perplexity", "ratio to float32", "KL (nats/token)", "bytes/weight (linears)", "training loss (time)"], rows)
    targets = table(["target", "value", "bound", "met"],
                    [[t["target"], t["value"], t["bound"], "yes" if t["met"] else "**no**"] for t in r["targets"]])
    return (
        f"{machine_line(payload)} `{s['command']}`: {s['steps']} steps of {s['batch']} x {s['seq_len']} tokens of the "
        f"{s['data']}, {s['optimizer']} at lr {s['lr']:g}, gradients clipped at {s['grad_clip']}, {s['autocast']} autocast, "
        f"{s['frozen']} frozen; QAT and the float fine-tune see the same batches. Perplexity and KL on the first "
        f"{s['windows']} windows of {s['eval_seq_len']} tokens of the evaluation split ({s['protocol']} protocol). "
        f"The QAT row is the packed model after `finalize`. Wall times were measured on a shared machine.\n\n{body}\n\n{targets}"
    )


if __name__ == "__main__":
    main()
