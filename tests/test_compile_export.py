"""Every compressed module under ``torch.export`` and ``torch.compile``: same outputs as eager.

``torch.compile`` with inductor costs seconds per layer, so the default run compiles one small
layer; the ``slow`` tests compile every module and whole tiny models (docs/quantization.md,
"Compile and export", records the table these tests back).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import llmslim as ls
from llmslim.prune._storage import SparseLinear
from llmslim.quant import FP8Linear, Int8DynamicLinear, QuantEmbedding, QuantLinear, SparseQuantLinear


def _linear(out_f: int, in_f: int) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight[:, ::3] = 0.0
    return lin


def _tied() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.tied(QuantEmbedding.from_float(nn.Embedding(64, 64)))


MODULES = {  # name -> builder; the comment says which path a few-token forward takes on CPU
    "int8": lambda: QuantLinear.from_float(_linear(64, 64), bits=8, group_size=None, symmetric=True),  # int8pack_mm
    "int8-grouped-remainder": lambda: QuantLinear.from_float(_linear(32, 80), bits=8, group_size=32),  # dequant GEMM
    "int4": lambda: QuantLinear.from_float(_linear(64, 64), bits=4, group_size=32),  # int4pack_mm
    "int4-remainder": lambda: QuantLinear.from_float(_linear(40, 100), bits=4, group_size=32),  # two kernel calls
    "int3-remainder": lambda: QuantLinear.from_float(_linear(32, 70), bits=3, group_size=16),
    "int2": lambda: QuantLinear.from_float(_linear(32, 64), bits=2, group_size=None, symmetric=True),
    "tied-head": _tied,
    "sparse-int4": lambda: SparseQuantLinear.from_quant(QuantLinear.from_float(_linear(32, 64), bits=4, group_size=32)),
    "fp8": lambda: FP8Linear.from_float(_linear(64, 64)),
    "w8a8": lambda: Int8DynamicLinear.from_float(_linear(64, 64)),  # oneDNN eagerly, torch._int_mm when traced
    "sparse-float": lambda: SparseLinear.from_module(_linear(64, 64), n_m=(2, 4)),
}


def _close(got: torch.Tensor, eager: torch.Tensor) -> None:
    # the tolerance of the per-path compile tests: traced graphs may take another path
    assert (got - eager).abs().max() <= 1e-2 * eager.abs().max()


@pytest.mark.parametrize("name", MODULES)
def test_export_runs_and_matches_eager(name) -> None:
    layer = MODULES[name]()
    for tokens in (1, 70):  # the few-token kernel and the many-token path
        x = torch.randn(tokens, layer.in_features)
        with torch.no_grad():
            program = torch.export.export(layer, (x,))
            assert torch.equal(program.module()(x), layer(x))


def test_export_of_quant_embedding() -> None:
    emb = QuantEmbedding.from_float(nn.Embedding(64, 32))
    ids = torch.tensor([[1, 5, 63]])
    assert torch.equal(torch.export.export(emb, (ids,)).module()(ids), emb(ids))


@pytest.mark.parametrize("name", ["int4", "int4-remainder", "int8", "w8a8", "fp8"])
def test_exported_programs_save_load_and_take_any_token_count(name) -> None:
    # a symbolic token count: the packed kernels serve every count (QuantLinear does not branch
    # on it while exporting), the file holds the kernel's packed bytes
    layer = MODULES[name]()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        program = torch.export.export(layer, (x,), dynamic_shapes={"x": {0: Dim("tokens", min=1, max=4096)}})
        buf = io.BytesIO()
        torch.export.save(program, buf)
        buf.seek(0)
        loaded = torch.export.load(buf).module()
        for tokens in (1, 3, 100):
            x = torch.randn(tokens, layer.in_features)
            _close(loaded(x), layer(x))
        kernels = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if name.startswith("int4") and layer.kernel == "int4pack_mm":
        assert "aten._weight_int4pack_mm_for_cpu.default" in kernels


def test_fp8_exports_in_a_fresh_process_before_any_eager_forward() -> None:
    # the bit-exactness probe of the FP8 decoder once ran lazily, inside the first trace, and
    # torch.export failed on its data-dependent check
    code = (
        "import torch; from llmslim.quant import FP8Linear\n"
        "m = FP8Linear.from_float(torch.nn.Linear(64, 32)); x = torch.randn(2, 64)\n"
        "with torch.no_grad(): assert torch.equal(torch.export.export(m, (x,)).module()(x), m(x))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_compile_matches_eager_on_an_int4_layer() -> None:
    layer = MODULES["int4-remainder"]()
    compiled = torch.compile(layer)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        _close(compiled(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODULES)
def test_compile_matches_eager(name) -> None:
    layer = MODULES[name]()
    compiled = torch.compile(layer)
    for tokens in (1, 70):
        x = torch.randn(tokens, layer.in_features)
        with torch.no_grad():
            _close(compiled(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rtn-int4", "w8a8"])
def test_tiny_llama_compiles_and_exports(recipe) -> None:
    pytest.importorskip("transformers")
    from llmslim import models
    from llmslim.quant import RTN, W8A8

    model = models.tiny("llama")
    ls.compress_(model, RTN(bits=4, group_size=32) if recipe == "rtn-int4" else W8A8(), progress=False)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
        out = program.module()(input_ids=ids, use_cache=False)
        assert torch.equal(out["logits"] if isinstance(out, dict) else out.logits, eager)
        _close(torch.compile(model)(ids, use_cache=False).logits, eager)
