"""The llm-compressor side of ``peer_llmcompressor.py``; runs inside ``.venv-llmcompressor``.

It imports nothing from llmslim (that venv has llm-compressor's own ``transformers``): the driver
hands it the token ids, and it loads SmolLM2 from the same GGUF file, scores the dense model,
applies llm-compressor's GPTQ for each requested row, scores the result against the dense model,
saves it compressed and counts the bytes of that checkpoint.

Run by the driver as:  .venv-llmcompressor/bin/python _llmcompressor_child.py INPUTS_DIR OUT_JSON
INPUTS_DIR holds ``tokens.safetensors`` (``calibration`` [n, seq_len] and ``evaluation``
[m, seq_len] int64) and ``spec.json`` (GGUF folder and file, threads, rows).
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("llmcompressor", "compressed-tensors", "transformers", "torch", "gguf", "accelerate"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def target_names(model: torch.nn.Module) -> list[str]:
    # the layers the llmslim rows quantize: every nn.Linear but lm_head
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


@torch.no_grad()
def score(model: torch.nn.Module, reference: torch.nn.Module | None, windows: torch.Tensor) -> tuple[float, float | None]:
    """Perplexity of ``model`` and mean KL(reference || model) per position, one window per
    forward: the definitions of ``llmslim.evaluate.perplexity`` / ``kl_divergence`` (the mean NLL
    over the ``seq_len - 1`` predicted tokens of every window, in float64, exponentiated)."""
    nll = kl = 0.0
    count = positions = 0
    for chunk in windows.split(1):
        logq = torch.log_softmax(model(input_ids=chunk).logits.float(), -1)
        nll -= logq[:, :-1].gather(-1, chunk[:, 1:, None]).double().sum().item()
        count += chunk[:, 1:].numel()
        if reference is not None:
            logp = torch.log_softmax(reference(input_ids=chunk).logits.float(), -1)
            kl += F.kl_div(logq, logp, log_target=True, reduction="sum").double().item()
            positions += chunk.numel()
    return math.exp(nll / count), (kl / positions if reference is not None else None)


def modifier(row: dict[str, Any], ignore: list[str]) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = dict(num_bits=row["bits"], type="int", symmetric=row["symmetric"], strategy="group",
                   group_size=row["group_size"], dynamic=False)
    if row.get("observer"):
        weights["observer"] = row["observer"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore, actorder=row.get("actorder", "static"),
                        dampening_frac=row.get("damp", 0.01), block_size=128)


def checkpoint_bytes(folder: Path, names: list[str], shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Bytes the compressed checkpoint holds: all tensors, the target linears' tensors (packed
    codes, scales, zero points, shape records; biases excluded) per weight, and files on disk."""
    total = linear = 0
    per_layer: dict[str, set[str]] = {n: set() for n in names}
    dtypes: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                t = fh.get_slice(key)
                shape, dtype = t.get_shape(), t.get_dtype()
                nbytes = math.prod(shape) * {"I64": 8, "F64": 8, "I32": 4, "F32": 4, "BF16": 2, "F16": 2, "I16": 2,
                                             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}[dtype]
                total += nbytes
                owner, _, leaf = key.rpartition(".")
                if owner in per_layer and leaf != "bias":
                    linear += nbytes
                    per_layer[owner].add(leaf)
                    dtypes.setdefault(leaf, dtype)
    weights = sum(o * i for o, i in shapes.values())
    float_layers = sum(1 for leaves in per_layer.values() if "weight" in leaves)
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    layouts = sorted({",".join(sorted(v)) for v in per_layer.values()})
    return {"bytes_per_weight": linear / weights, "float_layers": float_layers, "model_bytes": total,
            "checkpoint_file_bytes": disk, "linear_tensors": layouts, "tensor_dtypes": dtypes}


def run_row(dense: torch.nn.Module, tokenizer: Any, row: dict[str, Any], calibration: torch.Tensor,
            evaluation: torch.Tensor, base: float, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    model = copy.deepcopy(dense)
    names = target_names(model)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(), "attention_mask": torch.ones_like(calibration).tolist()})
    reset_session()
    start = time.perf_counter()
    try:
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier(row, ["lm_head"]),
                num_calibration_samples=len(calibration), max_seq_length=calibration.shape[1],
                shuffle_calibration_samples=False, pipeline="sequential")
    except Exception as exc:  # the reason the peer cannot do this row, recorded in the table
        text = str(exc).strip()
        return {"skipped": f"{type(exc).__name__}: {text[:600]}", "traceback_tail": traceback.format_exc().splitlines()[-6:]}
    seconds = time.perf_counter() - start
    ppl, kl = score(model, dense, evaluation)
    out = workdir / "compressed"
    model.save_pretrained(str(out), save_compressed=True)
    stored = checkpoint_bytes(out, names, shapes)
    config = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    del model
    return {"perplexity": ppl, "perplexity_ratio": ppl / base, "kl": kl, **stored, "seconds": seconds,
            "calibration_windows": len(calibration), "quantized_layers": len(names) - stored["float_layers"],
            "format": config.get("format"), "quantization_config": config.get("config_groups")}


def plain_model(transformers: Any, spec: dict[str, Any], config_dir: Path) -> torch.nn.Module:
    """SmolLM2 from the GGUF file as a plain float32 model.

    transformers loads the GGUF weights dequantized into ordinary ``nn.Linear`` layers but keeps
    the model marked as GGUF-quantized, which ``oneshot`` refuses ("already quantized in a
    different format (gguf)"). The same weights go into a model built from the config without
    that mark, and ``name_or_path`` points at a folder holding just that config, which
    ``oneshot`` re-reads (a GGUF folder has no config.json).
    """
    loaded = transformers.AutoModelForCausalLM.from_pretrained(spec["gguf_folder"], gguf_file=spec["gguf_file"], dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    model.config.save_pretrained(str(config_dir))
    model.config.name_or_path = str(config_dir)
    return model.eval()


def main() -> None:
    inputs, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    spec = json.loads((inputs / "spec.json").read_text())
    torch.set_num_threads(int(spec["threads"]))
    tokens = load_file(str(inputs / "tokens.safetensors"))
    calibration, evaluation = tokens["calibration"].long(), tokens["evaluation"].long()
    import transformers

    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["gguf_folder"], gguf_file=spec["gguf_file"])
    dense = plain_model(transformers, spec, inputs / "dense-config")
    load_seconds = time.perf_counter() - start
    base, _ = score(dense, None, evaluation)
    result: dict[str, Any] = {"versions": versions(), "threads": torch.get_num_threads(),
                              "dense": {"perplexity": base, "load_seconds": load_seconds,
                                        "quantizable_layers": len(target_names(dense))},
                              "rows": {}}
    out_json.write_text(json.dumps(result, indent=2))
    for name, row in spec["rows"].items():
        with tempfile.TemporaryDirectory(prefix="llmc-") as tmp:
            result["rows"][name] = {"config": row, **run_row(dense, tokenizer, row, calibration, evaluation, base, Path(tmp))}
        print(name, json.dumps({k: v for k, v in result["rows"][name].items() if k not in ("config", "quantization_config")}), file=sys.stderr, flush=True)
        out_json.write_text(json.dumps(result, indent=2))  # after every row: a stopped run keeps what it measured
    print(json.dumps(result))


if __name__ == "__main__":
    main()
