"""Torch-Pruning's side of benchmarks/structured.py: the MLP intermediate channels of SmolLM2 only.

Settings follow Torch-Pruning's own LLM example (``examples/LLMs/prune_llm.py``): ``BasePruner``
(``MetaPruner`` there, the same class) with its group L2 magnitude importance
(``GroupMagnitudeImportance(p=2, group_reduction="mean")``, called ``GroupNormImportance`` in the
example), local (per-layer) ranking, ``round_to=4``, a short text as the example input for its
graph trace, logits as the traced output, and ``config.intermediate_size`` updated afterwards.
The example prunes the hidden size and whole heads too; here every linear layer except the MLPs'
``gate_proj``/``up_proj`` (and the embedding) is in ``ignored_layers``, so the only groups it
may cut are the intermediate channels: ``gate_proj``/``up_proj`` rows with the coupled
``down_proj`` columns, ``ratio`` of each MLP. Its Taylor importance
(``GroupTaylorImportance``, defaults) reads the ``.grad`` of the weights, accumulated here by
``backward`` of the next-token loss over the same calibration windows our passes use.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn


def available() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False
    return True


def prune_mlp_channels_(model: nn.Module, tokenizer: Any, ratio: float, importance: str, batches: list) -> float:
    """Prune ``ratio`` of every MLP's intermediate channels with Torch-Pruning, in place; return the wall seconds.

    ``importance``: ``"magnitude"`` (no data) or ``"taylor"`` (gradients over ``batches``).
    """
    import torch_pruning as tp

    start = time.perf_counter()
    roots = {m for layer in model.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)}
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in roots] + [model.model.embed_tokens]
    if importance == "taylor":
        scorer = tp.importance.GroupTaylorImportance()
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for b in batches:  # the mean next-token loss over the windows: gradients summed, scaled
                (model(**b, labels=b["input_ids"], use_cache=False).loss / len(batches)).backward()
    else:
        scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    example = torch.tensor([tokenizer.encode("Hello world.")])
    with warnings.catch_warnings():
        # "Unwrapped parameters detected" (the RMSNorm weights): they sit on the hidden size, which is not pruned here
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model, example_inputs=example, importance=scorer, global_pruning=False, pruning_ratio=ratio,
            ignored_layers=ignored, output_transform=lambda out: out.logits, round_to=4,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    model.zero_grad(set_to_none=True)
    model.config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    return time.perf_counter() - start
