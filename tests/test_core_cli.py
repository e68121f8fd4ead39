from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmslim.cli import main
from plugins import plugin

GOOD = '''
import dataclasses
import llmslim as ls

@dataclasses.dataclass
class Shout(ls.PassBase):
    """Shout at every Linear (plugin test pass)."""

    def apply(self, model, ctx):
        return self.report(modified=False)
'''


def test_passes_lists_builtins_plugins_and_broken_plugins(tmp_path, capsys) -> None:
    with plugin(tmp_path, "llmslim-shout", {"shout_mod": GOOD}, {"shout": "shout_mod:Shout"}):
        assert main(["passes"]) == 0
        out = capsys.readouterr().out
        assert "shout" in out and "llmslim-shout" in out and "Shout at every Linear" in out
        assert "toy-prune" in out and "(registered in process)" in out
        with plugin(tmp_path, "llmslim-broken", {"broken_mod": "import no_such_module\n"}, {"broken": "broken_mod:X"}):
            assert main(["passes", "--json"]) == 1
            rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
            assert "no_such_module" in rows["broken"]["error"] and rows["shout"]["error"] is None


def test_recipe_check_ok_and_errors(tmp_path, capsys) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[passes]]\npass = "toy-prune"\nsparsity = 0.25\n\n[[passes]]\npass = "toy-half"\n')
    assert main(["recipe", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "1. toy-prune(sparsity=0.25)" in out and "2. toy-half()" in out and "ok:" in out

    bad_order = tmp_path / "bad.json"
    bad_order.write_text(json.dumps({"passes": [{"pass": "toy-half"}, {"pass": "toy-prune"}]}))
    assert main(["recipe", "check", str(bad_order)]) == 2
    assert "cannot run after pass 'toy-half'" in capsys.readouterr().err

    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('[[passes]]\npass = "toy-prune"\nsparsity = 2\n')
    assert main(["recipe", "check", str(bad_value), "--json"]) == 2
    assert "sparsity must be in [0, 1) (got 2.0)" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "llmslim", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("llmslim ")
