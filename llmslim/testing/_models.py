"""Small models with matching batches, and weights with realistic pathologies; plain torch.

Every builder is deterministic in its ``seed`` and leaves the global RNG untouched; the
hypothesis strategies in :mod:`llmslim.testing.strategies` draw the seed and the shapes.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MissingDependencyError

__all__ = [
    "PATHOLOGIES",
    "MODEL_KINDS",
    "HF_KINDS",
    "has_transformers",
    "pathologize_",
    "make_weight",
    "make_model",
    "AttentionBlock",
    "TinyDecoder",
    "MHABlock",
]

PATHOLOGIES: tuple[str, ...] = ("outliers", "zero_rows", "tiny", "huge")
"""Weight pathologies: a few entries 10-50x the standard deviation, all-zero rows, the whole
tensor scaled by 1e-5, the whole tensor scaled by 1e3."""

HF_KINDS: tuple[str, ...] = ("llama", "gpt2", "bert")
MODEL_KINDS: tuple[str, ...] = ("mlp", "convnet", "attention", "mha", *HF_KINDS)

TINY, HUGE = 1e-5, 1e3


def has_transformers() -> bool:
    """Whether Hugging Face ``transformers`` is importable (for the ``llama``/``gpt2``/``bert`` kinds)."""
    return importlib.util.find_spec("transformers") is not None


def pathologize_(w: torch.Tensor, pathology: str, generator: torch.Generator) -> torch.Tensor:
    """Give ``w`` one pathology (see :data:`PATHOLOGIES`) in place; return it.

    Args:
        w: A weight with at least one dimension (rows are ``w[i]``).
        pathology: One of :data:`PATHOLOGIES`.
        generator: Source of randomness (which entries, which rows).

    Raises:
        ConfigError: Unknown pathology.

    Example:
        >>> import torch
        >>> w = pathologize_(torch.ones(4, 3), "zero_rows", torch.Generator().manual_seed(0))
        >>> int((w.abs().sum(dim=1) == 0).sum())
        1
    """
    if pathology not in PATHOLOGIES:
        raise ConfigError(f"pathology must be one of {', '.join(PATHOLOGIES)} (got {pathology!r})")
    with torch.no_grad():
        if w.numel() == 0:
            return w
        if pathology == "outliers":
            flat = w.view(-1)
            scale = float(flat.float().std()) if flat.numel() > 1 else 0.0
            scale = scale or float(flat.abs().max()) or 1.0
            k = max(1, flat.numel() // 64)
            idx = torch.randperm(flat.numel(), generator=generator)[:k]
            magnitude = (torch.rand(k, generator=generator) * 40 + 10) * scale
            sign = torch.randint(0, 2, (k,), generator=generator) * 2 - 1
            flat[idx] = (magnitude * sign).to(w.dtype)
        elif pathology == "zero_rows":
            rows = w.shape[0]
            idx = torch.randperm(rows, generator=generator)[: max(1, rows // 4)]
            w[idx] = 0
        elif pathology == "tiny":
            w.mul_(TINY)
        else:
            w.mul_(HUGE)
    return w


def make_weight(shape: Sequence[int], seed: int = 0, pathology: str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A weight like a freshly initialised layer's (normal, std ``1/sqrt(fan_in)``), with a pathology.

    Args:
        shape: ``(out, in)`` or ``(out, in, *kernel)``; rows are ``w[i]``.
        seed: Seeds the values and the pathology.
        pathology: One of :data:`PATHOLOGIES`, or ``None`` for a clean weight. The clean
            weight of the same seed is the starting point, so the two can be compared.
        dtype: Returned dtype (values are drawn in float32).

    Raises:
        ConfigError: Unknown pathology.

    Example:
        >>> w = make_weight((3, 5), seed=1, pathology="huge")
        >>> w.shape, bool(w.abs().max() > 10)
        (torch.Size([3, 5]), True)
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in shape)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    w = torch.randn(shape, generator=g) / math.sqrt(max(1, fan_in))
    if pathology is not None:
        pathologize_(w, pathology, g)
    return w.to(dtype)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    out, seen = [], set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() >= 2 and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


def _apply_pathologies(model: nn.Module, pathologies: Sequence[str], seed: int) -> None:
    ws = _weights(model)
    if not pathologies or not ws:
        return
    g = torch.Generator().manual_seed(seed + 7919)
    for pathology in pathologies:
        chosen = {int(torch.randint(0, len(ws), (1,), generator=g))}
        chosen |= {i for i in range(len(ws)) if torch.rand(1, generator=g).item() < 0.5}
        for i in sorted(chosen):
            pathologize_(ws[i].data, pathology, g)


# -- pure-torch models -----------------------------------------------------------------------
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def _mlp(g: torch.Generator, *, in_features: int = 8, hidden: Sequence[int] = (16,), out_features: int = 4,
         batch: int = 2, seq: int | None = None, bias: bool = True, activation: str = "relu") -> tuple[nn.Module, Any]:
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(_ACTIVATIONS)} (got {activation!r})")
    layers: list[nn.Module] = []
    sizes = [in_features, *hidden, out_features]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    lead = (batch,) if seq is None else (batch, seq)
    return nn.Sequential(*layers), torch.randn(*lead, in_features, generator=g)


def _convnet(g: torch.Generator, *, in_channels: int = 3, channels: Sequence[int] = (4, 6), size: int = 6,
             classes: int = 3, batch: int = 2, kernel: int = 3, depthwise: bool = False) -> tuple[nn.Module, Any]:
    layers: list[nn.Module] = []
    prev = in_channels
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(prev, c, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        if depthwise and i == 0:
            layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        prev = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # running statistics that make batch norm do something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model, torch.randn(batch, in_channels, size, size, generator=g)


class AttentionBlock(nn.Module):
    """A pre-norm decoder block written out by hand: q/k/v/o projections, causal attention, MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.down_proj(F.gelu(self.up_proj(self.norm2(x))))


class TinyDecoder(nn.Module):
    """Token embedding, a stack of :class:`AttentionBlock` in ``layers``, final norm, ``lm_head``."""

    def __init__(self, vocab: int, dim: int, heads: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(AttentionBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class MHABlock(nn.Module):
    """A pre-norm encoder block on ``nn.MultiheadAttention``, whose forward reads ``out_proj.weight``
    directly: a pass that swaps ``out_proj`` for a module without ``weight`` breaks it."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.up_proj, self.down_proj = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.down_proj(F.relu(self.up_proj(self.norm2(x))))


def _attention(g: torch.Generator, *, vocab: int = 11, heads: int = 2, head_dim: int = 4, hidden: int = 12,
               layers: int = 2, batch: int = 2, seq: int = 5) -> tuple[nn.Module, Any]:
    model = TinyDecoder(vocab, heads * head_dim, heads, hidden, layers)
    return model, torch.randint(0, vocab, (batch, seq), generator=g)


def _mha(g: torch.Generator, *, heads: int = 2, head_dim: int = 4, hidden: int = 12, batch: int = 2,
         seq: int = 5) -> tuple[nn.Module, Any]:
    dim = heads * head_dim
    return MHABlock(dim, heads, hidden), torch.randn(batch, seq, dim, generator=g)


# -- Hugging Face models -----------------------------------------------------------------------
def _hf(kind: str, g: torch.Generator, *, vocab: int = 13, heads: int = 2, kv_heads: int | None = None,
        head_dim: int = 4, hidden: int = 12, layers: int = 2, batch: int = 2, seq: int = 5) -> tuple[nn.Module, Any]:
    if not has_transformers():
        raise MissingDependencyError(f'make_model({kind!r}) needs Hugging Face transformers: pip install "llmslim[hf]"')
    from ..models import tiny

    model = tiny(
        kind, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)), vocab=vocab, hidden=heads * head_dim,
        intermediate=hidden, layers=layers, heads=heads, kv_heads=kv_heads or heads, max_positions=max(16, seq),
        **({} if kind == "bert" else {"use_cache": False}),
    )
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "mlp": _mlp,
    "convnet": _convnet,
    "attention": _attention,
    "mha": _mha,
    "llama": lambda g, **kw: _hf("llama", g, **kw),
    "gpt2": lambda g, **kw: _hf("gpt2", g, **kw),
    "bert": lambda g, **kw: _hf("bert", g, **kw),
}


def make_model(kind: str = "mlp", seed: int = 0, *, pathologies: Sequence[str] = (), **dims: Any) -> tuple[nn.Module, Any]:
    """A small model of ``kind`` in eval mode and a batch it accepts, deterministic in ``seed``.

    Args:
        kind: One of :data:`MODEL_KINDS`: ``"mlp"`` (``nn.Sequential`` of ``Linear``),
            ``"convnet"`` (``Conv2d`` + ``BatchNorm2d`` + a ``Linear`` head), ``"attention"``
            (a tiny decoder LM written in plain torch, input token ids), ``"mha"`` (an
            ``nn.MultiheadAttention`` block), ``"llama"``/``"gpt2"``/``"bert"`` (tiny Hugging
            Face models from configs; need ``transformers``).
        seed: Seeds the weights, the pathologies and the batch.
        pathologies: Names from :data:`PATHOLOGIES`, each given to a random non-empty subset of
            the weight matrices.
        **dims: Sizes for the builder (``in_features``, ``hidden``, ``channels``, ``heads``,
            ``head_dim``, ``layers``, ``batch``, ``seq`` ...).

    Returns:
        ``(model, batch)``; ``default_forward(model, batch)`` runs it.

    Raises:
        ConfigError: Unknown kind or pathology.
        MissingDependencyError: A Hugging Face kind without ``transformers`` installed.

    Example:
        >>> model, batch = make_model("convnet", seed=3, pathologies=["outliers"])
        >>> model(batch).shape
        torch.Size([2, 3])
    """
    if kind not in _BUILDERS:
        raise ConfigError(f"kind must be one of {', '.join(MODEL_KINDS)} (got {kind!r})")
    for p in pathologies:
        if p not in PATHOLOGIES:
            raise ConfigError(f"pathologies must be names from {', '.join(PATHOLOGIES)} (got {p!r})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        try:
            model, batch = _BUILDERS[kind](g, **dims)
        except TypeError as exc:
            raise ConfigError(f"make_model({kind!r}): {exc}") from None
    _apply_pathologies(model, pathologies, seed)
    return model.eval(), batch
