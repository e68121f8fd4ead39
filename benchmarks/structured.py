"""Structured pruning on SmolLM2-135M: MLP channels, depth and heads, side by side with Torch-Pruning.

* Channels: 25% of every MLP's intermediate channels (1536 -> 1152 in each of the 30 blocks)
  removed by llmslim's ``Channels(ratio=0.25, importance=X)`` for X in ``l2``, ``activation``
  and ``taylor``, and by Torch-Pruning (``torch-pruning``, its LLM example's settings, restricted
  to the same channels: see ``benchmarks/_structured_tp.py``) with its group magnitude and its
  Taylor importance. No recovery training. The script checks that both leave identical shapes.
* Depth: ``Layers(n=4)`` by block influence and, as the naive baseline, the last 4 blocks.
* Heads: ``Heads(ratio=1/3, unit="query")``: one query head of each key/value group (9 query
  heads in 3 groups -> 6), by the default ``l2`` importance and by ``activation``, and greedy
  generation with a KV cache checked against generation without one.

Quality: perplexity on the docs-text evaluation split (ratio to dense), mean next-token KL
divergence to the dense model, parameter count, prune wall time (calibration sweeps, gradients,
Torch-Pruning's graph trace included). Calibration: ``--calibration`` windows of 512 tokens of
the calibration split (``activation``, ``taylor``, ``influence``, Torch-Pruning's Taylor).

Speed, in one process with every model interleaved (dense, ours, Torch-Pruning's, the depth-
and head-pruned models; one of each shape): batch-1 prefill of 128 tokens (tokens/s; the median
over ``--rounds`` rounds, each prefilling every model in turn) and greedy decoding of
``--new-tokens`` tokens after it with the KV cache (tokens/s; one token on each model in turn, the
median of every single-token step), so a noisy machine slows every model alike.
The ideal speed-up is the ratio of the linear layers' multiply-accumulates per token (every
``nn.Linear``, the LM head included; attention over the context and elementwise work left out),
which for the 25% channel cut puts the MLPs' ~59% share of this model's per-token compute at
1.17x. Tests never assert on time: this is a benchmark, on a CPU that may be shared.

Targets (the issue's): channels 25% perplexity <= 4x dense with the best importance (named);
prefill and decode speed-ups of ours >= 90% of the ideal and >= Torch-Pruning's at equal shapes;
parameters fall by exactly 25% of the MLP weights; heads: generation with a KV cache works.

Run:  python benchmarks/structured.py [--quick] [--only KEY ...]; then python benchmarks/render_docs.py
``--only`` runs some rows (and dense) and merges them into the existing results; the speed
figures of the rows run together are measured together.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _structured_tp as tp_side  # noqa: E402
import llmslim as ls  # noqa: E402
from _common import RESULTS, machine_line, print_table, table, write_result  # noqa: E402
from llmslim import data, evaluate, models  # noqa: E402
from llmslim.prune import Channels, Heads, Layers  # noqa: E402

RATIO = 0.25
PPL_TIMES = 4.0  # channels 25%: perplexity at most this times dense (best importance)
IDEAL_SHARE = 0.9  # measured speed-ups must reach this share of the ideal
CHANNEL_KEYS = ("channels-l2", "channels-activation", "channels-taylor")
TP_KEYS = ("tp-magnitude", "tp-taylor")

Prune = Callable[[nn.Module, Any, list], float]  # (model, tokenizer, calibration) -> seconds


def _ours(make: Callable[[], Any]) -> Prune:
    def run(model: nn.Module, tokenizer: Any, batches: list) -> float:
        start = time.perf_counter()
        ls.compress_(model, make(), calibration=batches, progress=False)
        return time.perf_counter() - start

    return run


def _tp(importance: str) -> Prune:
    return lambda model, tokenizer, batches: tp_side.prune_mlp_channels_(model, tokenizer, RATIO, importance, batches)


# key -> (label, prune); the order matters: ours before Torch-Pruning (its shapes are compared to ours)
ROWS: dict[str, tuple[str, Prune]] = {
    "channels-l2": ("llmslim channels 25%, l2", _ours(lambda: Channels(ratio=RATIO, importance="l2"))),
    "channels-activation": ("llmslim channels 25%, activation", _ours(lambda: Channels(ratio=RATIO, importance="activation"))),
    "channels-taylor": ("llmslim channels 25%, taylor", _ours(lambda: Channels(ratio=RATIO, importance="taylor"))),
    "tp-magnitude": ("Torch-Pruning MLP channels 25%, group L2 magnitude", _tp("magnitude")),
    "tp-taylor": ("Torch-Pruning MLP channels 25%, Taylor", _tp("taylor")),
    "layers-influence": ("llmslim layers n=4, influence", _ours(lambda: Layers(n=4, importance="influence"))),
    "layers-last": ("llmslim layers n=4, last 4 blocks", _ours(lambda: Layers(n=4, importance="last"))),
    "heads-query": ("llmslim heads 1/3, one query head per kv group, l2", _ours(lambda: Heads(ratio=1 / 3, unit="query"))),
    "heads-query-activation": ("llmslim heads 1/3, one query head per kv group, activation",
                               _ours(lambda: Heads(ratio=1 / 3, unit="query", importance="activation"))),
}
HEAD_KEYS = ("heads-query", "heads-query-activation")
# rows whose shapes differ from each other's: one model of each is kept for the speed rounds
SPEED_SHAPES = (CHANNEL_KEYS, TP_KEYS, ("layers-influence",), ("layers-last",), HEAD_KEYS)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates per token of every linear layer (the tied LM head included)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def _mlp_params(model: nn.Module) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())


def _digest(model: nn.Module) -> str:
    """A fingerprint of every parameter's name and shape: equal digests, equal shapes."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in sorted(model.named_parameters()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _widths(model: nn.Module) -> list[int]:
    return sorted({layer.mlp.down_proj.in_features for layer in model.model.layers})


@torch.no_grad()
def _cache_generation_ok(model: nn.Module, prompt: torch.Tensor, new: int = 8) -> bool:
    """Greedy generation with a KV cache gives the same tokens as without one."""
    ids = prompt[None, :16]
    kw = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    return bool(torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)))


def _cache_name(model: nn.Module) -> str:
    # transformers 5 calls the KV cache ``cache`` (inputs and outputs); 4.x ``past_key_values``
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _speed(variants: dict[str, nn.Module], prompt: torch.Tensor, s: dict) -> dict[str, dict]:
    """Prefill and decode tokens/s of every variant, interleaved finely so they share the machine's noise.

    Each round prefills the same prompt on every model in turn, then decodes greedily one token
    on each model in turn; the first round warms up. Prefill: the median over the rounds; decode:
    the median of every single-token step of every round.
    """
    ids = prompt.flatten()[: s["prefill"]][None]
    prefill: dict[str, list[float]] = {k: [] for k in variants}
    decode: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(s["rounds"] + 1):
        state = {}
        for key, model in variants.items():
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            seconds = time.perf_counter() - start
            state[key] = (out[_cache_name(model)], out.logits[:, -1:].argmax(-1))
            if round_:
                prefill[key].append(seconds)
        for _ in range(s["new_tokens"]):
            for key, model in variants.items():
                name, (cache, token) = _cache_name(model), state[key]
                start = time.perf_counter()
                out = model(input_ids=token, use_cache=True, **{name: cache})
                seconds = time.perf_counter() - start
                state[key] = (out[name], out.logits[:, -1:].argmax(-1))
                if round_:
                    decode[key].append(seconds)
    return {k: {"prefill_tokens_per_s": s["prefill"] / statistics.median(prefill[k]),
                "decode_tokens_per_s": 1 / statistics.median(decode[k])} for k in variants}


def _ratio(r: dict, key: str) -> float:
    return r[key]["perplexity"] / r["dense"]["perplexity"]


def _best_channels(r: dict) -> str | None:
    tried = [k for k in CHANNEL_KEYS if k in r]
    return min(tried, key=lambda k: _ratio(r, k)) if tried else None


def _timed(r: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in r and "speed" in r[k]), None)


def _targets(r: dict) -> list[tuple[str, str, bool]]:
    out = []
    best = _best_channels(r)
    if best is not None:
        out.append((f"channels 25%: perplexity <= {PPL_TIMES:g}x dense (best of {sum(k in r for k in CHANNEL_KEYS)} importances)",
                    f"{_ratio(r, best):.3f}x ({best})", _ratio(r, best) <= PPL_TIMES))
        mlp = r["dense"]["mlp_params"]
        removed = r["dense"]["params"] - r[best]["params"]
        out.append((f"channels 25%: parameters fall by {RATIO:.0%} of the MLP weights", f"{removed:,} of {mlp:,} ({removed / mlp:.2%})",
                    removed == round(RATIO * mlp)))
    ours, theirs = _timed(r, CHANNEL_KEYS), _timed(r, TP_KEYS)
    for tp_key in (k for k in TP_KEYS if k in r and best is not None):
        same = r[tp_key]["shapes"] == r[best]["shapes"]
        out.append((f"{tp_key}: identical shapes to llmslim's channels 25%", "identical" if same else "different", same))
    if ours is not None:
        sp, ideal = r[ours]["speed"], r[ours]["ideal_speedup"]
        for phase in ("prefill", "decode"):
            got = sp[f"{phase}_speedup"]
            out.append((f"{phase} speed-up >= {IDEAL_SHARE:.0%} of the ideal {ideal:.3f}x ({ours})", f"{got:.3f}x ({got / ideal:.0%})",
                        got >= IDEAL_SHARE * ideal))
            if theirs is not None and r[theirs]["shapes"] == r[ours]["shapes"]:
                other = r[theirs]["speed"][f"{phase}_speedup"]
                note = "" if sp["run"] == r[theirs]["speed"]["run"] else " (different runs)"
                out.append((f"{phase} speed-up >= Torch-Pruning's at equal shapes", f"{got:.3f}x vs {other:.3f}x{note}", got >= other))
    for key in (k for k in HEAD_KEYS if k in r):
        ok = r[key]["cache_generation_ok"]
        out.append((f"{key}: greedy generation with a KV cache = without", "same tokens" if ok else "different tokens", ok))
    return out


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    d = r["dense"]
    rows = [["dense (float32)", d["params"], "-", d["perplexity"], 1.0, 0.0, "-"]]
    for key, (label, _) in ROWS.items():
        if key in r:
            m = r[key]
            rows.append([label, m["params"], f"{1 - m['params'] / d['params']:.1%}", m["perplexity"], _ratio(r, key), m["kl"], m["prune_s"]])
    quality = table(["configuration", "parameters", "removed", "perplexity", "ratio to dense", "KL to dense (nats)", "prune (s)"], rows)
    timed = [k for k in ROWS if k in r and "speed" in r[k]]
    speed_rows = [["dense", d["linear_macs"], 1.0, d["speed"]["prefill_tokens_per_s"], 1.0, d["speed"]["decode_tokens_per_s"], 1.0]] if timed else []
    for key in timed:
        m, sp = r[key], r[key]["speed"]
        speed_rows.append([ROWS[key][0], m["linear_macs"], m["ideal_speedup"], sp["prefill_tokens_per_s"], sp["prefill_speedup"],
                           sp["decode_tokens_per_s"], sp["decode_speedup"]])
    speed = table(["model", "linear MACs / token", "ideal speed-up", f"prefill {s['prefill']} tok (tok/s)", "prefill speed-up",
                   "decode (tok/s)", "decode speed-up"], speed_rows) if timed else "Not measured in this run."
    checks = table(["target", "measured", "met"], [[t, m, "yes" if ok else "no"] for t, m, ok in _targets(r)])
    # rows merged from several runs (--only) may have been timed with different thread counts
    threads = "/".join(str(n) for n in sorted({r[k]["speed"].get("threads", s["threads"]) for k in timed})) or s["threads"]
    return (
        f"{machine_line(payload)} SmolLM2-135M-Instruct, no recovery training. Calibration: {s['calibration']} windows of "
        f"{s['seq_len']} tokens of the calibration split; perplexity and KL on the first {s['windows']} windows of {s['seq_len']} "
        f"tokens of the evaluation split (`{s['protocol']}` protocol). The dense model's linear layers do "
        f"{d['linear_macs']:,} multiply-accumulates per token, {d['mlp_share']:.1%} of them in the MLPs.\n\n{quality}\n\n"
        f"Speed: batch 1, float32, {threads} threads; prefill of {s['prefill']} tokens and greedy decoding of "
        f"{s['new_tokens']} tokens after it with the KV cache, the models interleaved step by step (prefill: median of "
        f"{s['rounds']} rounds; decode: median of all {s['rounds'] * s['new_tokens']} single-token steps; measured {s['note']}). Ideal speed-up: the ratio of linear multiply-accumulates per token.\n\n{speed}\n\n"
        f"Targets:\n\n{checks}"
    )


def _measure(key: str, dense: nn.Module, tokenizer: Any, batches: list, tokens: torch.Tensor, measure: dict, r: dict) -> tuple[dict, nn.Module]:
    model = copy.deepcopy(dense)
    seconds = ROWS[key][1](model, tokenizer, batches)
    model.eval()
    out = {"params": _params(model), "linear_macs": _linear_macs(model), "shapes": _digest(model), "widths": _widths(model),
           "layers": len(model.model.layers), "heads": model.model.layers[0].self_attn.q_proj.out_features // model.config.head_dim,
           "prune_s": seconds, "calibration": len(batches),
           "perplexity": evaluate.perplexity(model, tokens, **measure), "kl": evaluate.kl_divergence(model, dense, tokens, **measure)}
    out["ideal_speedup"] = r["dense"]["linear_macs"] / out["linear_macs"]
    if key in HEAD_KEYS:
        out["cache_generation_ok"] = _cache_generation_ok(model, tokens)
    print(f"  {key}: {out['params']:,} params, ratio {out['perplexity'] / r['dense']['perplexity']:.3f}, KL {out['kl']:.3f}, "
          f"prune {seconds:.1f}s", flush=True)
    return out, model


def _path(quick: bool) -> Path:
    return RESULTS / f"structured{'-quick' if quick else ''}.json"


def _merged(quick: bool, settings: dict, results: dict) -> dict:
    """The existing results with this run's rows replaced, when they were measured the same way."""
    path = _path(quick)
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    same = all(old["settings"].get(k) == settings[k] for k in ("windows", "seq_len", "protocol", "calibration"))
    return {**old["results"], **results} if same else results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 calibration windows, 2 evaluation windows, short speed rounds")
    parser.add_argument("--calibration", type=int, help="calibration windows of 512 tokens (default 32; quick 4)")
    parser.add_argument("--windows", type=int, help="evaluation windows of 512 tokens (default 16; quick 2)")
    parser.add_argument("--rounds", type=int, help="speed rounds (default 7; quick 3)")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens per speed run (default 64; quick 16)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed rounds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; on a busy machine 1 avoids oversubscription)")
    parser.add_argument("--only", nargs="*", default=None, help=f"run only these rows (and dense), merged into the results: {list(ROWS)}")
    parser.add_argument("--note", default="on a machine shared with other jobs", help="how the times were measured")
    args = parser.parse_args()
    q = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {
        "calibration": args.calibration or (4 if q else 32), "windows": args.windows or (2 if q else 16), "seq_len": 512,
        "protocol": "default", "rounds": args.rounds or (3 if q else 7), "new_tokens": args.new_tokens or (16 if q else 64),
        "prefill": 128, "ratio": RATIO, "threads": torch.get_num_threads(), "note": args.note,
    }
    unknown = sorted(set(args.only or ()) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    torch.manual_seed(0)
    dense, tokenizer = models.load_smollm2(progress=False)
    dense.eval()
    split = data.split_tokens(tokenizer, protocol=settings["protocol"])
    batches = data.calibration_batches(text=split.calibration, n_samples=settings["calibration"], seq_len=settings["seq_len"])
    measure = {"seq_len": settings["seq_len"], "max_windows": settings["windows"], "progress": False}
    macs = _linear_macs(dense)
    mlp_macs = sum(m.in_features * m.out_features for layer in dense.model.layers for m in layer.mlp.modules() if isinstance(m, nn.Linear))
    results: dict[str, Any] = {"dense": {
        "params": _params(dense), "mlp_params": _mlp_params(dense), "linear_macs": macs, "mlp_share": mlp_macs / macs,
        "perplexity": evaluate.perplexity(dense, split.evaluation, **measure)}}
    print(f"dense: {results['dense']['params']:,} params, perplexity {results['dense']['perplexity']:.3f}, "
          f"MLP share of linear MACs {mlp_macs / macs:.1%}", flush=True)

    keys = [k for k in ROWS if args.only is None or k in args.only]
    if not tp_side.available():
        print("torch-pruning is not installed (pip install -e .[bench]): skipping its rows")
        keys = [k for k in keys if k not in TP_KEYS]
    kept: dict[str, nn.Module] = {}
    for key in keys:
        results[key], model = _measure(key, dense, tokenizer, batches, split.evaluation, measure, results)
        if not any(key in group and any(k in kept for k in group) for group in SPEED_SHAPES):
            kept[key] = model  # the first of each shape is timed
        # every row is written as soon as it is measured: a long run that is stopped keeps it
        write_result("structured", settings, _merged(q, settings, results) if args.only is not None else results, quick=q)
    for tp_key in (k for k in TP_KEYS if k in results):
        ours = next((k for k in CHANNEL_KEYS if k in results), None)
        if ours is not None:
            same = results[tp_key]["shapes"] == results[ours]["shapes"]
            print(f"  {tp_key} vs {ours}: {'identical shapes' if same else 'DIFFERENT shapes'} "
                  f"(MLP widths {results[tp_key]['widths']} vs {results[ours]['widths']})")

    if not args.no_speed and kept:
        run = time.strftime("%Y-%m-%dT%H:%M:%S")
        timed = _speed({"dense": dense, **kept}, split.evaluation, settings)
        results["dense"]["speed"] = {**timed.pop("dense"), "run": run, "threads": settings["threads"]}
        for key, sp in timed.items():
            base = results["dense"]["speed"]
            results[key]["speed"] = {**sp, "run": run, "threads": settings["threads"], "prefill_speedup": sp["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                                     "decode_speedup": sp["decode_tokens_per_s"] / base["decode_tokens_per_s"]}

    final = _merged(q, settings, results) if args.only is not None else results
    rows = [["dense", final["dense"]["params"], final["dense"]["perplexity"], 1.0, 0.0, "-", "-", "-", "-"]]
    for key in (k for k in ROWS if k in final):
        m, sp = final[key], final[key].get("speed", {})
        rows.append([key, m["params"], m["perplexity"], _ratio(final, key), m["kl"], m["prune_s"], m["ideal_speedup"],
                     sp.get("prefill_speedup", "-"), sp.get("decode_speedup", "-")])
    print_table("structured pruning, SmolLM2-135M", ["row", "params", "perplexity", "ratio", "KL", "prune s", "ideal x",
                                                     "prefill x", "decode x"], rows)
    for target, measured, ok in _targets(final):
        print(f"  {'met ' if ok else 'MISS'} {target}: {measured}")
    print(f"wrote {write_result('structured', settings, final, quick=q)}")


if __name__ == "__main__":
    main()
