"""Real text for calibration and evaluation: Python's own documentation, one pinned protocol.

The text is ``pydoc_data.topics``: every topic in sorted key order, joined by a blank line, so it
is the same on every machine with the same Python minor version and needs no download.

Protocols:

* ``"default"``: the whole text is tokenized at once without special tokens; the first 55% of
  the tokens are calibration, the last 45% evaluation. They never overlap.
* ``"reference"``: the text is split at 20% of its characters; each part is tokenized on its
  own. On it, float32 SmolLM2-135M-Instruct scores 15.133 (Python 3.11), the figure the
  project's issues quote.

Perplexity is scored on the first 64 non-overlapping 512-token windows of the evaluation part,
each window on its own (511 predictions per window); calibration batches are seeded random
512-token windows of the calibration part.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import ConfigError

__all__ = ["docs_text", "docs_sentences", "Split", "split_tokens", "windows", "calibration_batches", "encode", "read_text"]

Protocol = Literal["default", "reference"]
CALIBRATION_FRACTION = 0.55
REFERENCE_CHAR_FRACTION = 0.20


def docs_text() -> str:
    """Python's documentation topics (``pydoc_data.topics``), sorted by key, joined by blank lines.

    Example:
        >>> text = docs_text()
        >>> len(text) > 100_000
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def docs_sentences(n: int = 256, *, min_words: int = 6) -> list[str]:
    """The first ``n`` prose sentences of the evaluation part of :func:`docs_text` (last 45%).

    For embedding fidelity of encoders: real English sentences, never from the calibration part.

    Example:
        >>> sentences = docs_sentences(3)
        >>> len(sentences), all(s.endswith(".") for s in sentences)
        (3, True)
    """
    import re

    text = docs_text()
    tail = text[int(CALIBRATION_FRACTION * len(text)) :]
    out: list[str] = []
    for raw in re.split(r"(?<=[.!?])\s+", tail):
        sentence = " ".join(raw.split())
        if len(sentence.split()) >= min_words and sentence[0].isupper() and sentence.endswith(".") and not any(junk in sentence for junk in (">>>", "::=", "**", "|")):
            out.append(sentence)
            if len(out) == n:
                break
    return out


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, with a clear error when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"text file must be readable UTF-8 (got {str(path)!r}: {exc})") from None


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D ``int64`` tensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclasses.dataclass(frozen=True)
class Split:
    """Calibration and evaluation token ids that never overlap."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    protocol: str


def split_tokens(
    tokenizer: Any,
    text: str | None = None,
    *,
    protocol: Protocol = "default",
) -> Split:
    """Tokenize ``text`` (default: :func:`docs_text`) and split it by ``protocol``.

    Args:
        tokenizer: A Hugging Face tokenizer (anything called as ``tokenizer(text,
            add_special_tokens=False)["input_ids"]``).
        text: The text; Python's documentation when ``None``.
        protocol: ``"default"`` (split at 55% of the tokens) or ``"reference"`` (split at 20% of
            the characters, parts tokenized separately).

    Raises:
        ConfigError: Unknown protocol, or a text too short to split.
    """
    if protocol not in ("default", "reference"):
        raise ConfigError(f"protocol must be 'default' or 'reference' (got {protocol!r})")
    text = docs_text() if text is None else text
    if protocol == "reference":
        cut = int(REFERENCE_CHAR_FRACTION * len(text))
        calibration, evaluation = encode(tokenizer, text[:cut]), encode(tokenizer, text[cut:])
    else:
        ids = encode(tokenizer, text)
        cut = int(CALIBRATION_FRACTION * len(ids))
        calibration, evaluation = ids[:cut], ids[cut:]
    if len(calibration) < 2 or len(evaluation) < 2:
        raise ConfigError(f"text must give at least 2 tokens on each side of the split (got {len(text)} characters)")
    return Split(calibration, evaluation, protocol)


def windows(token_ids: torch.Tensor, seq_len: int = 512, max_windows: int | None = 64) -> torch.Tensor:
    """The first ``max_windows`` non-overlapping ``seq_len`` windows of ``token_ids``, ``[n, seq_len]``.

    Raises:
        ConfigError: ``seq_len`` < 2, or fewer than ``seq_len`` tokens.

    Example:
        >>> windows(torch.arange(10), seq_len=4, max_windows=None).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    token_ids = torch.as_tensor(token_ids).flatten()
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2 (got {seq_len!r})")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ConfigError(f"max_windows must be a positive integer or None (got {max_windows!r})")
    n = len(token_ids) // seq_len
    if n == 0:
        raise ConfigError(f"token_ids must hold at least seq_len={seq_len} tokens (got {len(token_ids)})")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[: n * seq_len].view(n, seq_len)


def calibration_batches(
    tokenizer: Any | None = None,
    text: str | torch.Tensor | None = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    *,
    protocol: Protocol = "default",
    as_batch: Callable[[torch.Tensor], Any] | None = None,
) -> list[Any]:
    """Seeded random ``seq_len`` windows of calibration tokens, one batch each.

    Args:
        tokenizer: Tokenizer for ``text``; not needed when ``text`` is already token ids.
        text: Token ids, a text whose calibration part (by ``protocol``) is used, or ``None``
            for Python's documentation.
        n_samples: Number of windows (batches).
        seq_len: Tokens per window.
        seed: The same seed gives the same windows.
        as_batch: Turns a ``[1, seq_len]`` id tensor into a batch; default
            ``{"input_ids": ids}``, what Hugging Face models take.

    Returns:
        ``n_samples`` batches; windows start at random offsets and may overlap each other.

    Example:
        >>> batches = calibration_batches(text=torch.arange(100), n_samples=3, seq_len=8, seed=1)
        >>> len(batches), tuple(batches[0]["input_ids"].shape)
        (3, (1, 8))
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples must be a positive integer (got {n_samples!r})")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2 (got {seq_len!r})")
    if isinstance(text, torch.Tensor):
        ids = text.flatten().long()
    else:
        if tokenizer is None:
            raise ConfigError("calibration_batches: tokenizer is required to encode text (got None)")
        ids = split_tokens(tokenizer, text, protocol=protocol).calibration
    if len(ids) < seq_len:
        raise ConfigError(f"calibration text must hold at least seq_len={seq_len} tokens (got {len(ids)})")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=g)
    make = as_batch or (lambda window: {"input_ids": window})
    return [make(ids[s : s + seq_len].unsqueeze(0).clone()) for s in starts.tolist()]
