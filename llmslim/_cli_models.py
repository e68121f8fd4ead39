"""``llmslim eval`` and ``llmslim compress``: the real-model workbench from the command line."""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from . import data, evaluate, models
from ._manager import PassManager, compress_

PROMPT = "The Python programming language is"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="smollm2, minilm, a Hugging Face model folder or a folder saved by compress --out")
    p.add_argument("--protocol", choices=["default", "reference"], default="default", help="docs-text split (see llmslim.data)")
    p.add_argument("--windows", type=int, default=64, help="512-token evaluation windows to score (default 64)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _generate(model: Any, tokenizer: Any, n: int = 24) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def measure(model: Any, tokenizer: Any, args: argparse.Namespace, *, reference: Any = None, speed: bool = True) -> dict[str, Any]:
    """Quality (perplexity or fidelity), bytes and speed of ``model`` by the workbench protocol."""
    progress = not args.no_progress
    result: dict[str, Any] = {"model_bytes": evaluate.model_bytes(model)}
    if models.is_encoder(model):
        sentences = data.docs_sentences(256)
        result["embedding_fidelity"] = evaluate.embedding_fidelity(model, reference or model, tokenizer, sentences)
        if speed:
            start = time.perf_counter()
            evaluate.sentence_embeddings(model, tokenizer, sentences)
            result["encode_sentences_per_s"] = len(sentences) / (time.perf_counter() - start)
        return result
    split = data.split_tokens(tokenizer, protocol=args.protocol)
    result["protocol"] = args.protocol
    result["perplexity"] = evaluate.perplexity(model, split.evaluation, max_windows=args.windows, progress=progress)
    if reference is not None:
        result["kl_divergence"] = evaluate.kl_divergence(model, reference, split.evaluation, max_windows=args.windows, progress=progress)
    if speed:
        result.update(evaluate.decode_speed(model, split.evaluation))
        result["sample"] = _generate(model, tokenizer)
    return result


def _show(title: str, result: dict[str, Any]) -> None:
    print(title)
    for key, value in result.items():
        text = f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else " ".join(str(value).split())
        print(f"  {key:<24} {text}")


def cmd_eval(args: argparse.Namespace) -> int:
    model, tokenizer = models.load(args.model, progress=not args.no_progress)
    result = {"model": args.model, **measure(model, tokenizer, args, speed=not args.no_speed)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _show(f"llmslim eval: {args.model}", result)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    manager = PassManager.from_recipe(args.recipe)
    manager.check()  # fail on a bad recipe before loading anything
    model, tokenizer = models.load(args.model, progress=not args.no_progress)
    text = data.read_text(args.calib) if args.calib else None
    batches = data.calibration_batches(tokenizer, text, n_samples=args.n_calib, seq_len=args.seq_len, seed=args.seed, protocol=args.protocol)
    original = copy.deepcopy(model)
    before = measure(model, tokenizer, args, speed=False)
    report = compress_(model, manager, calibration=batches, progress=not args.no_progress)
    after = measure(model, tokenizer, args, reference=original, speed=False)
    saved = None
    if args.out:  # the recipe is recorded in the manifest; `llmslim eval --model DIR` loads the folder
        from .hf import save_pretrained

        saved = str(save_pretrained(model, tokenizer, args.out, recipe=manager.to_recipe(), overwrite=args.overwrite))
    if args.json:
        print(json.dumps({"model": args.model, "before": before, "after": after, "report": report.to_dict(), "saved": saved}, indent=2))
    else:
        print(report)
        _show("before", before)
        _show("after", after)
        if saved:
            print(f"saved: {saved}")
    return 0


def register(sub: Any) -> None:
    """Add ``eval`` and ``compress`` to the ``llmslim`` command."""
    e = sub.add_parser("eval", help="perplexity (or fidelity), bytes and decode speed of a model")
    add_model_args(e)
    e.add_argument("--no-speed", action="store_true", help="skip the speed measurement and the sample")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compress", help="run a recipe on a model with docs-text calibration, compare before/after")
    add_model_args(c)
    c.add_argument("--recipe", required=True, help="recipe file (.toml or .json)")
    c.add_argument("--calib", help="a UTF-8 text file to calibrate on instead of the docs text")
    c.add_argument("--n-calib", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    c.add_argument("--out", help="save the compressed model to this folder (llmslim checkpoint + config + tokenizer)")
    c.add_argument("--overwrite", action="store_true", help="replace the --out folder if it exists")
    c.set_defaults(func=cmd_compress)
