"""Recovery by distillation on SmolLM2-135M: how much of what pruning (and int4) cost a short
training run wins back, against controls trained the same way.

Training data: non-overlapping ``--seq-len`` windows of the *calibration* split of the docs text
(the default protocol); scoring: perplexity on the *evaluation* split and mean next-token KL
divergence to the original dense model. The two never overlap. Training on Python docs lowers
even the dense model's perplexity on other Python docs, so the reference for "the gap" is a
control: the dense model fine-tuned on the same data with the same steps, batch and optimizer
(plain cross-entropy: distilling a model into itself does nothing).

Rows (every training run: AdamW, the same steps, peak learning rate, warm-up (5% of the steps)
and cosine decay, batches of ``--batch`` windows; the decoder blocks ``model.layers.*`` train, the
embedding and tied LM head stay frozen; the teacher is the model as it was before the first pass,
kept by the manager on the CPU in bfloat16):

* ``dense-ft``: the control;
* ``wanda``, ``wanda+kd``, ``wanda+ce``: Wanda 50% unstructured (32 calibration windows of 512
  tokens), untrained, recovered with logit distillation (KL, T = 1), or fine-tuned with plain
  cross-entropy instead;
* ``channels``, ``channels+kd``: 25% of every MLP's channels removed
  (``Channels(ratio=0.25, importance="activation")``, from the same calibration windows; the
  default l2 importance wrecks this model, see ``benchmarks/structured.py``), untrained and
  recovered;
* ``wanda+qat+kd``: ``PassManager([Wanda(0.5), QAT(int4, g64), Distill])`` then finalize (sparse
  int4 storage), beside ``wanda+gptq``: Wanda 50% then GPTQ int4 g64 (sparse storage), untrained.

Targets (the issue's): recovery after Wanda 50% within 15 minutes closes at least 30% of the gap
between the pruned model and the fine-tuned dense control; 25% channels plus recovery at most 2x
the dense perplexity; distillation beats plain fine-tuning on KL to the original.

Time: one step of 4 x 256 tokens (SmolLM2 float32 forward and backward, the bfloat16 teacher's
forward, fused AdamW over the 106M parameters of the blocks) takes about 5 s on this 2-core CPU
with 2 threads and nothing else running: the default 100 steps (102,400 tokens, about 1.7 passes
over the calibration split) took 528 s for Wanda 50% and 464 s for 25% channels, plus about a
minute per run to set up and score, inside the 15-minute budget. With 1 thread beside another
job they took 1162-1584 s: the times are recorded with the conditions (``--note``) and checked.

Run:  python benchmarks/distill.py [--quick] [--only KEY ...]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llmslim as ls  # noqa: E402
from _common import RESULTS, machine_line, print_table, table, write_result  # noqa: E402
from llmslim import data, evaluate, models  # noqa: E402
from llmslim.distill import Distill  # noqa: E402
from llmslim.prune import Channels, Wanda  # noqa: E402
from llmslim.quant import GPTQ, QAT  # noqa: E402

TARGETS = ("model.layers.*",)
GAP_CLOSED = 0.30  # share of the gap to the fine-tuned dense control that recovery must close
RECOVERY_SECONDS = 15 * 60
CHANNELS_RATIO = 2.0  # channels + recovery: perplexity at most this times dense

Make = Callable[[dict, list], list]


def _train(s: dict, batches: list, kind: str) -> Distill:
    common = {"steps": s["steps"], "lr": s["lr"], "warmup": s["warmup"], "batch_size": s["batch"], "targets": TARGETS,
              "data": batches, "teacher_dtype": "bfloat16"}
    return Distill(**common) if kind == "kd" else Distill(kl_weight=0.0, ce_weight=1.0, **common)


def _wanda() -> Wanda:
    return Wanda(sparsity=0.5, targets=TARGETS)


def _channels() -> Channels:
    return Channels(ratio=0.25, importance="activation")


# key -> (configuration, passes(settings, training batches), trains)
ROWS: dict[str, tuple[str, Make, bool]] = {
    "dense-ft": ("dense, fine-tuned (control, cross-entropy)", lambda s, b: [_train(s, b, "ce")], True),
    "wanda": ("wanda 50%", lambda s, b: [_wanda()], False),
    "wanda+kd": ("wanda 50% + distillation", lambda s, b: [_wanda(), _train(s, b, "kd")], True),
    "wanda+ce": ("wanda 50% + plain fine-tuning (cross-entropy)", lambda s, b: [_wanda(), _train(s, b, "ce")], True),
    "channels": ("25% MLP channels (activation importance)", lambda s, b: [_channels()], False),
    "channels+kd": ("25% MLP channels + distillation", lambda s, b: [_channels(), _train(s, b, "kd")], True),
    "wanda+qat+kd": ("wanda 50% -> qat int4 g64 -> distill, sparse int4",
                     lambda s, b: [_wanda(), QAT(bits=4, group_size=64, targets=TARGETS, storage="sparse"), _train(s, b, "kd")], True),
    "wanda+gptq": ("wanda 50% -> gptq int4 g64, sparse int4 (no training)",
                   lambda s, b: [_wanda(), GPTQ(bits=4, group_size=64, targets=TARGETS, storage="sparse")], False),
}


def _measure(key: str, dense: nn.Module, s: dict, train: list, calibration: list, tokens: torch.Tensor, results: dict) -> dict:
    model = copy.deepcopy(dense)
    passes = ROWS[key][1](s, train)
    start = time.perf_counter()
    report = ls.compress_(model, *passes, calibration=calibration, progress=s["progress"])
    seconds = time.perf_counter() - start
    measure = {"seq_len": s["eval_seq_len"], "max_windows": s["windows"], "progress": False}
    out: dict[str, Any] = {
        "perplexity": evaluate.perplexity(model, tokens, **measure),
        "kl": evaluate.kl_divergence(model, dense, tokens, **measure),
        "bytes": evaluate.model_bytes(model),
        "seconds": seconds,
    }
    trained = next((c for c in report.children if c.name == "distill"), None)
    if trained is not None:
        info = trained.rows[0].info
        out.update(train_s=trained.seconds, loss_start=info["loss_start"], loss_end=info["loss_end"], teacher=info["teacher"])
    print(f"  {key}: perplexity {out['perplexity']:.3f} ({out['perplexity'] / results['dense_perplexity']:.3f}x), "
          f"KL {out['kl']:.4f}, {out['bytes'] / 2**20:.1f} MiB, {seconds:.0f} s", flush=True)
    return out


def _ratio(r: dict, key: str) -> float:
    return r[key]["perplexity"] / r["dense_perplexity"]


def _targets(r: dict) -> list[tuple[str, str, bool]]:
    out = []
    if all(k in r for k in ("wanda", "wanda+kd", "dense-ft")):
        gap = r["wanda"]["perplexity"] - r["dense-ft"]["perplexity"]
        closed = (r["wanda"]["perplexity"] - r["wanda+kd"]["perplexity"]) / gap if gap > 0 else float("nan")
        out.append((f"wanda 50% + distillation closes >= {GAP_CLOSED:.0%} of the gap to the fine-tuned dense control",
                    f"{closed:.1%}", closed >= GAP_CLOSED))
    for key in ("wanda+kd", "channels+kd"):
        if key in r:
            out.append((f"{key}: recovery within {RECOVERY_SECONDS // 60} min", f"{r[key]['train_s']:.0f} s",
                        r[key]["train_s"] <= RECOVERY_SECONDS))
    if "channels+kd" in r:
        out.append((f"25% channels + distillation <= {CHANNELS_RATIO:g}x dense perplexity", f"{_ratio(r, 'channels+kd'):.3f}x",
                    _ratio(r, "channels+kd") <= CHANNELS_RATIO))
    if "wanda+kd" in r and "wanda+ce" in r:
        kd, ce = r["wanda+kd"]["kl"], r["wanda+ce"]["kl"]
        out.append(("distillation beats plain fine-tuning on KL to the original (wanda 50%)", f"{kd:.4f} vs {ce:.4f}", kd < ce))
    return out


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    rows = [["dense (float32)", r["dense_perplexity"], 1.0, 0.0, r["dense_bytes"] / 2**20, "-", "-"]]
    for key, (what, _, trains) in ROWS.items():
        if key in r:
            m = r[key]
            loss = f"{m['loss_start']['total']:.3g} -> {m['loss_end']['total']:.3g}" if trains else "-"
            rows.append([what, m["perplexity"], _ratio(r, key), m["kl"], m["bytes"] / 2**20,
                         m["train_s"] if trains else "-", loss])
    body = table(["configuration", "perplexity", "ratio to dense", "KL to dense (nats)", "model MiB", "training (s)",
                  "loss on the first batches"], rows)
    checks = table(["target", "measured", "met"], [[t, m, "yes" if ok else "no"] for t, m, ok in _targets(r)])
    tokens = s["steps"] * s["batch"] * s["seq_len"]
    return (
        f"{machine_line(payload)} SmolLM2-135M-Instruct; training: {s['steps']} AdamW steps of {s['batch']} windows of "
        f"{s['seq_len']} tokens ({tokens:,} tokens; the calibration split holds {s['train_windows']} such windows), peak "
        f"learning rate {s['lr']:g}, {s['warmup']} warm-up steps, cosine decay; the decoder blocks train. Perplexity and KL "
        f"on the first {s['windows']} windows of {s['eval_seq_len']} tokens of the evaluation split. Training times were "
        f"measured {s['note']}.\n\n{body}\n\nTargets:\n\n{checks}"
    )


def _merged(quick: bool, settings: dict, results: dict) -> dict:
    path = RESULTS / f"distill{'-quick' if quick else ''}.json"
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    same = all(old["settings"].get(k) == settings[k] for k in ("steps", "batch", "seq_len", "lr", "windows", "eval_seq_len"))
    return {**old["results"], **results} if same else results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps of 2 x 64 tokens, 2 evaluation windows: checks the script")
    parser.add_argument("--steps", type=int, help="optimizer steps per training run (default 100; quick 2)")
    parser.add_argument("--batch", type=int, help="windows per step (default 4; quick 2)")
    parser.add_argument("--seq-len", type=int, help="tokens per training window (default 256; quick 64)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--windows", type=int, help="evaluation windows of 512 tokens (default 32; quick 2)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these row keys (merged into the existing results)")
    parser.add_argument("--note", default="on a machine shared with other jobs", help="how the times were measured")
    parser.add_argument("--progress", action="store_true", help="show progress bars (loss parts while training)")
    args = parser.parse_args()
    q = args.quick
    settings = {
        "steps": args.steps or (2 if q else 100), "batch": args.batch or (2 if q else 4), "seq_len": args.seq_len or (64 if q else 256),
        "lr": args.lr, "windows": args.windows or (2 if q else 32), "eval_seq_len": 512, "calibration": 8 if q else 32,
        "protocol": "default", "targets": list(TARGETS), "note": args.note, "progress": args.progress,
    }
    settings["warmup"] = settings["steps"] // 20  # 5% of the steps
    torch.manual_seed(0)
    dense, tokenizer = models.load_smollm2(progress=False)
    dense.eval()
    split = data.split_tokens(tokenizer, protocol=settings["protocol"])
    windows = data.windows(split.calibration, settings["seq_len"], max_windows=None)  # training: calibration split only
    train = [{"input_ids": w[None].clone()} for w in windows]
    settings["train_windows"] = len(train)
    calibration = data.calibration_batches(text=split.calibration, n_samples=settings["calibration"], seq_len=512)
    results: dict[str, Any] = {
        "dense_perplexity": evaluate.perplexity(dense, split.evaluation, seq_len=512, max_windows=settings["windows"], progress=False),
        "dense_bytes": evaluate.model_bytes(dense),
    }
    print(f"dense perplexity {results['dense_perplexity']:.3f}; {len(train)} training windows of {settings['seq_len']} tokens", flush=True)
    keys = [k for k in ROWS if args.only is None or k in args.only]
    for key in keys:
        results[key] = _measure(key, dense, settings, train, calibration, split.evaluation, results)
        write_result("distill", settings, _merged(q, settings, results) if args.only is not None else results, quick=q)
    final = _merged(q, settings, results) if args.only is not None else results
    rows = [[ROWS[k][0], final[k]["perplexity"], _ratio(final, k), final[k]["kl"], final[k]["bytes"] / 2**20,
             final[k].get("train_s", "-")] for k in ROWS if k in final]
    print_table("distillation recovery, SmolLM2-135M", ["configuration", "perplexity", "ratio", "KL", "MiB", "train s"], rows)
    for target, measured, ok in _targets(final):
        print(f"  {'met ' if ok else 'MISS'} {target}: {measured}")
    print(f"wrote {write_result('distill', settings, final, quick=q)}")


if __name__ == "__main__":
    main()
