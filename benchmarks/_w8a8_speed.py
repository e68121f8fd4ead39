"""The ``w8a8`` part of benchmarks/quant_speed.py: ``Int8DynamicLinear`` against float32 and
torchao's int8 dynamic layer, and SmolLM2-135M with ``smoothquant`` + ``w8a8``.

Run alone with ``python benchmarks/quant_speed.py --only w8a8 [--quick]``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from _common import interleaved, table

from llmslim import compress_, data, evaluate, models
from llmslim.quant import W8A8, Int8DynamicLinear, SmoothQuant
from llmslim.testing import make_weight

SHAPES = ((4096, 4096), (4096, 11008))
TOKENS = (1, 128)
PREFILL_TARGET = 1.5  # whole-model prefill speedup over float32 (issue 6)
PERPLEXITY_TARGET = 1.02  # perplexity ratio to float32


def _torchao_dynamic(lin: torch.nn.Linear) -> torch.nn.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        layer = torch.nn.Sequential(copy.deepcopy(lin))
        quantize_(layer, Int8DynamicActivationInt8WeightConfig())
        return layer
    except Exception as exc:  # not installed, built for another torch, or no CPU path
        print(f"skip torchao int8 dynamic: {type(exc).__name__}: {exc}")
        return None


@torch.no_grad()
def layer_speed(repeat: int) -> list[dict[str, Any]]:
    """float32 ``F.linear`` vs ``Int8DynamicLinear`` (and torchao's int8 dynamic layer), float32 in and out."""
    rows = []
    for n, k in SHAPES:
        w = make_weight((n, k), seed=0)
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.copy_(w)
        ours = Int8DynamicLinear.from_float(lin)
        peer = _torchao_dynamic(lin)
        for tokens in TOKENS:
            x = torch.randn(tokens, k)
            fns = {"float32": lambda: F.linear(x, w), "w8a8": lambda: ours(x)}
            if peer is not None:
                fns["torchao int8 dynamic"] = lambda: peer(x)
            ms = {name: 1e3 * t for name, t in interleaved(fns, warmup=2, repeat=repeat).items()}
            rows.append({
                "shape": f"{n}x{k}", "tokens": tokens, "ms": ms, "kernel": ours.kernel_for(tokens),
                "speedup": {name: ms["float32"] / t for name, t in ms.items() if name != "float32"},
            })
            print("w8a8", rows[-1]["shape"], tokens, {name: round(v, 3) for name, v in ms.items()}, flush=True)
    return rows


@torch.no_grad()
def smollm2(windows: int, repeat: int, calibration: int) -> dict[str, Any]:
    """float32 vs ``w8a8`` vs ``smoothquant`` + ``w8a8`` on SmolLM2-135M: perplexity, KL, speed."""
    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="default")
    batches = data.calibration_batches(text=split.calibration, n_samples=calibration, seq_len=512, seed=0)
    variants: dict[str, torch.nn.Module] = {"float32": model}
    plain = copy.deepcopy(model)
    compress_(plain, W8A8(), progress=False)
    variants["w8a8"] = plain
    for alpha in (0.5, 0.8):
        smoothed = copy.deepcopy(model)
        compress_(smoothed, SmoothQuant(alpha=alpha), W8A8(), calibration=batches, progress=False)
        variants[f"smoothquant a={alpha} + w8a8"] = smoothed
    out: dict[str, Any] = {}
    for name, m in variants.items():
        ppl = evaluate.perplexity(m, split.evaluation, max_windows=windows, progress=False)
        out[name] = {"bytes": evaluate.model_bytes(m), "perplexity": ppl}
        if name != "float32":
            out[name]["kl"] = evaluate.kl_divergence(m, model, split.evaluation, max_windows=windows, progress=False)
    base = out["float32"]["perplexity"]
    for v in out.values():
        v["ppl_ratio"] = v["perplexity"] / base
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeat):  # interleaved: every variant once per round
        for name, m in variants.items():
            runs[name].append(evaluate.decode_speed(m, split.evaluation, new_tokens=32, prefill_tokens=128, repeat=1))
    for name, rs in runs.items():
        for key in ("prefill_ms", "decode_tokens_per_s"):
            values = sorted(r[key] for r in rs)
            out[name][key] = values[len(values) // 2]
    f32 = out["float32"]
    for v in out.values():
        v["prefill_speedup"] = f32["prefill_ms"] / v["prefill_ms"]
        v["decode_speedup"] = v["decode_tokens_per_s"] / f32["decode_tokens_per_s"]
    return out


def run(quick: bool, threads: int = 2) -> dict[str, Any]:
    """Both parts, as a JSON-ready dict."""
    repeat = 5 if quick else 15
    return {
        "layers": layer_speed(repeat),
        "smollm2": smollm2(4 if quick else 16, 3 if quick else 5, 16 if quick else 64),
        "settings": {"threads": threads, "repeat": repeat, "windows": 4 if quick else 16, "calibration_windows": 16 if quick else 64},
    }


def render_markdown(r: dict[str, Any]) -> str:
    """The docs section of the ``w8a8`` results."""
    names = [n for n in r["layers"][0]["ms"] if n != "float32"]
    layers = table(
        ["out x in", "tokens", "float32 (ms)", *[f"{n} (ms, speedup)" for n in names], "w8a8 path"],
        [[row["shape"], row["tokens"], row["ms"]["float32"], *[f"{row['ms'][n]:.3g} ({row['speedup'][n]:.2f}x)" for n in names], row["kernel"]]
         for row in r["layers"]],
    )
    smol = table(
        ["SmolLM2-135M", "perplexity (x float32)", "KL", "prefill 128 tok (ms, speedup)", "decode (tok/s, speedup)"],
        [[n, f"{v['perplexity']:.4g} ({v['ppl_ratio']:.3f}x)", v.get("kl", 0.0), f"{v['prefill_ms']:.4g} ({v['prefill_speedup']:.2f}x)",
          f"{v['decode_tokens_per_s']:.4g} ({v['decode_speedup']:.2f}x)"] for n, v in r["smollm2"].items()],
    )
    s = r["settings"]
    return (
        f"**w8a8** (int8 weights per channel, int8 activations per token), float32 in and out; median of {s['repeat']} "
        f"interleaved runs, {s['threads']} threads.\n\n{layers}\n\nWhole model, batch 1, every linear but `lm_head` quantized; smoothquant "
        f"calibrated on {s['calibration_windows']} windows of 512 tokens; perplexity on {s['windows']} windows. Targets: "
        f"prefill at least {PREFILL_TARGET}x float32, perplexity within {PERPLEXITY_TARGET:.2f}x.\n\n{smol}"
    )
