"""Quality and speed measures: perplexity, KL divergence to the original, embedding fidelity,
decode speed, and true storage bytes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Uniform(nn.Module):  # predicts every token of a 10-word vocabulary equally
    ...     def forward(self, input_ids):
    ...         return torch.zeros(*input_ids.shape, 10)
    >>> round(perplexity(Uniform(), torch.arange(40) % 10, seq_len=8, progress=False), 4)
    10.0
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._measure import model_bytes
from .data import windows
from .errors import ConfigError

__all__ = ["perplexity", "kl_divergence", "embedding_fidelity", "sentence_embeddings", "decode_speed", "model_bytes"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"model must return logits (a tensor or an output with .logits) (got {type(out).__name__})")
    return logits.float()


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _batches(token_ids: torch.Tensor, seq_len: int, batch_size: int, max_windows: int | None, progress: bool, desc: str):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r})")
    w = windows(token_ids, seq_len, max_windows)
    chunks = list(w.split(batch_size))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, leave=False, dynamic_ncols=True)
    return chunks


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 1,
    max_windows: int | None = 64,
    progress: bool = True,
) -> float:
    """Perplexity over non-overlapping windows, each scored on its own.

    The exact mean negative log-likelihood over every predicted token (``seq_len - 1`` per
    window), exponentiated.

    Args:
        model: A causal LM called as ``model(input_ids=ids)``, returning logits or an output with
            ``.logits``.
        token_ids: 1-D token ids (e.g. ``split_tokens(...).evaluation``).
        seq_len: Window length.
        batch_size: Windows per forward.
        max_windows: Score only the first this many windows (``None``: all).
        progress: Show a progress bar.

    Raises:
        ConfigError: Bad sizes, too few tokens, or a model that returns no logits.
    """
    was_training = model.training
    model.eval()
    device, nll, count = _device(model), 0.0, 0
    try:
        for chunk in _batches(token_ids, seq_len, batch_size, max_windows, progress, "perplexity"):
            chunk = chunk.to(device)
            logp = torch.log_softmax(_logits(model, chunk)[:, :-1], dim=-1)
            nll -= logp.gather(-1, chunk[:, 1:, None]).double().sum().item()
            count += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def kl_divergence(
    model: nn.Module,
    reference_model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 1,
    max_windows: int | None = 64,
    progress: bool = True,
) -> float:
    """Mean next-token ``KL(reference || model)`` in nats over every position of the windows.

    How far a compressed model's predictions moved from its original's: unlike perplexity it
    does not depend on how well the original fits the text's domain.
    """
    models = (model, reference_model)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    total, count = 0.0, 0
    try:
        for chunk in _batches(token_ids, seq_len, batch_size, max_windows, progress, "kl divergence"):
            logq = torch.log_softmax(_logits(model, chunk.to(_device(model))).cpu(), dim=-1)
            logp = torch.log_softmax(_logits(reference_model, chunk.to(_device(reference_model))).cpu(), dim=-1)
            total += F.kl_div(logq, logp, log_target=True, reduction="sum").double().item()
            count += chunk.numel()
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return total / count


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings of an encoder (padding excluded)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt")
        enc = {k: v.to(_device(model)) for k, v in enc.items()}
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).cpu())
    return torch.cat(out)


def embedding_fidelity(
    model: nn.Module, reference_model: nn.Module, tokenizer: Any, sentences: Sequence[str], *, batch_size: int = 32
) -> float:
    """Mean cosine similarity between a compressed encoder's sentence embeddings and its original's.

    1.0 means identical embeddings.
    """
    if not sentences:
        raise ConfigError("sentences must not be empty (got 0)")
    a = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size)
    b = sentence_embeddings(reference_model, tokenizer, sentences, batch_size=batch_size)
    return float((a * b).sum(-1).mean())


def _cache_io(model: nn.Module) -> str:
    # transformers 5 renamed ``past_key_values`` to ``cache`` (inputs and outputs alike).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_speed(
    model: nn.Module, prompt_ids: torch.Tensor, *, new_tokens: int = 32, prefill_tokens: int = 128, repeat: int = 3
) -> dict[str, float]:
    """Batch-1 greedy generation speed with a KV cache.

    Returns ``{"prefill_ms": ..., "decode_tokens_per_s": ...}``: the median over ``repeat`` runs of
    the time to process ``prefill_tokens`` prompt tokens, and of decode throughput for
    ``new_tokens`` tokens after it.
    """
    ids = torch.as_tensor(prompt_ids).flatten()[:prefill_tokens].unsqueeze(0).to(_device(model))
    if ids.shape[1] < prefill_tokens:
        raise ConfigError(f"prompt_ids must hold at least prefill_tokens={prefill_tokens} tokens (got {ids.shape[1]})")
    was_training = model.training
    model.eval()
    name = _cache_io(model)
    prefill, decode = [], []
    try:
        for _ in range(repeat + 1):  # the first run warms up
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            cache, token = out[name], out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{name: cache})
                cache, token = out[name], out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    finally:
        model.train(was_training)
    median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731
    return {"prefill_ms": 1e3 * median(prefill), "decode_tokens_per_s": new_tokens / median(decode)}
