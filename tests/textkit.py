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


def tiny_hf_folder(tmp_path):
    """A tiny LLaMA saved with ``save_pretrained`` and a word-level tokenizer over docs words."""
    import transformers
    from tokenizers import Tokenizer, models as tm, pre_tokenizers

    from llmslim import data, models

    words = sorted({w for w in data.docs_text()[:20000].split()})[:126]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[EOS]")
    model = models.tiny("llama", max_positions=512, eos_token_id=1)  # the tokenizer's [EOS]
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
