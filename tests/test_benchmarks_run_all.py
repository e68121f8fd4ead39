"""benchmarks/run_all.py: the suite's plan (quick skips, --only, --skip, --threads), a dry run, and a
real run over stand-in scripts (statuses, JSON detection, the summary file, --keep-going)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import run_all  # noqa: E402


def test_every_benchmark_script_is_in_the_suite() -> None:
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}
    assert scripts - {"run_all", "render_docs", "plots"} <= set(run_all.NAMES)


def test_quick_dry_run_prints_every_command_and_runs_nothing() -> None:
    before = {p.name: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    done = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--dry-run", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "benchmarks/baseline.py --quick" in out
    assert "benchmarks/checkpoint.py --part big --quick" in out
    assert "benchmarks/quant_speed.py --quick --threads 1" in out  # --threads goes where the script takes it
    # the long scripts run a few rows in quick mode, the peers' among them
    assert "benchmarks/structured.py --quick --only channels-l2 tp-magnitude" in out
    assert "torchao-wanda-50" in out and "torch-l1-50" in out and "torchao int4 weight-only g64" in out
    assert "benchmarks/render_docs.py" in out  # the page shows the quick record until a full run exists
    assert "peer_llmcompressor" in out
    assert {p.name: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*.json")} == before


def test_only_runs_a_quick_skipped_script_and_skip_leaves_one_out() -> None:
    script = run_all.Script("distill", quick_skip="too slow")
    assert run_all.command(script, quick=True, threads=None)[0] is None
    cmd, _ = run_all.command(script, quick=True, threads=None, explicit=True)
    assert cmd[-1] == "--quick"
    chosen = run_all._selected(type("A", (), {"only": None, "skip": ["qat", "distill"]})())
    assert "qat" not in [s.name for s in chosen] and "baseline" in [s.name for s in chosen]


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no-such-benchmark"])
    with pytest.raises(SystemExit):
        run_all.main(["--threads", "0", "--dry-run"])


STUB = '''import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
p.add_argument("--quick", action="store_true")
a = p.parse_args()
print("stub {name} running", flush=True)
out = pathlib.Path(__file__).parent / "results" / ("{name}" + ("-quick" if a.quick else "") + ".json")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({{"quick": a.quick}}))
sys.exit({rc})
'''


@pytest.fixture
def tree(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name, rc in (("good", 0), ("bad", 3), ("slow", 0)):
        (bench / f"{name}.py").write_text(STUB.format(name=name, rc=rc))
    for name in ("render_docs", "plots"):
        (bench / f"{name}.py").write_text("import sys; print('stub', sys.argv[1:])\n")
    monkeypatch.setattr(run_all, "HERE", bench)
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "RESULTS", bench / "results")
    monkeypatch.setattr(_common, "RESULTS", bench / "results")
    monkeypatch.setattr(run_all, "SCRIPTS", (run_all.Script("good"), run_all.Script("bad"),
                                             run_all.Script("slow", quick_skip="too slow"), run_all.Script("absent")))
    return bench


def test_a_failure_stops_the_suite_unless_keep_going(tree, capfd) -> None:
    assert run_all.main(["--quick"]) == 1
    rows = {r["script"]: r for r in json.loads((tree / "results" / "run_all-quick.json").read_text())["results"]["scripts"]}
    assert rows["good"]["status"] == "ok" and rows["good"]["json"] == ["results/good-quick.json"]
    assert rows["bad"]["status"] == "failed (exit 3)"
    assert rows["slow"]["status"] == "skipped" and "too slow" in rows["slow"]["note"]
    assert rows["absent"]["status"] == "skipped" and "no benchmarks/absent.py" in rows["absent"]["note"]
    out = capfd.readouterr().out
    assert "stub good running" in out  # the children's output streams through
    assert "benchmark suite" in out and "a benchmark failed" in out  # render_docs and plots did not run


def test_keep_going_runs_the_rest_then_docs_and_plots(tree, monkeypatch, capsys) -> None:
    monkeypatch.setattr(run_all, "SCRIPTS", (run_all.Script("bad"), run_all.Script("good")))
    assert run_all.main(["--keep-going", "--threads", "1"]) == 1
    payload = json.loads((tree / "results" / "run_all.json").read_text())
    assert [r["status"] for r in payload["results"]["scripts"]] == ["failed (exit 3)", "ok"]
    assert payload["settings"]["threads"] == 1
    out = capsys.readouterr().out
    assert "render_docs.py" in out
    assert "failed (exit 3)" in out
    assert "| good | ok |" in run_all.render_markdown(payload)
    assert "run_all.json`" in run_all.render_markdown(payload) and "quick one" not in run_all.render_markdown(payload)


def test_a_quick_record_says_it_is_quick_and_names_its_file(tree, monkeypatch) -> None:
    monkeypatch.setattr(run_all, "SCRIPTS", (run_all.Script("good"),))
    assert run_all.main(["--quick"]) == 0
    text = run_all.render_markdown(json.loads((tree / "results" / "run_all-quick.json").read_text()))
    assert "`benchmarks/results/run_all-quick.json`" in text and "`python benchmarks/run_all.py --quick`" in text
    assert "this is the quick one" in text
