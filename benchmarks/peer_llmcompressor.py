"""llm-compressor's GPTQ on SmolLM2-135M, on the same calibration and evaluation windows as
``quant_quality.py``, for its figures to sit beside ours.

llm-compressor pins its own ``transformers``, so it lives in a separate virtual environment and
runs in a child process (``_llmcompressor_child.py``). This driver, run with the main venv,
prepares the inputs with llmslim (the cached SmolLM2 GGUF file; the seeded calibration windows and
the evaluation windows exactly as ``quant_quality.py`` builds them), scores the dense model with
``llmslim.evaluate.perplexity`` on those windows, and hands the token ids to the child, which
loads the same GGUF file with its own ``transformers``, checks its dense perplexity against ours,
applies ``GPTQModifier`` to every decoder linear (``lm_head`` ignored) and measures perplexity, KL
to float32, the bytes of the checkpoint it saves with ``save_compressed=True``, and the wall time
of ``oneshot``.

The venv (once; a CPU torch first, pinned, so llm-compressor's requirements cannot pull another):

    python3.11 -m venv .venv-llmcompressor
    .venv-llmcompressor/bin/pip install torch==2.13.0
    .venv-llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf safetensors

Run:  python benchmarks/peer_llmcompressor.py [--quick] [--venv PATH] [--threads N];
then python benchmarks/render_docs.py. Without the venv it prints why it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-llmcompressor"
CHILD = HERE / "_llmcompressor_child.py"
CREATE = ("python3.11 -m venv .venv-llmcompressor && .venv-llmcompressor/bin/pip install torch==2.13.0 && "
          ".venv-llmcompressor/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf safetensors")

# llm-compressor's GPTQModifier settings per row: int4 asymmetric groups (our default grid), static
# act-order (its default; columns by decreasing Hessian diagonal, groups kept in place, as our
# act_order=True) and damp 0.01 (both sides' default). g128 is the W4A16_ASYM preset's group size.
ROWS: dict[str, dict[str, Any]] = {
    "llm-compressor gptq int4 g128": dict(bits=4, group_size=128, symmetric=False, actorder="static", damp=0.01),
    "llm-compressor gptq int4 g64": dict(bits=4, group_size=64, symmetric=False, actorder="static", damp=0.01),
    "llm-compressor gptq int4 g64 mse": dict(bits=4, group_size=64, symmetric=False, actorder="static", damp=0.01,
                                             observer="memoryless_mse"),
}
# our rows shown beside them: from quant_quality's result file when that run used the same windows
# and calibration (full mode), else measured here with quant_quality's own code (--ours run forces it)
OURS = ("gptq int4 g128", "gptq int4 g64")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def prepare(args: argparse.Namespace, folder: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """Write the token ids and the child's spec into ``folder``; return the dense check from our
    side (``llmslim.evaluate.perplexity`` on the same windows). Without ``ours`` (no
    quant_quality result of these windows), run our GPTQ rows here and fill it in."""
    import torch
    from safetensors.torch import save_file

    from llmslim import data, evaluate, models
    from llmslim._fetch import ensure

    torch.set_num_threads(args.threads)
    model, tokenizer = models.load_smollm2(progress=False)
    split = data.split_tokens(tokenizer, protocol="default")
    batches = data.calibration_batches(text=split.calibration, n_samples=args.calibration, seq_len=512, seed=0)
    calibration = torch.cat([b["input_ids"] for b in batches])
    evaluation = data.windows(split.evaluation, 512, args.windows)
    dense = evaluate.perplexity(model, split.evaluation, seq_len=512, max_windows=args.windows, progress=False)
    if not ours.get("rows"):
        ours.update(run_ours(model, split.evaluation, batches, args.windows))
    del model
    save_file({"calibration": calibration.contiguous(), "evaluation": evaluation.contiguous()}, str(folder / "tokens.safetensors"))
    spec = {"gguf_folder": str(ensure(models.SMOLLM2, progress=False)), "gguf_file": models.SMOLLM2_GGUF,
            "threads": args.threads, "rows": ROWS}
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    return {"perplexity_llmslim": dense, "calibration_shape": list(calibration.shape), "evaluation_shape": list(evaluation.shape)}


def run_ours(model: Any, evaluation: Any, calibration: list[Any], windows: int) -> dict[str, Any]:
    """Our GPTQ rows on these windows, measured by quant_quality's own code."""
    import quant_quality as qq

    cached = qq.reference_logprobs(model, evaluation, windows)

    def measure(m: Any) -> dict[str, float]:
        ppl, kl = qq.score(m, model, evaluation, windows, cached)
        return {"perplexity": ppl, "perplexity_ratio": ppl / base, "kl": kl}

    base, _ = qq.score(model, model, evaluation, windows, cached)
    rows = {}
    for name in OURS:
        rows[name] = {"config": qq.SMOLLM2[name], **qq.run_row(model, model, qq.SMOLLM2[name], calibration, measure)}
        print(name, {k: v for k, v in rows[name].items() if k != "config"}, flush=True)
    return {"source": "this run (benchmarks/quant_quality.py's rows and scoring)", "float32": {"perplexity": base}, "rows": rows}


def ours_rows(windows: int, calibration: int) -> dict[str, Any]:
    """Our float32 and GPTQ rows from quant_quality's result file of the same windows, if any."""
    from _common import RESULTS

    for name in ("quant_quality.json", "quant_quality-quick.json"):
        path = RESULTS / name
        if not path.exists():
            continue
        payload = json.loads(path.read_text())
        s, r = payload["settings"], payload["results"]
        if s.get("windows") == windows and s.get("calibration_windows") == calibration and s.get("seq_len") == 512:
            rows = {k: r["smollm2"][k] for k in OURS if k in r.get("smollm2", {})}
            return {"source": f"`benchmarks/results/{name}`", "float32": r.get("float32"), "rows": rows,
                    "versions": payload["machine"].get("versions")}
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 calibration windows, 2 evaluation windows (32 and 32 without)")
    parser.add_argument("--venv", type=Path, default=VENV, help="llm-compressor's virtual environment (default: .venv-llmcompressor)")
    parser.add_argument("--ours", choices=("auto", "run"), default="auto",
                        help="our GPTQ rows: from quant_quality's result of the same windows if any (auto), or measured here (run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both processes (1 suits a shared machine)")
    args = parser.parse_args(argv)
    python = venv_python(args.venv)
    if not python.exists():
        print(f"skipped: no llm-compressor venv at {args.venv} ({python} missing); create it with: {CREATE}")
        return 0
    args.calibration, args.windows = (4, 2) if args.quick else (32, 32)
    sys.path.insert(0, str(HERE))
    from _common import write_result

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the child must see only its own venv's packages
    ours = {} if args.ours == "run" else ours_rows(args.windows, args.calibration)
    with tempfile.TemporaryDirectory(prefix="peer-llmc-") as tmp:
        folder = Path(tmp)
        dense = prepare(args, folder, ours)
        start = time.perf_counter()
        proc = subprocess.run([str(python), str(CHILD), str(folder), str(folder / "out.json")], env=env, cwd=tmp)
        wall = time.perf_counter() - start
        if not (folder / "out.json").exists():
            print(f"llm-compressor child failed (exit {proc.returncode}) before writing any result; see its output above")
            return 1
        child = json.loads((folder / "out.json").read_text())
    if proc.returncode != 0:
        print(f"llm-compressor child exited {proc.returncode}; keeping the rows it finished")
    theirs = child["dense"]["perplexity"]
    dense.update(perplexity_child=theirs, relative_difference=abs(theirs - dense["perplexity_llmslim"]) / dense["perplexity_llmslim"],
                 child_load_seconds=child["dense"]["load_seconds"], quantizable_layers=child["dense"]["quantizable_layers"])
    if dense["relative_difference"] > 1e-3:
        print(f"warning: the child's dense perplexity {theirs:.6g} differs from ours {dense['perplexity_llmslim']:.6g} by more than 1e-3 relative")
    if ours.get("float32") and "results/" in ours["source"]:  # not when our rows ran here
        dense["perplexity_quant_quality"] = ours["float32"]["perplexity"]
    settings = {"windows": args.windows, "seq_len": 512, "protocol": "default", "calibration_windows": args.calibration,
                "calibration_seed": 0, "threads": args.threads, "rows": ROWS, "child_exit": proc.returncode}
    results = {"versions": child["versions"], "dense": dense, "llmcompressor": child["rows"], "ours": ours,
               "child_wall_seconds": wall}
    path = write_result("peer_llmcompressor", settings, results, quick=args.quick)
    print(json.dumps({"dense": dense, **{k: {m: v.get(m) for m in ("perplexity", "kl", "bytes_per_weight", "seconds", "skipped")}
                                          for k, v in child["rows"].items()}}, indent=2))
    print(f"wrote {path}")
    return 0 if proc.returncode == 0 else 1


def render_markdown(payload: dict) -> str:
    """The docs block for one result file."""
    from _common import machine_line, table

    s, r = payload["settings"], payload["results"]
    v, d = r["versions"], r["dense"]
    head = ["SmolLM2-135M", "perplexity", "ratio", "KL (nats/token)", "bytes/weight", "float layers", "model MB", "seconds"]
    rows = [["float32 (llmslim)", d["perplexity_llmslim"], 1.0, 0.0, 4.0, 0, "-", "-"],
            [f"float32 (transformers {v['transformers']})", d["perplexity_child"], d["perplexity_child"] / d["perplexity_llmslim"], "-", 4.0, 0, "-", "-"]]
    skipped = []
    for name, row in r.get("ours", {}).get("rows", {}).items():
        if "skipped" in row:
            skipped.append(f"- `llmslim {name}`: {row['skipped']}")
            continue
        rows.append([f"llmslim {name}", row["perplexity"], row["perplexity_ratio"], row["kl"], row["bytes_per_weight"],
                     row["float_layers"], row["model_bytes"] / 1e6, row["seconds"]])
    for name, row in r["llmcompressor"].items():
        if "skipped" in row:
            skipped.append(f"- `{name}`: {row['skipped'].splitlines()[0]}")
            continue
        rows.append([name, row["perplexity"], row["perplexity_ratio"], row["kl"], row["bytes_per_weight"],
                     row["float_layers"], row["model_bytes"] / 1e6, row["seconds"]])
    dtypes = next((row["tensor_dtypes"] for row in r["llmcompressor"].values() if "tensor_dtypes" in row), {})
    stored = ", ".join(f"`{k}` {t.lower()}" for k, t in sorted(dtypes.items())) or "no row ran"
    ours = r.get("ours", {})
    beside = (f"The llmslim GPTQ rows are from {ours['source']}, on the same windows and calibration." if ours.get("rows")
              else "No quant_quality result with the same windows exists, so our GPTQ rows are not repeated here.")
    parts = [
        f"{machine_line(payload)} llm-compressor {v['llmcompressor']} (compressed-tensors {v['compressed-tensors']}, "
        f"transformers {v['transformers']}, torch {v['torch']}) in its own venv. Perplexity and KL divergence to float32 "
        f"on the first {s['windows']} windows of {s['seq_len']} tokens of the docs-text evaluation split ({s['protocol']} "
        f"protocol); calibration on the same {s['calibration_windows']} seeded 512-token windows as `quant_quality.py`. "
        f"GPTQModifier on every decoder linear (`lm_head` ignored), int4 asymmetric groups, static act-order, damp 0.01, "
        f"its sequential pipeline; `mse` rows use its `memoryless_mse` observer, the others min/max. bytes/weight and "
        f"model MB count the tensors of the checkpoint it saves with `save_compressed=True` ({stored}; our int4 scales are "
        f"bfloat16). Seconds are `oneshot`'s wall time "
        f"on a shared machine, {s['threads']} thread(s). {beside}",
        table(head, rows),
    ]
    if skipped:
        parts.append("Rows that did not run, with the reason:\n\n" + "\n".join(skipped))
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
