from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import llmslim as ls
from llmslim.errors import TargetError


def _model() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(4, 4)
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
            self.norm = nn.LayerNorm(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(4, 10)

    return Net()


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        (["Linear"], [], ["layers.0.attn", "layers.0.mlp.0", "layers.0.mlp.2", "layers.1.attn", "layers.1.mlp.0", "layers.1.mlp.2", "lm_head"]),
        (["Linear"], ["lm_head"], ["layers.0.attn", "layers.0.mlp.0", "layers.0.mlp.2", "layers.1.attn", "layers.1.mlp.0", "layers.1.mlp.2"]),
        (["layers.*.mlp.*"], [], ["layers.0.mlp.0", "layers.0.mlp.1", "layers.0.mlp.2", "layers.1.mlp.0", "layers.1.mlp.1", "layers.1.mlp.2"]),
        (["re:layers\\.1\\..*"], ["GELU", "Sequential"], ["layers.1.attn", "layers.1.mlp.0", "layers.1.mlp.2", "layers.1.norm"]),
        ([nn.LayerNorm], [], ["layers.0.norm", "layers.1.norm"]),
        ([lambda n, m: n.endswith("attn")], [], ["layers.0.attn", "layers.1.attn"]),
        (["re:.*attn", "lm_head"], [], ["layers.0.attn", "layers.1.attn", "lm_head"]),  # each module once, model order
    ],
)
def test_select_table(targets, ignore, expected) -> None:
    assert [n for n, _ in ls.select(_model(), targets, ignore)] == expected


def test_class_name_matches_subclasses_and_parametrized_modules() -> None:
    class MyLinear(nn.Linear):
        pass

    m = nn.Sequential(MyLinear(2, 2), nn.Linear(2, 2))

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    torch.nn.utils.parametrize.register_parametrization(m[1], "weight", Double())
    names = [n for n, _ in ls.select(m, ["Linear"])]
    assert names == ["0", "1"]  # the parametrization containers are never selected
    assert [n for n, _ in ls.select(m, ["MyLinear"])] == ["0"]


def test_accepts_filters_kinds_and_explains_empty_selection() -> None:
    m = _model()
    assert [n for n, _ in ls.select(m, ["layers.0.*"], accepts=("LayerNorm",))] == ["layers.0.norm"]
    with pytest.raises(TargetError, match=r"matched only modules of kinds .*GELU.* accepts \['Linear'\]"):
        ls.select(m, ["layers.*.mlp.1"], accepts=("Linear",), owner="pass 'x'")


def test_empty_selection_quotes_real_names() -> None:
    with pytest.raises(TargetError) as info:
        ls.select(_model(), ["model.layers.*"])
    msg = str(info.value)
    assert "model.layers.*" in msg and "layers.0" in msg and "lm_head" in msg


def test_ignore_everything_is_an_error() -> None:
    with pytest.raises(TargetError, match="matched no module"):
        ls.select(_model(), ["Linear"], ["*"])


@pytest.mark.parametrize("bad", ["re:(", 3, int])
def test_malformed_targets(bad) -> None:
    with pytest.raises(TargetError):
        ls.select(_model(), [bad])


def test_root_is_selectable_and_unswappable() -> None:
    lin = nn.Linear(2, 2)
    assert ls.select(lin, ["Linear"]) == [("", lin)]
    with pytest.raises(TargetError, match="root"):
        ls.replace_module_(lin, "", nn.Identity())
    with pytest.raises(TargetError, match="no submodule"):
        ls.replace_module_(nn.Sequential(lin), "5", nn.Identity())


def test_unmatched_target_warns_when_others_match(caplog) -> None:
    with caplog.at_level("WARNING", logger="llmslim"):
        ls.select(_model(), ["Linear", "Conv1D"])
    assert re.search(r"target 'Conv1D' matched no module", caplog.text)


def test_default_targets_do_not_warn_but_chosen_ones_do(caplog) -> None:
    import dataclasses

    from toys import ToyPrune

    @dataclasses.dataclass
    class Wide(ToyPrune):
        targets: tuple = ("Linear", "Conv1D")  # a default for several architectures

    with caplog.at_level("WARNING", logger="llmslim"):
        Wide().select(_model())  # no Conv1D here, and that is fine for a default
        Wide(targets=("Linear", "Conv2d")).select(_model())
    assert caplog.text.count("matched no module") == 1 and "'Conv2d'" in caplog.text
