from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

import llmslim as ls
from llmslim import _registry
from llmslim.errors import ConfigError, RegistryError
from plugins import plugin
from toys import ToyPrune

GOOD = """
import dataclasses
import llmslim as ls

@dataclasses.dataclass
class Shout(ls.PassBase):
    '''Shout at every Linear (plugin test pass).'''
    volume: int = 3

    def apply(self, model, ctx):
        return self.report(modified=False)
"""


def test_entry_point_is_loaded_lazily_and_only_on_request(tmp_path) -> None:
    with plugin(tmp_path, "llmslim-shout", {"shout_mod": GOOD}, {"shout": "shout_mod:Shout"}):
        assert "shout" in ls.available_passes()
        assert "shout_mod" not in sys.modules  # listing loads nothing
        cls = ls.get_pass("shout")
        assert "shout_mod" in sys.modules and cls.__name__ == "Shout"
        p = ls.build_pass({"pass": "shout", "volume": 5})
        assert p.volume == 5 and ls.pass_name(p) == "shout"
        assert ls.to_spec(p) == {"pass": "shout", "volume": 5}
    assert "shout" not in ls.available_passes()


def test_registered_name_finds_an_entry_point_class_without_loading_others(tmp_path) -> None:
    with plugin(tmp_path, "llmslim-shout", {"shout_mod": GOOD}, {"shout": "shout_mod:Shout"}):
        import shout_mod  # imported by the user directly, not through get_pass

        assert _registry.registered_name(shout_mod.Shout) == "shout"
        assert ls.build_pass(shout_mod.Shout(volume=1).to_spec()) == shout_mod.Shout(volume=1)


def test_broken_plugin_names_its_distribution_and_breaks_nothing_else(tmp_path) -> None:
    broken = "raise ImportError('missing dependency: awq_kernels')\n"
    with plugin(tmp_path, "llmslim-broken", {"broken_mod": broken}, {"broken": "broken_mod:Broken"}):
        with pytest.raises(RegistryError, match=r"'broken'.*distribution 'llmslim-broken' failed to import.*awq_kernels"):
            ls.get_pass("broken")
        assert ls.get_pass("toy-prune") is ToyPrune
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "llmslim-broken"), *sys.path]))
        out = subprocess.run(
            [sys.executable, "-c", "import llmslim; print('broken' in llmslim.available_passes())"],
            env=env, capture_output=True, text=True, check=True,
        )
        assert out.stdout.strip() == "True"


def test_duplicate_names_across_distributions_fail_loudly(tmp_path) -> None:
    with plugin(tmp_path, "dist-a", {"mod_a": GOOD}, {"shout": "mod_a:Shout"}), plugin(
        tmp_path, "dist-b", {"mod_b": GOOD}, {"shout": "mod_b:Shout"}
    ):
        with pytest.raises(RegistryError, match=r"declared more than once.*'dist-.'.*'dist-.'"):
            ls.get_pass("shout")
        with pytest.raises(RegistryError, match="already declared"):
            ls.register("shout")(ToyPrune)


def test_entry_point_to_something_that_is_not_a_pass(tmp_path) -> None:
    with plugin(tmp_path, "llmslim-odd", {"odd_mod": "VALUE = 3\n"}, {"odd": "odd_mod:VALUE"}):
        with pytest.raises(RegistryError, match=r"must be a class .* apply\(model, ctx\)"):
            ls.get_pass("odd")


def test_register_in_process_and_duplicates() -> None:
    @dataclasses.dataclass
    class Mine(ls.PassBase):
        def apply(self, model, ctx):
            return self.report(modified=False)

    try:
        assert ls.register("mine-test")(Mine) is Mine
        assert ls.get_pass("mine-test") is Mine and "mine-test" in ls.available_passes()
        with pytest.raises(RegistryError, match="already registered"):
            ls.register("mine-test")(Mine)
    finally:
        _registry._unregister("mine-test")
    for bad in ["", "has space", 3]:
        with pytest.raises(RegistryError, match="pass name must be"):
            ls.register(bad)
    with pytest.raises(RegistryError, match="must be a class"):
        ls.register("not-a-pass")(object())


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(RegistryError, match=r"unknown pass 'toy-prun'; did you mean 'toy-prune'"):
        ls.get_pass("toy-prun")


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ({"sparsity": 0.5}, ConfigError, '"pass" key'),
        ({"pass": "toy-prune", "sparsity": 1.5}, ConfigError, r"sparsity must be in \[0, 1\) \(got 1.5\)"),
        ({"pass": "toy-prune", "sparsity": "half"}, ConfigError, r"sparsity must be a number \(not NaN\) \(got 'half'\)"),
        ({"pass": "toy-prune", "sparsty": 0.5}, ConfigError, r"unknown field\(s\) 'sparsty'; fields are: .*sparsity"),
        ({"pass": "toy-prune", "targets": [3]}, ConfigError, "targets must be strings, module types or predicates"),
        ({"pass": "toy-prune", "fail_at": 1.5}, ConfigError, r"fail_at must be an integer or None \(got 1.5\)"),
        ({"pass": "nope"}, RegistryError, "unknown pass 'nope'"),
        (42, ConfigError, "must be a mapping"),
    ],
)
def test_build_pass_rejects_bad_specs(spec, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        ls.build_pass(spec)


def test_build_pass_accepts_names_instances_and_normalises_types() -> None:
    p = ToyPrune(sparsity=0.25)
    assert ls.build_pass(p) is p
    assert ls.build_pass("toy-prune") == ToyPrune()
    built = ls.build_pass({"pass": "toy-prune", "sparsity": 0, "targets": ["Linear", "Conv2d"]})
    assert built.sparsity == 0.0 and isinstance(built.sparsity, float)  # int coerced to the annotated float
    assert built.targets == ("Linear", "Conv2d")  # lists become tuples


def test_to_spec_omits_defaults_and_refuses_code() -> None:
    assert ToyPrune().to_spec() == {"pass": "toy-prune"}
    assert ToyPrune(sparsity=0.3, ignore=("lm_head",)).to_spec() == {"pass": "toy-prune", "sparsity": 0.3, "ignore": ["lm_head"]}
    with pytest.raises(ConfigError, match="plain data"):
        ToyPrune(targets=(lambda n, m: True,)).to_spec()

    @dataclasses.dataclass
    class Unregistered(ls.PassBase):
        def apply(self, model, ctx):
            return self.report()

    with pytest.raises(RegistryError, match="not a registered pass"):
        Unregistered().to_spec()


def test_field_names_may_not_shadow_passbase_and_nan_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"field name\(s\) \['label'\] must not shadow"):

        @dataclasses.dataclass
        class Shadow(ls.PassBase):
            label: str = "x"

    with pytest.raises(ConfigError, match=r"sparsity must be a number \(not NaN\) \(got nan\)"):
        ToyPrune(sparsity=float("nan"))


def test_registered_name_follows_a_re_exporting_entry_point(tmp_path) -> None:
    package = {"reexp/__init__": "from reexp.impl import Shout\n", "reexp/impl": GOOD}
    where = tmp_path / "d"
    (where / "reexp").mkdir(parents=True)
    for name, src in package.items():
        (where / f"{name}.py").write_text(src)
    with plugin(tmp_path, "llmslim-reexp", {}, {"reexp-shout": "reexp:Shout"}):
        sys.path.insert(0, str(where))
        try:
            import reexp

            assert ls.pass_name(reexp.Shout()) == "reexp-shout"  # defined in reexp.impl, exported by reexp
            assert ls.build_pass(reexp.Shout(volume=2).to_spec()) == reexp.Shout(volume=2)
        finally:
            sys.path.remove(str(where))
            for m in ("reexp", "reexp.impl"):
                sys.modules.pop(m, None)
