"""Hypothesis strategies for property-testing passes: models with batches, weights, configs.

Model strategies return ``(model, batch)`` pairs; each draws a seed and the shapes, and builds
the model deterministically from them (:func:`~llmslim.testing.make_model`), so a failing
example replays and shrinks. Shapes mix powers of two with sizes no group or block divides.

Example:
    >>> from hypothesis import given, settings
    >>> from llmslim.testing import strategies as lst
    >>> @settings(max_examples=3, database=None)
    ... @given(lst.models(kinds=["mlp", "convnet"]))
    ... def test_runs(pair):
    ...     model, batch = pair
    ...     assert model(batch).dim() >= 2
    >>> test_runs()
"""

from __future__ import annotations

import unittest
from collections.abc import Collection, Sequence
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import nn

from ..errors import ConfigError
from ._configs import build_or_none, field_strategies, invalid_values, valid_kwargs
from ._models import HF_KINDS, MODEL_KINDS, PATHOLOGIES, has_transformers, make_model, make_weight

__all__ = [
    "seeds",
    "sizes",
    "pathology_sets",
    "weights",
    "mlps",
    "convnets",
    "attention_models",
    "mha_blocks",
    "hf_models",
    "models",
    "passes",
    "invalid_configs",
    "PATHOLOGIES",
    "MODEL_KINDS",
]

Pair = tuple[nn.Module, Any]


def seeds() -> SearchStrategy[int]:
    """Seeds for torch generators (0 shrinks first)."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def sizes(max_size: int = 33) -> SearchStrategy[int]:
    """Layer sizes: powers of two and primes (no group size divides 7, 13 or 33), or any up to ``max_size``."""
    if not isinstance(max_size, int) or max_size < 2:
        raise ConfigError(f"sizes: max_size must be an integer >= 2 (got {max_size!r})")
    return st.one_of(st.sampled_from([n for n in (1, 2, 4, 7, 8, 13, 16, 33) if n <= max_size]), st.integers(1, max_size))


def pathology_sets(choices: Collection[str] = PATHOLOGIES) -> SearchStrategy[tuple[str, ...]]:
    """Subsets of :data:`PATHOLOGIES` (possibly empty) to give a model's weights."""
    return st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=len(choices)).map(tuple)


def _pathologies(draw: Any, pathologies: bool | Collection[str]) -> tuple[str, ...]:
    if pathologies is True:
        return draw(pathology_sets())
    if pathologies is False:
        return ()
    return tuple(pathologies)


@st.composite
def weights(draw: Any, *, pathologies: Sequence[str] = PATHOLOGIES, clean: bool = True, ndim: int = 2) -> Any:
    """Float32 weight tensors with realistic pathologies and non-divisible shapes.

    Args:
        pathologies: Pathologies to draw one from (see :data:`PATHOLOGIES`).
        clean: Also draw weights with no pathology.
        ndim: 2 (``(out, in)``, like Linear) or 4 (``(out, in, k, k)``, like Conv2d).

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=5, database=None)
        ... @given(weights(pathologies=["zero_rows"], clean=False))
        ... def test_zero_row(w):
        ...     assert (w.abs().sum(dim=1) == 0).any()
        >>> test_zero_row()
    """
    if ndim not in (2, 4):
        raise ConfigError(f"weights: ndim must be 2 or 4 (got {ndim!r})")
    choices: list[str | None] = list(pathologies) + ([None] if clean else [])
    if not choices:
        raise ConfigError("weights: give at least one pathology, or clean=True")
    pathology = draw(st.sampled_from(choices))
    shape = [draw(sizes(24)), draw(sizes(40))]
    if ndim == 4:
        k = draw(st.sampled_from([1, 3]))
        shape = [shape[0], draw(sizes(8)), k, k]
    return make_weight(shape, draw(seeds()), pathology)


@st.composite
def mlps(draw: Any, *, pathologies: bool | Collection[str] = True, max_size: int = 33) -> Pair:
    """``nn.Sequential`` of ``Linear`` layers (0-2 hidden), inputs ``(batch, in)`` or ``(batch, seq, in)``."""
    return make_model(
        "mlp",
        draw(seeds()),
        pathologies=_pathologies(draw, pathologies),
        in_features=draw(sizes(max_size)),
        hidden=tuple(draw(st.lists(sizes(max_size), max_size=2))),
        out_features=draw(sizes(max_size)),
        batch=draw(st.integers(1, 3)),
        seq=draw(st.one_of(st.none(), st.integers(1, 4))),
        bias=draw(st.booleans()),
        activation=draw(st.sampled_from(["relu", "gelu", "tanh", "silu"])),
    )


@st.composite
def convnets(draw: Any, *, pathologies: bool | Collection[str] = True) -> Pair:
    """``Conv2d`` + ``BatchNorm2d`` + ``ReLU`` blocks (optionally a depthwise conv), a ``Linear`` head."""
    return make_model(
        "convnet",
        draw(seeds()),
        pathologies=_pathologies(draw, pathologies),
        in_channels=draw(st.integers(1, 4)),
        channels=tuple(draw(st.lists(sizes(9), min_size=1, max_size=2))),
        size=draw(st.integers(3, 7)),
        classes=draw(sizes(9)),
        batch=draw(st.integers(1, 3)),
        kernel=draw(st.sampled_from([1, 3])),
        depthwise=draw(st.booleans()),
    )


def _attention_dims(draw: Any) -> dict[str, int]:
    return {
        "heads": draw(st.integers(1, 3)),
        "head_dim": draw(st.sampled_from([2, 4, 6, 8])),
        "hidden": draw(sizes(24)),
        "batch": draw(st.integers(1, 2)),
        "seq": draw(st.integers(1, 6)),
    }


@st.composite
def attention_models(draw: Any, *, pathologies: bool | Collection[str] = True) -> Pair:
    """A tiny decoder LM in plain torch: embedding, hand-written attention blocks, ``lm_head``; token-id batches."""
    return make_model(
        "attention",
        draw(seeds()),
        pathologies=_pathologies(draw, pathologies),
        vocab=draw(st.integers(2, 24)),
        layers=draw(st.integers(1, 2)),
        **_attention_dims(draw),
    )


@st.composite
def mha_blocks(draw: Any, *, pathologies: bool | Collection[str] = True) -> Pair:
    """A block on ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly); float batches."""
    return make_model("mha", draw(seeds()), pathologies=_pathologies(draw, pathologies), **_attention_dims(draw))


@st.composite
def hf_models(draw: Any, *, archs: Sequence[str] = HF_KINDS, pathologies: bool | Collection[str] = True) -> Pair:
    """Tiny Hugging Face LLaMA (with grouped-query attention), GPT-2 and BERT models from configs.

    Batches are ``{"input_ids", "attention_mask"}``. Without ``transformers`` installed, drawing
    raises ``unittest.SkipTest``, which pytest and hypothesis report as a skip.
    """
    if not has_transformers():
        raise unittest.SkipTest("Hugging Face transformers is not installed")
    bad = [a for a in archs if a not in HF_KINDS]
    if bad or not archs:
        raise ConfigError(f"hf_models: archs must be names from {', '.join(HF_KINDS)} (got {list(archs)!r})")
    arch = draw(st.sampled_from(list(archs)))
    dims = _attention_dims(draw)
    if arch == "llama":
        dims["kv_heads"] = draw(st.sampled_from([d for d in range(1, dims["heads"] + 1) if dims["heads"] % d == 0]))
    return make_model(
        arch,
        draw(seeds()),
        pathologies=_pathologies(draw, pathologies),
        vocab=draw(st.integers(2, 24)),
        layers=draw(st.integers(1, 2)),
        **dims,
    )


_KIND_STRATEGIES = {"mlp": mlps, "convnet": convnets, "attention": attention_models, "mha": mha_blocks}


def models(kinds: Sequence[str] | None = None, *, pathologies: bool | Collection[str] = True) -> SearchStrategy[Pair]:
    """``(model, batch)`` pairs of the given kinds (default: every kind, the Hugging Face ones
    only when ``transformers`` is installed).

    Args:
        kinds: Names from :data:`MODEL_KINDS`.
        pathologies: ``True`` draws pathologies for the weights, ``False`` none, a collection
            gives exactly those.

    Raises:
        ConfigError: Unknown kind.

    Example:
        >>> from hypothesis import given, settings
        >>> @settings(max_examples=4, database=None)
        ... @given(models(["attention", "mha"], pathologies=["outliers"]))
        ... def test_sequences(pair):
        ...     model, batch = pair
        ...     assert model(batch).shape[:2] == batch.shape[:2]
        >>> test_sequences()
    """
    if kinds is None:
        kinds = [k for k in MODEL_KINDS if k not in HF_KINDS or has_transformers()]
    kinds = list(kinds)
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if bad or not kinds:
        raise ConfigError(f"models: kinds must be names from {', '.join(MODEL_KINDS)} (got {kinds!r})")
    parts = [_KIND_STRATEGIES[k](pathologies=pathologies) for k in kinds if k in _KIND_STRATEGIES]
    archs = [k for k in kinds if k in HF_KINDS]
    if archs:
        parts.append(hf_models(archs=archs, pathologies=pathologies))
    return st.one_of(*parts)


def passes(cls: type, **overrides: Any) -> SearchStrategy[Any]:
    """Valid instances of dataclass pass class ``cls``, drawn from its typed fields.

    Args:
        cls: A dataclass pass class (e.g. a :class:`~llmslim.PassBase` subclass).
        **overrides: Per field: a strategy, a range ``{"min_value": ..., "max_value": ...,
            "exclude_min": ..., "exclude_max": ...}`` or a list of choices; merged over the
            class's own ``strategy_overrides``.

    Raises:
        ConfigError: ``cls`` is not a dataclass, or an override is malformed.

    Example:
        >>> import dataclasses
        >>> import llmslim as ls
        >>> from hypothesis import given, settings
        >>> @dataclasses.dataclass
        ... class Round(ls.PassBase):
        ...     bits: int = 8
        ...     symmetric: bool = True
        ...     strategy_overrides = {"bits": {"min_value": 2, "max_value": 8}}
        >>> @settings(max_examples=10, database=None)
        ... @given(passes(Round))
        ... def test_in_range(p):
        ...     assert 2 <= p.bits <= 8 and isinstance(p.symmetric, bool)
        >>> test_in_range()
    """
    fields = st.fixed_dictionaries(field_strategies(cls, overrides))
    return fields.map(lambda kw: build_or_none(cls, kw)).filter(lambda p: p is not None)


def invalid_configs(cls: type, **overrides: Any) -> SearchStrategy[dict[str, Any]]:
    """Field dicts that ``cls(**fields)`` must reject with ``ConfigError``.

    Each is a valid configuration with one field replaced: a value of the wrong type (for
    ``bool``, ``int``, ``float``, ``str``, ``Literal``, ``tuple[...]`` fields, and ``targets``/
    ``ignore`` of a PassBase), or NaN or an out-of-range value where a range override declares
    the field's range.

    Raises:
        ConfigError: ``cls`` is not a dataclass, an override is malformed, or no invalid value
            can be derived for any field.

    Example:
        >>> import dataclasses
        >>> import llmslim as ls
        >>> from llmslim._validate import check_range
        >>> from hypothesis import given, settings
        >>> @dataclasses.dataclass
        ... class Scale(ls.PassBase):
        ...     factor: float = 0.5
        ...     strategy_overrides = {"factor": {"min_value": 0.0, "max_value": 1.0}}
        ...     def validate(self):
        ...         check_range(self.label, "factor", self.factor, 0.0, 1.0)
        >>> @settings(max_examples=20, database=None)
        ... @given(invalid_configs(Scale))
        ... def test_rejected(fields):
        ...     try:
        ...         Scale(**fields)
        ...     except ls.errors.ConfigError:
        ...         return
        ...     raise AssertionError(f"Scale accepted {fields}")
        >>> test_rejected()
    """
    bad = invalid_values(cls, overrides)
    if not bad:
        raise ConfigError(f"invalid_configs: no invalid value can be derived for any field of {cls.__name__}")
    field_strategies(cls, overrides)  # raise malformed overrides now, not at draw time

    @st.composite
    def build(draw: Any) -> dict[str, Any]:
        fields = draw(valid_kwargs(cls, overrides))
        name = draw(st.sampled_from(sorted(bad)))
        fields[name] = draw(st.sampled_from(bad[name]))
        return fields

    return build()
