"""The sequential calibration engine: block by block, statistics hooks, solve, propagate."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._context import Context
from .._report import ModuleRow
from ..errors import CalibrationError
from ._blocks import find_blocks
from ._capture import BlockInput, capture_inputs, first_tensor, replace_hidden, to_device, token_mask, without_cache
from ._dist import all_reduce_, global_sum, shard, world
from ._memory import PeakMemory, return_free_memory
from ._stats import InputStats, input_width, layer_input
from ._weights import ShardedWeights

__all__ = ["Solver", "CalibrationResult", "calibrate"]

log = logging.getLogger("llmslim")


@runtime_checkable
class Solver(Protocol):
    """What a calibration-based pass gives the engine.

    * ``select(model)``: the modules it works on (``PassBase.select``);
    * ``statistics(name, module)``: which input statistics it needs for one module
      (``"xtx"``, ``"sqsum"``, ``"absmax"``);
    * ``solve(name, module, stats, ctx)``: rewrite the module (in place, or by swapping it in
      its parent) from its :class:`InputStats`; return a report row or ``None``.

    Optional attributes: ``sequential`` (true-sequential: modules reading different inputs in
    a block are solved one input group at a time, each seeing its predecessors' compressed
    outputs) and ``edits_in_place`` (journal each module before its solve, for rollback).
    """

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]: ...

    def statistics(self, name: str, module: nn.Module) -> Iterable[str]: ...

    def solve(self, name: str, module: nn.Module, stats: InputStats, ctx: Context) -> ModuleRow | None: ...


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What a sweep did: report rows per solver, size, time and peak memory."""

    rows: tuple[tuple[ModuleRow, ...], ...]
    blocks: int
    batches: int  # over all ranks
    tokens: int  # over all ranks
    ranks: int
    seconds: float
    peak_rss_growth: int
    peak_cuda: int | None

    def notes(self) -> tuple[str, ...]:
        """One line for a Report's notes."""
        cuda = f", peak CUDA {self.peak_cuda / 2**20:.0f} MiB" if self.peak_cuda is not None else ""
        return (
            f"calibration: {self.blocks} blocks, {self.batches} batches"
            f"{f' over {self.ranks} ranks' if self.ranks > 1 else ''}, {self.tokens:,} tokens per layer, "
            f"{self.seconds:.1f}s, peak RSS growth {self.peak_rss_growth / 2**20:.0f} MiB{cuda}",
        )


def _checksum(t: torch.Tensor) -> int:
    if t.numel() == 0:  # an empty tensor (a fully pruned layer's values): torch will not view it as words
        return 0
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    if raw.numel() % 4 == 0:  # summed as 32-bit words: a quarter of the elements to widen
        raw = raw.view(torch.int32)
    return int(raw.sum(dtype=torch.int64)) + 257 * int(raw[::7].sum(dtype=torch.int64))


def _fingerprint(block: nn.Module) -> list[tuple[int, int, int]]:
    # Identity, storage and a checksum of the raw bits of every tensor: a swap, a .data
    # assignment or an in-place edit (even through .data, which bumps no version counter)
    # changes it.
    return [(id(t), t.data_ptr(), _checksum(t)) for t in [*block.parameters(), *block.buffers()]]


def _block_of(name: str, blocks: list[tuple[str, nn.Module]]) -> int | None:
    for i, (bname, _) in enumerate(blocks):
        if not bname or name == bname or name.startswith(bname + "."):
            return i
    return None


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class _Enough(Exception):
    """Raised by a statistics hook once a batch has given everything asked of it."""


def _run_block(block: nn.Module, inputs: list[BlockInput], device: torch.device, *, keep: bool, store: torch.device,
               on_batch: Callable[[BlockInput], None] | None = None, consume: bool = False) -> list[torch.Tensor] | None:
    # consume: this is the block's last forward and its outputs feed the next block, so each
    # batch's output replaces its input in ``inputs`` at once: one copy of the activations lives,
    # not two
    outputs = []
    # cached(): a masked weight (weight * mask, a parametrization) is built once per forward
    # sweep, not once per batch; nothing changes the weights while the batches run
    with torch.no_grad(), parametrize.cached():
        for j, inp in enumerate(inputs):
            if on_batch is not None:
                on_batch(inp)
            try:
                out = first_tensor(block(*to_device(inp.args, device), **to_device(inp.kwargs, device)))
            except _Enough:
                keep = False  # stopped early: this forward has no outputs to keep
                continue
            if keep:
                outputs.append(out.to(store))
                if consume:
                    inputs[j] = replace_hidden(inp, outputs[-1])
    return outputs if keep else None


Item = tuple[Any, str, nn.Module]  # (solver, qualified name, module)


def _input_groups(block: nn.Module, items: list[Item], probe: BlockInput, device: torch.device) -> list[list[Item]]:
    # Run one batch and note which input tensor each module reads, in order of first use:
    # modules reading the same tensor (q/k/v, gate/up) form a group that shares its statistics
    # (and, for true-sequential solvers, is solved together). The probed inputs stay referenced
    # until the end, so no two distinct tensors can share an address.
    alive: list[torch.Tensor] = []
    first: dict[str, int] = {}
    handles = []
    for _, name, module in items:
        def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise CalibrationError(f"module {_name!r} must be called with its input tensor first to be calibrated")
            if _name not in first:
                alive.append(args[0])
                first[_name] = args[0].data_ptr()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run_block(block, [probe], device, keep=False, store=device)
    finally:
        for h in handles:
            h.remove()
    alive.clear()
    missing = [name for _, name, _ in items if name not in first]
    if missing:
        raise CalibrationError(f"module {missing[0]!r} never ran during calibration, so it has no statistics; ignore it")
    groups: dict[int, list[Item]] = {key: [] for key in dict.fromkeys(first.values())}  # first-use order
    for item in items:
        groups[first[item[1]]].append(item)
    return list(groups.values())


def _collect(groups: list[list[Item]], run: Callable[[Callable[[torch.Tensor | None], None]], list[torch.Tensor] | None],
             device: torch.device, *, stop_early: bool = False) -> tuple[dict[str, InputStats], list[torch.Tensor] | None]:
    # One accumulator per input group, hooked on the group's first module.
    stats: dict[str, InputStats] = {}
    shared: dict[str, InputStats] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = []
    for group in groups:
        leader = group[0][2]
        kinds = set().union(*(solver.statistics(name, module) for solver, name, module in group))
        acc = InputStats(input_width(leader), kinds, device)
        shared[group[0][1]] = acc
        for _, name, _ in group:
            stats[name] = acc

        def hook(mod: nn.Module, args: tuple[Any, ...], _acc: InputStats = acc) -> None:
            _acc.add(layer_input(mod, args[0], current["mask"]))
            if stop_early:  # one group whose input is all we need: skip the rest of the block
                raise _Enough

        handles.append(leader.register_forward_pre_hook(hook))
    try:
        outputs = run(lambda mask: current.update(mask=mask))
    finally:
        for h in handles:
            h.remove()
    all_reduce_(shared)
    return stats, outputs


def calibrate(
    model: nn.Module,
    ctx: Context,
    solvers: Sequence[Solver],
    *,
    blocks: str | None = None,
    propagate: Literal["compressed", "original"] = "compressed",
    offload: bool = True,
    weights: ShardedWeights | None = None,
    after_block: Callable[[str, nn.Module], None] | None = None,
    desc: str = "calibration",
) -> CalibrationResult:
    """Run ``solvers`` over ``model`` block by block on ``ctx.calibration``.

    For each block in order: move it to the compute device (``ctx.device``, else where it
    is), run every cached input through it with statistics hooks on the solvers' modules
    inside it, let each solver solve its modules, recompute the block's outputs (with the
    compressed weights, or keep the original outputs with ``propagate="original"``) to feed the
    next block, and move it back. Solvers run in order within a block, each seeing the
    previous one's result, so several passes share one sweep.

    Args:
        model: The model (a ``meta`` skeleton when ``weights`` is given).
        ctx: Calibration batches, forward adapter, device, progress.
        solvers: The passes to run, in order.
        blocks: Qualified name of the block list; found automatically when ``None``.
        propagate: Feed the next block the compressed (default) or the original outputs.
        offload: Keep cached activations on the CPU (only one block lives on the device).
        weights: Load each block from these shards just before it runs, release it after.
        after_block: Called with each finished block (e.g. to save it) before it is released.
        desc: Progress bar label.

    Raises:
        CalibrationError: No data, a batch that does not fit, NaN/Inf activations, a target
            outside the blocks, or an unknown ``blocks`` name; nothing is modified when it is
            raised before the first solve.
    """
    if not ctx.calibration:
        raise CalibrationError(f"{desc}: calibration needs data: pass calibration=[batch, ...] (got none)")
    if propagate not in ("compressed", "original"):
        raise CalibrationError(f"propagate must be 'compressed' or 'original' (got {propagate!r})")
    start = time.perf_counter()
    ctx.model = model
    block_list = find_blocks(model, blocks)
    work: list[list[tuple[Any, str, nn.Module]]] = [[] for _ in block_list]
    outside: list[Item] = []  # e.g. lm_head: solved after the sweep, from one whole-model forward
    for solver in solvers:
        for name, module in solver.select(model):
            i = _block_of(name, block_list)
            (outside if i is None else work[i]).append((solver, name, module))
    if outside and weights is not None:
        raise CalibrationError(
            f"module {outside[0][1]!r} is outside the repeated blocks, which needs the whole model in memory; "
            "ignore it when calibrating from weights on disk"
        )
    batches = shard(ctx.calibration)
    device = ctx.device or _device_of(block_list[0][1])
    store = torch.device("cpu") if offload else device
    rows: list[list[ModuleRow]] = [[] for _ in solvers]
    index = {id(s): k for k, s in enumerate(solvers)}
    with PeakMemory() as peak:
        if weights is None:
            inputs = capture_inputs(model, block_list[0][1], batches, ctx, store=store)
        else:
            inputs = _capture_from_disk(model, block_list, batches, ctx, store, weights)
        tokens = global_sum(sum(int(inp.mask.sum()) if inp.mask is not None else inp.hidden.shape[:-1].numel() for inp in inputs))
        for i, (bname, block) in enumerate(ctx.progress_bar(block_list, desc=desc, total=len(block_list))):
            if weights is not None:
                weights.load_(block, f"{bname}." if bname else "", device)
            home = _device_of(block)
            block.to(device)
            # a solve may swap modules out (GPTQ's QuantLinear); the rollback journal keeps the old
            # ones, which still hold the weights loaded or moved here: free those with the block's
            before = list(block.modules())
            retire: Callable[[nn.Module], Any] = weights.release_ if weights is not None else (lambda m, home=home: m.to(home))
            outputs = None
            fresh: list[torch.Tensor] | None = None  # outputs of a forward no solve has changed since
            fingerprint = _fingerprint(block)
            active = [s for s in solvers if any(item[0] is s for item in work[i])]
            # with original outputs and a single forward in the block, that forward's outputs are final
            one_forward = propagate == "original" and len(active) == 1 and not getattr(active[0], "sequential", False)
            for solver in solvers:
                items = [item for item in work[i] if item[0] is solver]
                if not items:
                    continue
                groups = _input_groups(block, items, inputs[0], device)
                # true-sequential: one input group at a time, each seeing the ones before compressed
                sequential = getattr(solver, "sequential", False)
                for k, batch_of_groups in enumerate([[g] for g in groups] if sequential else [groups]):
                    def run(set_mask: Callable[[torch.Tensor | None], None]) -> list[torch.Tensor] | None:
                        return _run_block(block, inputs, device, keep=True, store=store, on_batch=lambda inp: set_mask(inp.mask),
                                          consume=one_forward)

                    last = not sequential or k == len(groups) - 1
                    need_original = propagate == "original" and outputs is None  # the whole block must run once
                    stats, fresh = _collect(batch_of_groups, run, device, stop_early=not last and not need_original)
                    if propagate == "original" and outputs is None:
                        outputs = fresh
                    _solve(batch_of_groups, stats, ctx, rows, index, retire=retire)
                    del stats  # the statistics (Hessians: the largest tensors here) are not needed again
                    now = _fingerprint(block)
                    if now != fingerprint:
                        fresh, fingerprint = None, now
            if outputs is None:
                outputs = fresh if fresh is not None else _run_block(block, inputs, device, keep=True, store=store, consume=True)
            for out in outputs:
                if not torch.isfinite(out).all():
                    raise CalibrationError(f"block {bname!r}: its outputs contain NaN or Inf")
            inputs = [replace_hidden(inp, out) for inp, out in zip(inputs, outputs)]
            outputs = fresh = None  # the new inputs hold them now; nothing else may keep the old inputs alive
            if after_block is not None:
                after_block(bname, block)
            now_in = {id(m) for m in block.modules()}
            for module in [block, *(m for m in before if id(m) not in now_in)]:
                retire(module)
            return_free_memory()
        if outside:
            _solve_outside(model, outside, batches, ctx, device, rows, index)
    return CalibrationResult(
        rows=tuple(tuple(r) for r in rows), blocks=len(block_list), batches=len(ctx.calibration), tokens=tokens, ranks=world()[1],
        seconds=time.perf_counter() - start, peak_rss_growth=peak.rss_growth, peak_cuda=peak.cuda_peak,
    )


def _solve(groups: list[list[Item]], stats: dict[str, InputStats], ctx: Context, rows: list[list[ModuleRow]], index: dict[int, int],
           retire: Callable[[nn.Module], Any] | None = None) -> None:
    for solver, name, module in (item for g in groups for item in g):
        with ctx.working_on(name, module, in_place=getattr(solver, "edits_in_place", False)):
            row = solver.solve(name, module, stats[name], ctx)
        if row is not None:
            rows[index[id(solver)]].append(row)
        if retire is not None and ctx.model is not None and _swapped_out(ctx.model, name, module):
            retire(module)  # kept by the rollback journal: its weights go now, not at the block's end


def _swapped_out(model: nn.Module, name: str, module: nn.Module) -> bool:
    try:
        return model.get_submodule(name) is not module
    except AttributeError:
        return True


def _solve_outside(model: nn.Module, items: list[Item], batches: list[Any], ctx: Context, device: torch.device,
                   rows: list[list[ModuleRow]], index: dict[int, int]) -> None:
    # Modules outside the blocks (before or after them) see the compressed blocks' outputs
    # through one forward of the whole model per batch; each solver's modules in turn.
    solvers = list({id(item[0]): item[0] for item in items}.values())  # passes are dataclasses: unhashable
    for solver in solvers:
        mine = [item for item in items if item[0] is solver]

        def run(set_mask: Callable[[torch.Tensor | None], None]) -> None:
            with torch.no_grad():
                for batch in batches:
                    set_mask(token_mask(batch))
                    ctx.run(model, without_cache(model, batch))

        groups = [[item] for item in mine]  # no probe here: each module keeps its own statistics
        stats, _ = _collect(groups, run, device)
        _solve(groups, stats, ctx, rows, index)


def _capture_from_disk(model: nn.Module, block_list: list[tuple[str, nn.Module]], batches: list[Any], ctx: Context,
                       store: torch.device, weights: ShardedWeights) -> list[BlockInput]:
    # Only the modules the forward calls before the first block (embeddings, rotary tables) are
    # loaded, when first called, and released after the capture: the output head of a large
    # vocabulary is never read. A tensor read without calling its module would stay on meta and
    # fail the capture; then everything outside the blocks is loaded and the capture retried.
    loaded: dict[int, nn.Module] = {}
    handles = []
    for name, module in _outside_on_meta(model, block_list):
        def load(mod: nn.Module, args: Any, _prefix: str = f"{name}." if name else "") -> None:
            if id(mod) not in loaded:
                weights.load_(mod, _prefix, "cpu", recurse=False, strict=False)
                loaded[id(mod)] = mod

        handles.append(module.register_forward_pre_hook(load))
    try:
        try:
            inputs = capture_inputs(model, block_list[0][1], batches, ctx, store=store)
        except CalibrationError:
            for h in handles:
                h.remove()
            for name, module in _outside_on_meta(model, block_list):
                weights.load_(module, f"{name}." if name else "", "cpu", recurse=False, strict=False)
                loaded[id(module)] = module
            inputs = capture_inputs(model, block_list[0][1], batches, ctx, store=store)
    finally:
        for h in handles:
            h.remove()
        for module in loaded.values():  # not needed again: free them now
            weights.release_(module)
        return_free_memory()
    return inputs


def _outside_on_meta(model: nn.Module, block_list: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    inside = {id(m) for _, b in block_list for m in b.modules()}
    return [(name, module) for name, module in model.named_modules() if id(module) not in inside
            and any(t.device.type == "meta" for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])]
