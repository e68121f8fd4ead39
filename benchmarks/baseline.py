"""Baseline figures of the uncompressed real models, by the workbench protocol.

SmolLM2-135M-Instruct (float32): perplexity on both docs-text protocols (``reference`` must give
15.133 on Python 3.11's docs), weight bytes, prefill latency of 128 tokens and batch-1 greedy
decode speed with a KV cache. all-MiniLM-L6-v2: embedding fidelity (1.0 by definition for the
original) and encode throughput on 256 real sentences.

Run:  python benchmarks/baseline.py [--quick]; then python benchmarks/render_docs.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, print_table, table, write_result  # noqa: E402
from llmslim import data, evaluate, models  # noqa: E402


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    r, s = payload["results"], payload["settings"]
    smol = table(
        ["model", "protocol", "perplexity", "weight bytes", "prefill 128 tok (ms)", "decode (tok/s)"],
        [
            ["SmolLM2-135M float32", p, r[f"smollm2_perplexity_{p}"], r["smollm2_bytes"], r["smollm2_prefill_ms"], r["smollm2_decode_tokens_per_s"]]
            for p in ("default", "reference")
        ],
    )
    mini = table(
        ["model", "embedding fidelity", "weight bytes", "encode (sentences/s)"],
        [["all-MiniLM-L6-v2 float32", r["minilm_fidelity"], r["minilm_bytes"], r["minilm_sentences_per_s"]]],
    )
    return (
        f"{machine_line(payload)} Perplexity on the first {s['windows']} windows of {s['seq_len']} tokens; "
        f"speed is the median of {s['repeat']} runs after a warm-up, batch 1, {s['new_tokens']} decoded tokens.\n\n"
        f"{smol}\n\n{mini}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 windows instead of 64")
    args = parser.parse_args()
    settings = {"windows": 8 if args.quick else 64, "seq_len": 512, "repeat": 3 if args.quick else 5, "new_tokens": 32, "sentences": 256}
    torch.manual_seed(0)

    model, tokenizer = models.load_smollm2()
    results = {"smollm2_bytes": evaluate.model_bytes(model)}
    for protocol in ("default", "reference"):
        split = data.split_tokens(tokenizer, protocol=protocol)
        results[f"smollm2_perplexity_{protocol}"] = evaluate.perplexity(model, split.evaluation, max_windows=settings["windows"])
    speed = evaluate.decode_speed(model, split.evaluation, new_tokens=settings["new_tokens"], repeat=settings["repeat"])
    results.update({f"smollm2_{k}": v for k, v in speed.items()})
    del model

    encoder, enc_tokenizer = models.load_minilm()
    sentences = data.docs_sentences(settings["sentences"])
    results["minilm_bytes"] = evaluate.model_bytes(encoder)
    results["minilm_fidelity"] = evaluate.embedding_fidelity(encoder, encoder, enc_tokenizer, sentences)
    evaluate.sentence_embeddings(encoder, enc_tokenizer, sentences[:32])  # warm-up
    times = []
    for _ in range(settings["repeat"]):
        start = time.perf_counter()
        evaluate.sentence_embeddings(encoder, enc_tokenizer, sentences)
        times.append(time.perf_counter() - start)
    results["minilm_sentences_per_s"] = len(sentences) / sorted(times)[len(times) // 2]

    print_table("baseline (uncompressed)", ["measure", "value"], [[k, v] for k, v in results.items()])
    print(f"wrote {write_result('baseline', settings, results, quick=args.quick)}")


if __name__ == "__main__":
    main()
