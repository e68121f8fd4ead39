"""Offline stand-ins for the workbench tests: a character tokenizer and a bigram-table model."""

from __future__ import annotations

import torch
from torch import nn


class CharTokenizer:
    """One token per character (code point modulo ``vocab``); no special tokens."""

    def __init__(self, vocab: int = 97) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % self.vocab for c in text]}


class Bigram(nn.Module):
    """Logits depend only on the current token: ``table[input_ids]``."""

    def __init__(self, vocab: int = 11, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids: torch.Tensor):
        return self.table[input_ids]
