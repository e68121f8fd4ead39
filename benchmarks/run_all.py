"""Run the whole benchmark suite: every script of benchmarks/, one after another, then the docs and plots.

Each script runs as a child process of this Python, never two at once (their timings must not
disturb each other), with its output streaming through. ``--quick`` passes each script's own
``--quick``; the long ones (quality, training and structured benchmarks) run only a few of their
rows in quick mode, the peers' rows among them, so a quick run still compares side by side. A
script may declare a reason to skip it in quick mode, printed (name it in ``--only`` to run it). The
llm-compressor peer driver runs only when it and its virtual environment ``.venv-llmcompressor``
exist. Afterwards: ``render_docs.py`` (the docs show full results, and this suite's own record,
quick while no full run exists), then
``plots.py`` when matplotlib is importable; a summary table (script, status, wall seconds, JSON
written) is printed and written to ``results/run_all[-quick].json``.

Run:  python benchmarks/run_all.py [--quick] [--only NAME ...] [--skip NAME ...] [--threads N]
      [--dry-run] [--keep-going]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


@dataclasses.dataclass(frozen=True)
class Script:
    """One benchmark script and how the suite runs it."""

    name: str
    quick_args: tuple[str, ...] = ("--quick",)  # what --quick passes to it
    quick_skip: str = ""  # why it is skipped in quick mode ("" = it runs)
    needs: str = ""  # a path (from the repository root) that must exist, else it is skipped

    @property
    def path(self) -> Path:
        return HERE / f"{self.name}.py"


# Quick mode runs the long scripts on a few of their rows (peers included, so a quick run still
# compares against torchao, torch's pruning utilities and Torch-Pruning); their --only merges those
# rows into the script's own *-quick.json. Times are from run_all-quick.json (2-core CPU).
SCRIPTS: tuple[Script, ...] = (
    Script("baseline"),
    Script("calibration"),
    Script("checkpoint", quick_args=("--part", "big", "--quick")),  # its --quick covers the 1.1B part only
    Script("core_overhead"),
    Script("prune_quality", quick_args=("--quick", "--no-ablation", "--only", "magnitude-50", "wanda-50", "torch-l1-50",
                                        "torchao-wanda-50")),
    Script("quant_quality", quick_args=("--quick", "--only", "rtn int8,torchao int8 weight-only,rtn int4 g64,"
                                        "torchao int4 weight-only g64")),
    Script("quant_speed"),
    Script("qat", quick_args=("--quick", "--steps", "2")),
    Script("distill", quick_args=("--quick", "--only", "wanda", "wanda+kd")),
    Script("structured", quick_args=("--quick", "--only", "channels-l2", "tp-magnitude")),
    Script("peer_llmcompressor", needs=".venv-llmcompressor"),
)
NAMES = tuple(s.name for s in SCRIPTS)


def flags(path: Path) -> set[str]:
    """The ``--options`` a script's argparse declares (read from its source, without importing it)."""
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", path.read_text(encoding="utf-8")))


def command(script: Script, *, quick: bool, threads: int | None, explicit: bool = False) -> tuple[list[str] | None, str]:
    """The command that runs ``script``, or ``None`` and the reason it is skipped.

    Args:
        script: The script.
        quick: Quick mode.
        threads: Torch threads to pass as ``--threads`` where the script takes it.
        explicit: Named in ``--only``: run it in quick mode even if its quick mode is long.
    """
    if not script.path.exists():
        return None, f"no {script.path.relative_to(ROOT)}"
    if script.needs and not (ROOT / script.needs).exists():
        return None, f"no {script.needs} (its virtual environment)"
    declared = flags(script.path)
    args: list[str] = []
    if quick:
        if "--quick" not in declared:
            return None, "it has no --quick"
        if script.quick_skip and not explicit:
            return None, f"{script.quick_skip}; name it in --only to run it"
        args += script.quick_args
    if threads is not None and "--threads" in declared:
        args += ["--threads", str(threads)]
    return [sys.executable, str(script.path.relative_to(ROOT)), *args], ""


def _snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")} if RESULTS.exists() else {}


def run_one(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one child (output streaming through); its status, wall seconds and the JSON files it wrote."""
    before = _snapshot()
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    seconds = time.perf_counter() - start
    after = _snapshot()
    written = sorted(f"results/{n}" for n, t in after.items() if before.get(n) != t)
    return {"status": "ok" if rc == 0 else f"failed (exit {rc})", "seconds": seconds, "json": written}


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _selected(args: argparse.Namespace) -> list[Script]:
    return [s for s in SCRIPTS if (not args.only or s.name in args.only) and s.name not in (args.skip or ())]


def _shell(cmd: list[str]) -> str:
    return " ".join(shlex.quote("python" if i == 0 else c) for i, c in enumerate(cmd))


def render_markdown(payload: dict) -> str:
    """The docs block for results/run_all[-quick].json: what the last suite run did and how long each part took."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import machine_line, table

    rows = [[r["script"], r["status"], r["seconds"] if r["seconds"] is not None else "-", ", ".join(r["json"]) or "-",
             r["note"] or "-"] for r in payload["results"]["scripts"]]
    s = payload["settings"]
    threads = f"OMP_NUM_THREADS={s['threads']}" if s.get("threads") else "default threads"
    run = "python benchmarks/run_all.py" + (" --quick" if s.get("quick") else "")
    quick = (" No full suite run is recorded yet: this is the quick one (each script's short mode, the long scripts on "
             "a few rows; its results go to the `*-quick.json` files, which this page never shows).") if s.get("quick") else ""
    return (f"{machine_line(payload)} `{run}` ({threads}); wall seconds per script, one script at a time.{quick}\n\n" + table(["script", "status", "wall (s)", "JSON written", "note"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's --quick (the long ones on a few rows; results/*-quick.json)")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"run only these (in quick mode even those it skips): {', '.join(NAMES)}")
    parser.add_argument("--skip", nargs="+", choices=NAMES, metavar="NAME", help="do not run these")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the children (and --threads where a script takes it)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--keep-going", action="store_true", help="continue after a failure (the summary says which failed)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1 (got {args.threads})")
    env = _env(args.threads)
    rows: list[dict[str, Any]] = []
    stopped = False
    chosen = _selected(args)
    for i, script in enumerate(chosen, 1):
        cmd, why = command(script, quick=args.quick, threads=args.threads, explicit=bool(args.only))
        row: dict[str, Any] = {"script": script.name, "command": _shell(cmd) if cmd else None, "seconds": None, "json": [], "note": why}
        rows.append(row)
        if cmd is None:
            row["status"] = "skipped"
            print(f"[{i}/{len(chosen)}] skip {script.name}: {why}", flush=True)
            continue
        if stopped:
            row["status"], row["note"] = "not run", "stopped after a failure (--keep-going continues)"
            continue
        print(f"[{i}/{len(chosen)}] {row['command']}", flush=True)
        if args.dry_run:
            row["status"] = "dry run"
            continue
        row.update(run_one(cmd, env))
        print(f"[{i}/{len(chosen)}] {script.name}: {row['status']} in {row['seconds']:.1f} s", flush=True)
        stopped = row["status"] != "ok" and not args.keep_going
    if not args.dry_run:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import write_result

        settings = {"quick": args.quick, "threads": args.threads, "only": args.only, "skip": args.skip, "keep_going": args.keep_going}
        print(f"wrote {write_result('run_all', settings, {'scripts': rows}, quick=args.quick)}", flush=True)
    steps = _after(args, env, stopped)
    _summary(rows + steps)
    return 1 if any(r["status"].startswith("failed") for r in rows + steps) else 0


def _after(args: argparse.Namespace, env: dict[str, str], stopped: bool) -> list[dict[str, Any]]:
    """render_docs.py and plots.py (when matplotlib is importable), unless a failure stopped the suite."""
    # quick runs render too: the page shows the suite's quick record until a full one exists
    todo: list[tuple[str, list[str] | None, str]] = [("render_docs", [sys.executable, str((HERE / "render_docs.py").relative_to(ROOT))], "")]
    if importlib.util.find_spec("matplotlib") is None:
        todo.append(("plots", None, "matplotlib is not installed (pip install -e '.[plot]')"))
    else:
        todo.append(("plots", [sys.executable, str((HERE / "plots.py").relative_to(ROOT)), *(["--quick"] if args.quick else [])], ""))
    steps = []
    for name, cmd, why in todo:
        if stopped:
            cmd, why = None, "a benchmark failed (--keep-going continues)"
        row: dict[str, Any] = {"script": name, "seconds": None, "json": [], "note": why}
        if cmd is None:
            row["status"] = "skipped"
            print(f"skip {name}: {why}", flush=True)
        elif args.dry_run:
            row["status"] = "dry run"
            print(_shell(cmd), flush=True)
        else:
            print(_shell(cmd), flush=True)
            row.update(run_one(cmd, env))
        steps.append(row)
    return steps


def _summary(rows: list[dict[str, Any]]) -> None:
    text = [["script", "status", "wall (s)", "JSON written", "note"]] + [
        [r["script"], r["status"], "-" if r["seconds"] is None else f"{r['seconds']:.1f}", ", ".join(r["json"]) or "-", r["note"]]
        for r in rows]
    widths = [max(len(r[i]) for r in text) for i in range(5)]
    print("\nbenchmark suite")
    for r in text:
        print("  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())


if __name__ == "__main__":
    sys.exit(main())
