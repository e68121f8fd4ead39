"""The ``llmslim`` command line: ``demo``, ``passes``, ``recipe check``, ``eval``, ``compress``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._manager import PassManager
from ._pass import pass_name
from ._registry import available_passes, get_pass, origin
from .errors import LlmslimError

__all__ = ["main"]


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "(no description)"


def cmd_passes(args: argparse.Namespace) -> int:
    rows, broken = [], 0
    for name in available_passes():
        try:
            rows.append({"name": name, "origin": origin(name), "summary": _summary(get_pass(name)), "error": None})
        except LlmslimError as exc:
            broken += 1
            rows.append({"name": name, "origin": origin(name), "summary": None, "error": str(exc)})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no passes registered (entry-point group 'llmslim.passes' is empty)")
    else:
        width = max(len(r["name"]) for r in rows)
        origin_width = max(len(r["origin"]) for r in rows)
        for r in rows:
            text = r["summary"] if r["error"] is None else f"BROKEN: {r['error']}"
            print(f"{r['name'].ljust(width)}  {r['origin'].ljust(origin_width)}  {text}")
    return 1 if broken else 0


def cmd_recipe_check(args: argparse.Namespace) -> int:
    manager = PassManager.from_recipe(args.file)
    manager.check()
    specs = manager.to_recipe()["passes"]
    if args.json:
        print(json.dumps({"ok": True, "file": args.file, "passes": specs}, indent=2))
    else:
        for i, (p, spec) in enumerate(zip(manager.passes, specs), 1):
            fields = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "pass")
            print(f"{i}. {pass_name(p)}({fields})")
        print(f"ok: {args.file}: {len(manager)} pass(es), order checked")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmslim", description="Compress PyTorch models with chained passes.")
    parser.add_argument("--version", action="version", version=f"llmslim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("passes", help="list every registered pass, plugins included")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_passes)

    recipe = sub.add_parser("recipe", help="work with recipe files")
    rsub = recipe.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    c = rsub.add_parser("check", help="validate a recipe (.json or .toml) without a model")
    c.add_argument("file", help="recipe file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_recipe_check)

    from . import _cli_demo, _cli_models  # import no heavy dependency until a command runs

    _cli_demo.register(sub)
    _cli_models.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 failure, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except LlmslimError as exc:
        print(f"llmslim: error: {exc}", file=sys.stderr)
        return 2
