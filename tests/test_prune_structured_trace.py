"""The generic structured-pruning tracer (issue 9): coupled channel sets of plain torch models from
their torch.fx graph, exact cuts (the pruned model computes what the original computes with those
channels masked), checkpoints, and clear refusals that leave the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import llmslim as ls
from llmslim.errors import PassError, TraceError
from llmslim.prune import Channels
from llmslim.prune.structured import _importance, keep_count, register_importance, sliceable, trace
from llmslim.testing import make_model


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm, and a shortcut (1x1 conv when it downsamples)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = Block(8, 16, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def _resnet(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ResNet()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # batch norm statistics that do something
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


class Dense(nn.Module):
    """Concatenation along the channels (DenseNet-style), then a flatten straight into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 3, padding=1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.head(torch.flatten(F.relu(self.mix(y)), 1))


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def picked():
    """A custom importance: channel (set, index) in ``picked`` scores -1, every other 0."""
    chosen: set[tuple[int, int]] = set()
    register_importance("test-picked", lambda groups, model, ctx: torch.tensor(
        [-1.0 if (g.layer, g.index) in chosen else 0.0 for g in groups]))
    yield chosen
    del _importance._REGISTRY["test-picked"]


def _masked(model: nn.Module, found, chosen: set[tuple[int, int]]) -> nn.Module:
    """The original model with the chosen channels' input columns zeroed in every layer reading them."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for space in found.spaces:
            for u in space.uses:
                if u.dim != 1:
                    continue
                m = out.get_submodule(u.module)
                w = sliceable(m).matrix(m, m.weight)
                for k, c in chosen:
                    if k == space.index:
                        w[:, (u.offset + c) * u.block:(u.offset + c + 1) * u.block] = 0
    return out


def test_tracer_couples_the_residual_stream_of_a_resnet() -> None:
    found = trace(_resnet())
    by_name = {s.name: s for s in found.spaces}
    residual = by_name["stem"]
    assert residual.producers == ("stem", "layer1.0.conv2", "layer1.1.conv2")  # joined by the adds
    assert {"bn", "layer1.0.bn2", "layer1.1.bn2", "layer2.conv1", "layer2.shortcut.0"} <= set(residual.modules())
    assert set(by_name["layer2.conv2"].producers) == {"layer2.conv2", "layer2.shortcut.0"}
    assert "fc" in by_name["layer2.conv2"].modules()  # read through pooling and view(x.size(0), -1)
    assert [s.width for s in found.spaces] == [8, 8, 8, 16, 16]
    assert found.kept == (("fc", "it reaches the model output"),)


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_pruned_resnet_equals_the_original_with_those_channels_masked(data: st.DataObject) -> None:
    model = _resnet()
    found = trace(model)
    chosen = {(s.index, c) for s in found.spaces for c in data.draw(st.sets(st.integers(0, s.width - 1), min_size=s.width // 2, max_size=s.width // 2))}
    register_importance("test-drawn", lambda groups, m, ctx: torch.tensor([-1.0 if (g.layer, g.index) in chosen else 0.0 for g in groups]))
    try:
        expected = _masked(model, found, chosen)(X)
        report = ls.compress_(model, Channels(ratio=0.5, importance="test-drawn"), progress=False)
    finally:
        del _importance._REGISTRY["test-drawn"]
    torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=1e-5)
    assert model.layer2.conv2.out_channels == 8 and model.fc.in_features == 8 and model.bn.running_mean.shape == (4,)
    rows = {r.module: r for r in report.children[0].rows}
    assert set(rows["stem"].info["removed"]) == {c for k, c in chosen if k == 0}
    assert rows["fc"].info["removed_inputs"] == sorted(c for k, c in chosen if k == 4)


@pytest.mark.parametrize("build", [_mlp, lambda: Dense().eval(), lambda: make_model("convnet", depthwise=True)[0]],
                         ids=["mlp", "concat-flatten", "depthwise"])
def test_pruned_models_equal_the_originals_with_those_channels_masked(build, picked: set[tuple[int, int]]) -> None:
    model = build()
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)) if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear) else X
    found = trace(model)
    picked.update((s.index, 2 * c) for s in found.spaces for c in range(s.width - keep_count(s.width, 0.5)))
    expected = _masked(model, found, picked)(x)
    ls.compress_(model, Channels(ratio=0.5, importance="test-picked"), progress=False)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build().parameters())


def test_concat_joins_channel_sets_side_by_side() -> None:
    found = trace(Dense())
    a, b, mix = found.spaces
    assert (a.name, b.name, mix.name) == ("a", "b", "mix")
    assert [(u.module, u.offset, u.block) for u in a.uses + b.uses if u.dim == 1] == [("mix", 0, 9), ("mix", 4, 9)]
    assert [(u.module, u.block) for u in mix.uses if u.dim == 1] == [("head", 16)]  # flatten: 4x4 entries per channel


def test_checkpoint_round_trip_of_a_traced_model(tmp_path) -> None:
    model = _resnet()
    ls.compress_(model, Channels(ratio=0.5, scope="global", round_to=2), progress=False)
    ls.save(model, tmp_path / "net")
    loaded = ls.load(tmp_path / "net", _resnet(seed=1))
    assert torch.equal(loaded(X), model(X))
    assert loaded.layer2.bn2.num_features == model.layer2.bn2.num_features


def test_sets_touching_inputs_outputs_or_ignored_layers_are_kept_whole() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down, self.head = nn.Linear(6, 16), nn.Linear(16, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.down(F.relu(self.up(x))))

    found = trace(Residual())
    assert [s.name for s in found.spaces] == ["up"]
    kept = dict(found.kept)
    assert kept["head"] == "it reaches the model output"
    assert "combines them with a tensor the tracer cannot slice" in kept["down"]  # added to the model's input
    with pytest.raises(TraceError, match="every channel set is kept whole"):
        trace(Residual(), ignore=["up"])


class Sliced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))))[:, :4])


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.grouped, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1, groups=2), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(self.conv(x)).mean((2, 3)))


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h if h.sum() > 0 else -h)


@pytest.mark.parametrize(("build", "where", "why"), [
    (Sliced, "getitem", "indexes or slices a channel tensor (channels made by fc2)"),
    (Grouped, "grouped (Conv2d)", "grouped convolution (groups=2)"),
    (Normed, "norm (LayerNorm)", "LayerNorm is not a layer the tracer can map channels through"),
    (Softmaxed, "softmax", "is not an operation the tracer can map channels through"),
    (Branchy, "forward", "torch.fx cannot trace it"),
])
def test_what_the_tracer_cannot_prove_safe_is_refused_and_the_model_left_untouched(build, where: str, why: str) -> None:
    model = build().eval()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TraceError) as info:
        trace(model)
    assert any(where in w and why in y for w, y in info.value.problems), info.value.problems
    with pytest.raises(PassError) as failed:
        ls.compress_(model, Channels(ratio=0.5), progress=False)
    assert isinstance(failed.value.__cause__, TraceError)
    assert dict(model.named_modules()) == modules  # the very same module objects
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_ignoring_the_layers_that_block_the_trace_prunes_the_rest() -> None:
    model = Sliced()
    report = ls.compress_(model, Channels(ratio=0.5, ignore=["fc2"]), progress=False)
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (4, 4, 8)
    assert "kept whole: channels of fc2 (fc2 is not targeted (targets/ignore))" in report.children[0].notes


def test_layers_whose_weights_are_read_directly_or_shared_are_kept_whole() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.mid(F.relu(self.enc(x))))
            return self.out(h) + F.linear(x, self.enc.weight.t())  # the encoder's weight used again, transposed

    found = trace(Tied())
    assert [s.name for s in found.spaces] == ["mid"]
    assert "read directly" in dict(found.kept)["enc"]
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    tied[2].weight = tied[0].weight  # one parameter, two layers: cutting one would untie them
    with pytest.raises(TraceError, match="0 shares a parameter with 2"):
        trace(tied)
