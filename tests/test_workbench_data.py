from __future__ import annotations

import math

import pytest
import torch

from llmslim import data, evaluate
from llmslim.errors import ConfigError
from textkit import Bigram, CharTokenizer


def test_docs_text_is_sorted_topics_joined_by_blank_lines() -> None:
    from pydoc_data.topics import topics

    text = data.docs_text()
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])
    assert text == data.docs_text()


def test_default_split_is_disjoint_and_complete() -> None:
    tok = CharTokenizer()
    text = "abcdefghij" * 50
    split = data.split_tokens(tok, text)
    whole = data.encode(tok, text)
    assert len(split.calibration) == int(0.55 * len(whole))
    assert torch.equal(torch.cat([split.calibration, split.evaluation]), whole)
    assert split.protocol == "default"


def test_reference_split_cuts_characters_at_20_percent() -> None:
    tok = CharTokenizer()
    text = "".join(chr(65 + i % 26) for i in range(1000))
    split = data.split_tokens(tok, text, protocol="reference")
    assert torch.equal(split.calibration, data.encode(tok, text[:200]))
    assert torch.equal(split.evaluation, data.encode(tok, text[200:]))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"protocol": "random"}, "protocol must be"), ({"text": "a"}, "at least 2 tokens")],
)
def test_split_rejects_bad_input(kwargs, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        data.split_tokens(CharTokenizer(), **{"text": "abcdefgh" * 10, **kwargs})


def test_windows() -> None:
    ids = torch.arange(25)
    assert data.windows(ids, 10, None).tolist() == [list(range(10)), list(range(10, 20))]
    assert data.windows(ids, 10, 1).shape == (1, 10)
    for bad in [{"seq_len": 1}, {"seq_len": 30}, {"max_windows": 0}]:
        with pytest.raises(ConfigError):
            data.windows(ids, **{"seq_len": 10, **bad})


def test_calibration_batches_are_reproducible_windows_of_the_calibration_part() -> None:
    tok = CharTokenizer()
    text = data.docs_text()[:20000]
    a = data.calibration_batches(tok, text, n_samples=8, seq_len=64, seed=3)
    b = data.calibration_batches(tok, text, n_samples=8, seq_len=64, seed=3)
    c = data.calibration_batches(tok, text, n_samples=8, seq_len=64, seed=4)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    calib = data.split_tokens(tok, text).calibration.tolist()
    joined = ",".join(map(str, calib))
    for batch in a:
        assert batch["input_ids"].shape == (1, 64)
        assert ",".join(map(str, batch["input_ids"][0].tolist())) in joined  # a contiguous calibration window
    tuples = data.calibration_batches(text=torch.arange(100), n_samples=2, seq_len=8, as_batch=lambda w: (w,))
    assert isinstance(tuples[0], tuple)
    with pytest.raises(ConfigError, match="tokenizer is required"):
        data.calibration_batches(None, "text")
    with pytest.raises(ConfigError, match="at least seq_len"):
        data.calibration_batches(text=torch.arange(10), seq_len=64)


def test_docs_sentences_come_from_the_evaluation_part() -> None:
    sentences = data.docs_sentences(20)
    text = data.docs_text()
    cut = int(0.55 * len(text))
    assert len(sentences) == 20 and all(len(s.split()) >= 6 for s in sentences)
    assert " ".join(text[cut:].split()).find(sentences[0]) >= 0


def _reference_nll(model: Bigram, ids: torch.Tensor, seq_len: int, n: int) -> tuple[float, int]:
    nll, count = 0.0, 0
    table = torch.log_softmax(model.table.detach().double(), -1)
    for w in range(n):
        window = ids[w * seq_len : (w + 1) * seq_len].tolist()
        for prev, nxt in zip(window[:-1], window[1:]):
            nll -= table[prev, nxt].item()
            count += 1
    return nll, count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_a_hand_computed_reference(batch_size) -> None:
    model = Bigram()
    ids = torch.randint(0, 11, (103,), generator=torch.Generator().manual_seed(0))
    nll, count = _reference_nll(model, ids, 10, 10)
    assert count == 10 * 9
    got = evaluate.perplexity(model, ids, seq_len=10, batch_size=batch_size, max_windows=None, progress=False)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-6)
    first4 = evaluate.perplexity(model, ids, seq_len=10, max_windows=4, progress=False)
    assert first4 == pytest.approx(math.exp(_reference_nll(model, ids, 10, 4)[0] / 36), rel=1e-6)


def test_kl_divergence_zero_for_identical_and_hand_computed_otherwise() -> None:
    a, b = Bigram(seed=0), Bigram(seed=1)
    ids = torch.randint(0, 11, (40,), generator=torch.Generator().manual_seed(0))
    assert evaluate.kl_divergence(a, a, ids, seq_len=8, progress=False) == pytest.approx(0.0, abs=1e-7)
    p = torch.log_softmax(b.table.detach().double(), -1)
    q = torch.log_softmax(a.table.detach().double(), -1)
    expected = sum((p[t].exp() * (p[t] - q[t])).sum().item() for t in ids[:40].tolist()) / 40
    assert evaluate.kl_divergence(a, b, ids, seq_len=8, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_rejects_models_without_logits() -> None:
    class NoLogits(torch.nn.Module):
        def forward(self, input_ids):
            return {"hidden": input_ids}

    with pytest.raises(ConfigError, match="must return logits"):
        evaluate.perplexity(NoLogits(), torch.arange(20), seq_len=10, progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate.perplexity(Bigram(), torch.arange(20) % 11, seq_len=10, batch_size=0, progress=False)


def test_model_bytes_on_mixed_dtypes() -> None:
    m = torch.nn.Module()
    m.a = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    m.register_buffer("q", torch.zeros(3, 5, dtype=torch.uint8))
    m.register_buffer("s", torch.zeros(3, dtype=torch.float16))
    m.register_buffer("i", torch.zeros(2, dtype=torch.int64))
    m.register_buffer("none", None)
    assert evaluate.model_bytes(m) == 20 + 15 + 6 + 16
