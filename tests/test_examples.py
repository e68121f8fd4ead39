"""The example plugin package (examples/my_pass) works as installed, and its own tests pass.

Installing with pip is too slow for CI; the fixture does what installing does: the package's
module on sys.path, and a ``*.dist-info`` with the entry points its pyproject.toml declares.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import llmslim as ls
from llmslim.cli import main
from llmslim.testing import check_pass, make_model
from plugins import plugin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my_pass"


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[dict]:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    modules = {"llmslim_nm_prune": (EXAMPLE / "llmslim_nm_prune.py").read_text(encoding="utf-8")}
    with plugin(tmp_path, project["name"], modules, project["entry-points"]["llmslim.passes"]):
        yield project


def test_the_example_plugin_is_listed_without_being_imported(installed, capsys) -> None:
    assert "nm-prune" in ls.available_passes()
    assert "llmslim_nm_prune" not in sys.modules
    assert main(["passes"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("nm-prune"))
    assert installed["name"] in line and "N:M sparsity" in line


def test_the_example_plugins_own_tests_pass(installed) -> None:
    spec = importlib.util.spec_from_file_location("example_test_my_pass", EXAMPLE / "test_my_pass.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NMPrune.__module__ == "llmslim_nm_prune"
    tests = {name: fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)}
    assert len(tests) == 4
    for fn in tests.values():
        fn()
    # the spec check ran: the pass is registered through its entry point
    result = check_pass(module.NMPrune(pattern="1:4"), *make_model("mlp"))
    assert "spec" in result.passed


def test_the_walkthrough_shows_the_example_files_verbatim() -> None:
    doc = (ROOT / "docs" / "writing-a-pass.md").read_text(encoding="utf-8")
    for name in ("llmslim_nm_prune.py", "test_my_pass.py", "pyproject.toml"):
        assert (EXAMPLE / name).read_text(encoding="utf-8") in doc, f"docs/writing-a-pass.md must show {name} as it is"
