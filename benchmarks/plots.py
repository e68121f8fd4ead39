"""PNG plots of the benchmark results: quality versus size, speed-up versus bits, per-layer error.

* ``quality_vs_bytes.png``: perplexity (ratio to the float32 model of the same result file) versus
  bytes per weight of the compressed linear layers, every method and peer row of
  ``quant_quality.json`` and ``prune_quality.json`` (and ``peer_llmcompressor.json`` when present);
  peers are crosses, the Pareto front (no other row both smaller and better) is a dashed line; its
  points, the peers and the best row of each family are labelled.
* ``speedup_vs_bits.png``: speed-up over float32 versus weight bits from ``quant_speed.json``:
  each layer shape and token count, whole SmolLM2 prefill and decode, torchao's int8 layer, w8a8.
* ``layer_error.png``: the mean per-layer error of each decoder block, for every result row that
  records ``layer_errors`` (module name -> the error its pass reported); skipped when none does.

Reads the full results (``--quick``: the ``*-quick.json`` files) and writes into docs/img/
(``--quick``: build/plots-quick/) or ``--out DIR``. The output is deterministic: fixed sizes,
resolution and fonts, no timestamps or software tags in the PNG metadata.

Run:  python benchmarks/plots.py [--quick] [--out DIR]   (needs matplotlib: pip install -e ".[plot]")
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
OURS = {"rtn", "gptq", "registry", "fp8", "smoothquant", "w8a8", "qat"}  # quant_quality's config["method"] of llmslim rows
PEER_PREFIXES = ("torch-", "torchao", "torch.ao", "llm-compressor", "llmcompressor")
QUALITY_FILES = ("quant_quality", "prune_quality", "peer_llmcompressor")
SIZE, DPI = (9.0, 5.5), 100


class Point(NamedTuple):
    label: str
    bytes_per_weight: float
    ratio: float
    family: str
    peer: bool


def load(name: str, quick: bool, results: Path = RESULTS) -> dict[str, Any] | None:
    path = results / f"{name}{'-quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rows(results: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Result rows with a perplexity: top-level ones and those one section down (``smollm2``, a peer's
    section), never the ablation or MiniLM sections."""
    for key, row in results.items():
        if not isinstance(row, dict) or key in ("ablation", "minilm"):
            continue
        for k, v in (row.items() if "perplexity" not in row else [(key, row)]):
            if isinstance(v, dict) and isinstance(v.get("perplexity"), (int, float)) and "skipped" not in v:
                yield k, v


def _reference(results: dict[str, Any]) -> float | None:
    """The float32 perplexity a file's ratios are to."""
    dense = results.get("float32") or results.get("dense") or {}
    return dense.get("perplexity") or dense.get("perplexity_llmslim") or results.get("dense_perplexity")


def _bytes_per_weight(row: dict[str, Any]) -> float | None:
    if row.get("bytes_per_weight") is not None:
        return float(row["bytes_per_weight"])
    if row.get("bytes_ratio") is not None:  # prune_quality: stored bytes over dense float16 (2 bytes a weight)
        return 2.0 * row["bytes_ratio"]
    if row.get("storage") == ["dense"]:  # a peer that only masks: the float32 weights stay as they are
        return 4.0
    return None


def _family(key: str, row: dict[str, Any], peer: bool) -> str:
    if peer:
        return "peers"
    if "+gptq" in key or "joint" in key:
        return "sparse + int4"
    word = re.split(r"[ \-+]", key)[0]
    return {"gptq4": "gptq"}.get(word, word)


def quality_points(payloads: dict[str, dict[str, Any]]) -> tuple[list[Point], list[str]]:
    """Every row with a perplexity and a size, as points; and the rows left out, with the reason."""
    points, left = [Point("float32", 4.0, 1.0, "float32", False)], []
    for name, payload in payloads.items():
        r = payload["results"]
        reference = _reference(r)
        for key, row in _rows(r):
            if key in ("float32", "dense"):
                continue
            method = str(row.get("config", {}).get("method", ""))
            peer = name.startswith("peer_") or key.startswith(PEER_PREFIXES) or bool(method and method not in OURS)
            ratio = row.get("perplexity_ratio") or (row["perplexity"] / reference if reference else None)
            bpw = _bytes_per_weight(row)
            if ratio is None or bpw is None:
                left.append(f"{name}: {key} ({'no size' if bpw is None else 'no float reference'})")
                continue
            points.append(Point(key, bpw, float(ratio), _family(key, row, peer), peer))
    return points, left


def pareto(points: list[Point]) -> list[Point]:
    """The points no other point beats on both size and quality, smallest first."""
    front = [p for p in points if not any(q.bytes_per_weight <= p.bytes_per_weight and q.ratio <= p.ratio
                                          and (q.bytes_per_weight, q.ratio) != (p.bytes_per_weight, p.ratio) for q in points)]
    return sorted(set(front), key=lambda p: (p.bytes_per_weight, p.ratio, p.label))  # sets iterate by hash: sort fully


class Series(NamedTuple):
    name: str
    points: list[tuple[float, float]]  # (weight bits, speed-up over float32)
    group: str  # the line whose colour it takes (itself for a line)
    kind: str  # "line", "peer" or "w8a8"


def speed_series(payload: dict[str, Any]) -> list[Series]:
    """Speed-up over float32 versus weight bits from quant_speed.json: a line per layer shape and token count
    and for whole-SmolLM2 prefill and decode; torchao's layers and w8a8 (int8 activations too) as extra points."""
    r, s = payload["results"], payload["settings"]
    bits = {n: float(c["bits"]) for n, c in s.get("layers", {}).items()}
    out: list[Series] = []
    for row in r.get("layers", []):
        where = f"layer {row['shape']}, {row['tokens']} token{'s' if row['tokens'] != 1 else ''}"
        out.append(Series(where, sorted([(32.0, 1.0), *((bits[n], v) for n, v in row["speedup"].items() if n in bits)]), where, "line"))
        out += [Series(f"{n}: {where}", [(b, v)], where, "peer") for n, v in row["speedup"].items() if n not in bits and (b := _bits(n))]
    smol = r.get("smollm2", {})
    if "float32" in smol:
        f32 = smol["float32"]
        variants = [(n, b) for n in smol if n != "float32" and (b := _bits(n))]
        decode = sorted([(32.0, 1.0), *((b, smol[n]["decode_tokens_per_s"] / f32["decode_tokens_per_s"]) for n, b in variants)])
        prefill = sorted([(32.0, 1.0), *((b, f32["prefill_ms"] / smol[n]["prefill_ms"]) for n, b in variants)])
        out += [Series("SmolLM2 decode", decode, "SmolLM2 decode", "line"),
                Series("SmolLM2 prefill 128 tokens", prefill, "SmolLM2 prefill 128 tokens", "line")]
    for name, row in r.get("w8a8", {}).get("smollm2", {}).items():
        if name != "float32" and "decode_speedup" in row:
            out += [Series(f"{name}: decode", [(8.0, row["decode_speedup"])], "SmolLM2 decode", "w8a8"),
                    Series(f"{name}: prefill", [(8.0, row["prefill_speedup"])], "SmolLM2 prefill 128 tokens", "w8a8")]
    return out


def _bits(name: str) -> float | None:
    m = re.search(r"int(\d+)|w(\d+)a", name)
    return float(m.group(1) or m.group(2)) if m else None


def layer_error_series(payloads: dict[str, dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``file: row`` -> [(block index, mean error of its layers)] for every row that records ``layer_errors``."""
    out = {}
    for name, payload in payloads.items():
        for key, row in _rows(payload["results"]):
            errors = row.get("layer_errors")
            if not errors:
                continue
            blocks: dict[int, list[float]] = {}
            for i, (module, err) in enumerate(errors.items()):
                m = re.search(r"layers\.(\d+)\.", module)
                blocks.setdefault(int(m.group(1)) if m else i, []).append(float(err))
            out[f"{name}: {key}"] = sorted((b, sum(v) / len(v)) for b, v in blocks.items())
    return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots.py needs matplotlib: pip install -e \".[plot]\" (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcdefaults()  # no user matplotlibrc: the same bytes on every machine with this matplotlib
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 10, "legend.fontsize": 7})
    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _label(ax: Any, placed: list[tuple[float, float, float, float]], x: float, y: float, text: str) -> None:
    """Annotate (x, y) at the first nearby offset whose text box overlaps no label already placed (boxes in points)."""
    px, py = (v * 72 / DPI for v in ax.transData.transform((x, y)))
    w, h = 4.0 * len(text) + 2, 8.0  # 7-point text
    right, left = (4, -w - 4) if px + w + 4 < ax.bbox.x1 * 72 / DPI else (-w - 4, 4)  # stay inside the axes
    tries = [(side + (k * 8 if side > 0 else -k * 8), dy) for k in range(6) for dy in (2 + 10 * k, -10 - 10 * k) for side in (right, left)]
    for dx, dy in tries:
        box = (px + dx, py + dy, w, h)
        if not any(box[0] < b[0] + b[2] and b[0] < box[0] + w and box[1] < b[1] + b[3] and b[1] < box[1] + h for b in placed):
            break
    placed.append(box)
    leader = {"arrowstyle": "-", "lw": 0.5, "color": "grey"} if abs(dy) > 10 else None  # far labels point at their marker
    ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7, arrowprops=leader)


def plot_quality(plt: Any, payloads: dict[str, dict[str, Any]], path: Path) -> Path | None:
    points, left = quality_points(payloads)
    for why in left:
        print(f"  left out of {path.name}: {why}")
    if len(points) < 2:
        print(f"skip {path.name}: no quality rows")
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    families = sorted({p.family for p in points if not p.peer})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for fam in families:
        ps = [p for p in points if p.family == fam and not p.peer]
        ax.scatter([p.bytes_per_weight for p in ps], [p.ratio for p in ps], s=22, color=colors[fam], label=fam, zorder=3)
    peers = [p for p in points if p.peer]
    if peers:
        ax.scatter([p.bytes_per_weight for p in peers], [p.ratio for p in peers], s=36, marker="X", color="black", label="peers", zorder=3)
    front = pareto(points)
    ax.step([p.bytes_per_weight for p in front], [p.ratio for p in front], where="post", ls="--", color="grey", lw=1,
            label="Pareto front", zorder=2)
    ratios = [p.ratio for p in points]
    if max(ratios) / min(ratios) > 10:
        ax.set_yscale("log")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.3, 5)
    ax.set_xticks([0.5, 1, 2, 4], labels=["0.5", "1", "2", "4"])
    ax.set_xlabel("bytes per weight of the compressed linear layers (float32 = 4)")
    ax.set_ylabel("perplexity / float32 perplexity (same result file)")
    ax.set_title("SmolLM2-135M: quality versus size (" + ", ".join(f"{n}.json" for n in payloads) + ")")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    placed: list[tuple[float, float, float, float]] = []
    labels: dict[tuple[float, float], list[str]] = {}  # points at the same place share one label
    best = [min((p for p in points if p.family == fam and not p.peer), key=lambda p: p.ratio) for fam in families]
    for p in sorted({*front, *peers, *best}, key=lambda p: (p.bytes_per_weight, p.ratio, p.label)):
        labels.setdefault((p.bytes_per_weight, p.ratio), []).append(p.label)
    for (x, y), names in labels.items():
        _label(ax, placed, x, y, " = ".join(names))
    return _save(plt, fig, path)


def plot_speed(plt: Any, payload: dict[str, Any] | None, path: Path) -> Path | None:
    if payload is None:
        print(f"skip {path.name}: no quant_speed result")
        return None
    series = speed_series(payload)
    fig, ax = plt.subplots(figsize=SIZE)
    lines = [x for x in series if x.kind == "line"]
    color = {x.name: plt.cm.tab10(i % 10) for i, x in enumerate(lines)}
    for x in lines:
        xs, ys = zip(*x.points)
        ax.plot(xs, ys, marker="o", color=color[x.name], lw=2 if x.name.startswith("SmolLM2") else 1, label=x.name)
    for kind, marker, text in (("peer", "X", "torchao int8 weight-only (bfloat16), coloured as its layer"),
                               ("w8a8", "D", "w8a8, smoothquant + w8a8 (int8 activations too), coloured as its SmolLM2 line")):
        extra = [x for x in series if x.kind == kind]
        for x in extra:
            xs, ys = zip(*x.points)
            ax.scatter(xs, ys, marker=marker, s=40, color=color.get(x.group, "black"), edgecolor="black", zorder=3)
        if extra:
            ax.scatter([], [], marker=marker, color="white", edgecolor="black", label=text)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks([4, 8, 16, 32], labels=["4", "8", "16", "32"])
    ax.set_xlabel("weight bits")
    ax.set_ylabel("speed-up over float32 (higher is faster)")
    ax.set_title(f"Packed low-bit speed, {payload['settings'].get('threads', '?')} threads (quant_speed.json)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_layer_error(plt: Any, payloads: dict[str, dict[str, Any]], path: Path) -> Path | None:
    series = layer_error_series(payloads)
    if not series:
        print(f"skip {path.name}: no result row records layer_errors (rerun benchmarks/prune_quality.py to record them)")
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    for name, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=".", lw=1, label=name)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("mean error of the block's layers (as the pass reports it)")
    ax.set_title("Per-layer error, from the passes' Reports")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return _save(plt, fig, path)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plot the *-quick.json results (default out: build/plots-quick/)")
    parser.add_argument("--out", type=Path, help="folder for the PNG files (default docs/img/)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or (ROOT / "build" / "plots-quick" if args.quick else ROOT / "docs" / "img")
    plt = _pyplot()
    quality = {n: p for n in QUALITY_FILES if (p := load(n, args.quick, args.results)) is not None}
    written = [plot_quality(plt, quality, out / "quality_vs_bytes.png"),
               plot_speed(plt, load("quant_speed", args.quick, args.results), out / "speedup_vs_bits.png"),
               plot_layer_error(plt, quality, out / "layer_error.png")]
    return [p for p in written if p is not None]


if __name__ == "__main__":
    main()
    sys.exit(0)
