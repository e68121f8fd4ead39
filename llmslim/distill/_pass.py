"""The ``distill`` pass: recovery training of a compressed model towards a teacher."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .._context import Context
from .._manager import PassManager
from .._measure import module_stats
from .._original import frozen_copy
from .._pass import PassBase, pass_name
from .._report import Report
from .._targets import Target
from .._validate import check_range, fail
from ..errors import ConfigError
from ._capture import pairs, place, placement
from ._distiller import Distiller
from ._train import batch_stream, lr_factor, make_optimizer, mean_parts, with_labels

__all__ = ["Distill"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "model": None}


@dataclasses.dataclass
class Distill(PassBase):
    """Recovery training: the compressed model learns to match a teacher on training batches.

    The teacher is ``ctx.teacher`` when given, else the model as it was before the manager's first
    pass: the manager keeps a frozen copy of it on the CPU (floating parameters in
    ``teacher_dtype``; bfloat16 costs 2 bytes per parameter of host memory, dropped when the
    manager's ``apply`` returns), moved to ``teacher_device`` when set. The training batches are
    ``data`` when given, else the Context's calibration batches.

    Pruning masks and fake quantization (``qat``) already on the model stay active: training goes
    through them (pruned weights stay zero, the weights learn their quantized values), so
    ``PassManager([Wanda(sparsity=0.5), QAT(bits=4, group_size=64), Distill()])`` followed by
    ``finalize`` gives a sparse int4 model. After each optimizer step, the ``step`` of every pass
    the manager applied before this one runs (a gradual pruning schedule advances during recovery)
    and ``ctx.step`` counts up. ``step`` and ``finalize`` of this pass do nothing: all its work is
    in ``apply``. The parameters of the ``targets`` (every ``Linear`` and ``Conv1D`` by default)
    are trained; the rest is frozen meanwhile. A failure (or a loss that turns non-finite) rolls the model back:
    the journal holds a copy of every trained module (``Context(rollback=False)`` saves it).

    Args:
        steps: Optimizer steps.
        lr: Peak learning rate.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay.
        warmup: Steps of linear warm-up (fewer than ``steps``).
        lr_schedule: After the warm-up: ``"cosine"`` or ``"linear"`` decay towards 0, or ``"constant"``.
        batch_size: Training batches joined into one forward (they must have one shape).
        accumulate: Forwards per optimizer step (gradient accumulation).
        max_grad_norm: Clip the gradient norm (``None``: no clipping).
        temperature: Softening of the logit KL (> 0).
        kl_weight / ce_weight / hidden_weight: Weights of the loss parts (logit KL to the teacher,
            cross-entropy to the next tokens, hidden states); plain fine-tuning is ``kl_weight=0,
            ce_weight=1``.
        hidden_layers: Module names (in both models), or ``"student=teacher"`` name pairs.
        hidden_loss: ``"mse"`` or ``"cosine"``.
        project: Learn projections where hidden widths differ (else that is an error).
        top_k / chunk_size: Bound the logit KL's memory (see :class:`LogitKL`).
        teacher_dtype: Precision of the kept original: ``"bfloat16"``, ``"float16"``,
            ``"float32"`` or ``"model"`` (the model's own).
        teacher_device: Where the kept original runs (``None``: the CPU).
        data: Training batches (a sequence, reshuffled every epoch, or any iterable such as a
            ``DataLoader``). A Python object, so a pass holding it has no recipe.
        targets / ignore / name: As :class:`~llmslim.PassBase`; the modules whose parameters train.

    Raises:
        ConfigError: A bad setting (``temperature=0``, ``warmup >= steps`` ...); in ``apply``, a
            hidden layer that is not a module or differing widths with ``project=False``.

    Example:
        >>> import torch
        >>> import llmslim as ls
        >>> from llmslim import models
        >>> from llmslim.prune import Magnitude
        >>> model = models.tiny("llama")
        >>> batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i))} for i in range(4)]
        >>> report = ls.compress_(model, Magnitude(sparsity=0.5), Distill(steps=3, lr=1e-3), calibration=batches, progress=False)
        >>> info = report.children[1].rows[0].info
        >>> info["steps"], sorted(info["loss_start"])
        (3, ['kl', 'total'])
    """

    targets: tuple[Target, ...] = ("Linear", "Conv1D")
    steps: int = 100
    lr: float = 5e-5
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    warmup: int = 0
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    batch_size: int = 1
    accumulate: int = 1
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 1.0
    hidden_layers: tuple[str, ...] = ()
    hidden_loss: Literal["mse", "cosine"] = "mse"
    project: bool = True
    top_k: int | None = None
    chunk_size: int | None = None
    teacher_dtype: Literal["bfloat16", "float16", "float32", "model"] = "bfloat16"
    teacher_device: str | None = None
    data: Any = dataclasses.field(default=None, repr=False, compare=False)

    strategy_overrides: ClassVar[dict[str, Any]] = {
        "steps": [1, 2, 3],
        "lr": [1e-4, 1e-3],
        "weight_decay": [0.0, 0.01],
        "warmup": [0, 1],
        "batch_size": [1, 2],
        "accumulate": [1, 2],
        "max_grad_norm": [1.0, 0.5],
        "temperature": [0.5, 1.0, 2.0],
        "kl_weight": [0.5, 1.0],
        "ce_weight": [0.0],  # generated models take tensor batches: no labels (tests/test_distill_pass.py covers it)
        "hidden_weight": [0.0, 1.0],
        "hidden_layers": [()],
        "top_k": [None, 1, 3],
        "chunk_size": [None, 5],
        "teacher_device": [None, "cpu"],
        "teacher_dtype": ["bfloat16", "float32", "model"],  # float16 overflows on the generated huge weights
        "data": [None],
    }

    # -- configuration ------------------------------------------------------------------------
    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """A reference model (unless only the cross-entropy part is on); calibration batches unless ``data`` is given."""
        needs = set() if self.data is not None else {"calibration"}
        if self.kl_weight > 0 or (self.hidden_weight > 0 and self.hidden_layers):
            needs.add("original")
        return frozenset(needs)

    @property
    def original_dtype(self) -> torch.dtype | None:
        """The precision the manager keeps the original in (``None``: the model's own)."""
        return _DTYPES[self.teacher_dtype]

    def validate(self) -> None:
        owner = self.label
        for field in ("steps", "batch_size", "accumulate"):
            if getattr(self, field) < 1:
                fail(owner, field, "an integer >= 1", getattr(self, field))
        if not (0 <= self.warmup < self.steps):
            fail(owner, "warmup", f"an integer in [0, steps) = [0, {self.steps})", self.warmup)
        if not (math.isfinite(self.lr) and self.lr > 0):
            fail(owner, "lr", "a finite number > 0", self.lr)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            fail(owner, "temperature", "a finite number > 0", self.temperature)
        for field in ("weight_decay", "kl_weight", "ce_weight", "hidden_weight"):
            check_range(owner, field, getattr(self, field), 0.0, 1e6)
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            fail(owner, "max_grad_norm", "None or a finite number > 0", self.max_grad_norm)
        for field in ("top_k", "chunk_size"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                fail(owner, field, "None or an integer >= 1", getattr(self, field))
        if self.top_k is not None and self.chunk_size is not None:
            fail(owner, "chunk_size", "None when top_k is given (top_k bounds the memory itself)", self.chunk_size)
        pairs(self.hidden_layers, owner)
        if not (self.kl_weight > 0 or self.ce_weight > 0 or (self.hidden_weight > 0 and self.hidden_layers)):
            fail(owner, "kl_weight", "> 0, or ce_weight > 0, or hidden_weight > 0 with hidden_layers (nothing to train on)", self.kl_weight)
        if self.teacher_device is not None:
            try:
                torch.device(self.teacher_device)
            except (RuntimeError, TypeError):
                fail(owner, "teacher_device", "None or a torch device", self.teacher_device)
        if self.data is not None and (isinstance(self.data, (str, bytes, torch.Tensor, Mapping)) or not hasattr(self.data, "__iter__")):
            fail(owner, "data", "None or a sequence (or iterable) of batches", type(self.data).__name__)

    # -- the pass ------------------------------------------------------------------------------
    def _teacher(self, ctx: Context) -> tuple[nn.Module | None, str]:
        if "original" not in self.requires:
            return None, "none (cross-entropy only)"
        if ctx.teacher is not None:
            teacher, where = ctx.teacher, "ctx.teacher"
        elif ctx.original is not None:
            teacher, where = ctx.original, "the model before the first pass (kept by the manager)"
            if self.teacher_device is not None:
                teacher.to(self.teacher_device)  # the manager's own copy, dropped after apply
        else:
            raise ConfigError(
                f"{self.label}: no teacher: run it through a PassManager or compress_ (which keep the model as it was "
                "before the first pass) or give teacher=..."
            )
        device, dtype = placement(teacher)
        size = sum(p.numel() * p.element_size() for p in teacher.parameters())
        return teacher, f"{where} on {device}, {str(dtype).replace('torch.', '')}, {size / 2**20:.1f} MiB"

    def _trainable(self, model: nn.Module, ctx: Context) -> tuple[list[nn.Parameter], int]:
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        chosen = self.select(model)
        for name, module in chosen:
            with ctx.working_on(name, module):  # journals the module: training edits it in place
                for p in module.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        if not params:
            raise ConfigError(f"{self.label}: the targets hold no trainable parameter (targets {self.targets})")
        saved = {id(t) for _, m in chosen for t in m.buffers()}
        for name, module in model.named_modules():
            # train mode updates statistics (BatchNorm) outside the targets too: journal them
            if any(b.is_floating_point() and id(b) not in saved for b in module.buffers(recurse=False)):
                with ctx.working_on(name, module):
                    saved.update(id(b) for b in module.buffers())
        return params, len(chosen)

    def _batch(self, batch: Any, model: nn.Module, teacher: nn.Module | None, device: torch.device) -> Any:
        batch = place(batch, device)
        if isinstance(batch, Mapping):
            if self.ce_weight > 0:
                batch = with_labels(batch)
            if all(hasattr(getattr(m, "config", None), "use_cache") for m in (model, teacher) if m is not None):
                batch = {**batch, "use_cache": False}  # no KV cache while training
        return batch

    def apply(self, model: nn.Module, ctx: Context) -> Report:
        """Train the targets towards the teacher for ``steps`` optimizer steps."""
        started = time.perf_counter()
        teacher, where = self._teacher(ctx)
        data = self.data if self.data is not None else ctx.calibration
        before = module_stats(model)
        params, modules = self._trainable(model, ctx)
        distiller = Distiller(
            model, teacher, temperature=self.temperature, top_k=self.top_k, chunk_size=self.chunk_size,
            hidden_layers=self.hidden_layers, hidden_loss=self.hidden_loss, project=self.project,
            weights={"kl": self.kl_weight, "ce": self.ce_weight, "hidden": self.hidden_weight},
            forward=ctx.forward, name=self.label,
        )
        device = placement(model)[0]
        distiller.to(device)
        optimizer = make_optimizer(self.optimizer, [*params, *distiller.parameters()], lr=self.lr, weight_decay=self.weight_decay)
        stepper = PassManager(ctx.applied, name="earlier passes") if ctx.applied else None
        stream = (self._batch(b, model, teacher, device) for b in batch_stream(data, batch_size=self.batch_size, seed=ctx.seed, owner=self.label))
        probe = [next(stream) for _ in range(self.accumulate)]  # the first step's batches; also scored before and after
        first_step = ctx.step
        try:
            with self._training(model, params, optimizer):
                start_parts = self._score(distiller, probe)
                last: dict[str, float] = {}
                bar = ctx.progress_bar(range(self.steps), desc=self.label, total=self.steps)
                for step in bar:
                    micro = probe if step == 0 else [next(stream) for _ in range(self.accumulate)]
                    last = self._step(distiller, optimizer, params, micro, step)
                    if stepper is not None:
                        stepper.step(model, ctx)  # advances ctx.step
                    else:
                        ctx.step += 1
                    postfix = getattr(bar, "set_postfix", None)
                    if callable(postfix):
                        postfix({k: f"{v:.4g}" for k, v in last.items()}, refresh=False)
                end_parts = self._score(distiller, probe)
        except BaseException:
            ctx.step = first_step  # the manager rolls the model back; the step count goes with it
            raise
        seconds = time.perf_counter() - started
        info = {
            "steps": self.steps, "loss_start": start_parts, "loss_end": end_parts, "loss_last_step": last,
            "teacher": where, "trained_params": sum(p.numel() for p in params), "trained_modules": modules,
            "ctx_steps": ctx.step - first_step,
        }
        row = self.row("", model, before, started=started, **info)
        fmt = lambda parts: ", ".join(f"{k} {v:.4g}" for k, v in parts.items())  # noqa: E731
        notes = [
            f"trained {info['trained_params']:,} parameters of {modules} module(s): {self.steps} steps of {self.accumulate} x "
            f"{self.batch_size} batch(es), {self.optimizer} lr {self.lr:g} ({self.lr_schedule}, warm-up {self.warmup}), {seconds:.1f} s",
            f"loss on the first step's batches: start {fmt(start_parts)}; end {fmt(end_parts)}",
            f"teacher: {where}",
        ]
        if stepper is not None:
            notes.append(f"stepped after each optimizer step: {', '.join(pass_name(p) for p in stepper.passes)}")
        return self.report([row], notes=tuple(notes))

    @contextlib.contextmanager
    def _training(self, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> Iterator[None]:
        # freeze what is not trained, train mode; everything restored however the loop ends
        trained = {id(p) for p in params}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
        was = model.training
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            optimizer.zero_grad(set_to_none=True)
            for p in frozen:
                p.requires_grad_(True)
            model.train(was)

    def _score(self, distiller: Distiller, batches: Sequence[Any]) -> dict[str, float]:
        model = distiller.student
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                scored = [self._parts(*distiller(b)) for b in batches]
        finally:
            model.train(was)
        return mean_parts(scored)

    @staticmethod
    def _parts(loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"total": loss.detach(), **parts}

    def _step(self, distiller: Distiller, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], micro: list[Any], step: int) -> dict[str, float]:
        distiller.student.train()
        for group in optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(step, steps=self.steps, warmup=self.warmup, schedule=self.lr_schedule)
        optimizer.zero_grad(set_to_none=True)
        seen = []
        for batch in micro:
            loss, parts = distiller(batch)
            if not torch.isfinite(loss):
                raise ConfigError(f"{self.label}: the loss became {float(loss)} at step {step}; lower lr (got {self.lr:g}) or temperature")
            (loss / len(micro)).backward()
            seen.append(self._parts(loss, parts))
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([*params, *distiller.parameters()], self.max_grad_norm)
        optimizer.step()
        return mean_parts(seen)
