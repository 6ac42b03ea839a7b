"""What the pretraining and fine-tuning loops share: seeding, device, precision, stopping."""

from __future__ import annotations

import os
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from coral_core.device import OutOfMemoryError, free_host_memory, mixed_precision, resolve_device
from coral_core.errors import UserError
from coral_core.resume import ResumeState

__all__ = ["StepCallback", "TrainingRun", "History", "is_out_of_memory", "accumulate", "trains_in_bf16"]


def trains_in_bf16(device: torch.device, amp: bool, levers=None) -> bool:
    """Whether a run autocasts to bf16: with ``amp``, on CUDA, and on the CPU where the levers'
    ``cpu_bf16`` says so."""
    return amp and (device.type == "cuda" or (levers is not None and levers.cpu_bf16_on(device)))


def check_optimiser_settings(lr: float, weight_decay: float, lr_option: str = "--lr") -> None:
    """A learning rate above 0 and at most 1 (AdamW's steps would move every weight by more than a unit) and a
    weight decay of 0 or more, finite, or one clear sentence."""
    if not (np.isfinite(lr) and 0 < lr <= 1):
        raise UserError(f"{lr_option} {lr:g}: the learning rate must be a number above 0 and at most 1, e.g. 3e-3")
    if not (np.isfinite(weight_decay) and weight_decay >= 0):
        raise UserError(f"weight decay {weight_decay:g}: must be a number of 0 or more")


class StepCallback(Protocol):
    def __call__(self, step: int, total: int, metrics: dict[str, float]) -> None: ...


@dataclass
class History:
    """Per-step metrics of a run, and whether it was stopped before the end."""

    steps: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    stopped: bool = False

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append(v)

    def last(self, key: str) -> float:
        return self.metrics[key][-1] if self.metrics.get(key) else float("nan")


class TrainingRun:
    """Seeds every generator, resolves the device, and wraps the step loop's bookkeeping."""

    def __init__(
        self,
        seed: int,
        device: str,
        amp: bool,
        callback: StepCallback | Callable | None,
        stop_event: threading.Event | None,
        resume: ResumeState | None = None,
        saver: bool = True,
        levers=None,
    ) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # one GPU per process under torchrun; the current device otherwise
            local = os.environ.get("LOCAL_RANK")
            self.device = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cpu_generator = torch.Generator().manual_seed(seed)
        self.amp = trains_in_bf16(self.device, amp, levers)
        self.callback = callback
        self.stop_event = stop_event
        self.history = History()
        self.resume = resume
        self.saver = saver  # under DDP only rank 0 writes the resume file
        self._tracked: tuple | None = None
        self.micro_batch: int | None = None  # set after an out-of-memory error halves the batch

    def autocast(self):
        return mixed_precision(self.device, self.amp)

    def should_stop(self, all_processes: bool = False) -> bool:
        """Whether to stop before the next step; with ``all_processes`` (DDP) every process
        stops at the same step when any of them was asked to."""
        stop = self.stop_event is not None and self.stop_event.is_set()
        if all_processes:
            from coral_core.distributed import all_reduce_sum

            stop = bool(all_reduce_sum(torch.tensor([float(stop)], device=self.device)).item() > 0)
        if stop:
            self.history.stopped = True
        return stop

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.history.add(step, metrics)
        if self.callback is not None:
            self.callback(step, total, metrics)

    # ----------------------------------------------------------------- resume files

    def track(self, modules: dict[str, torch.nn.Module], optimiser, scheduler,
              generators: dict[str, torch.Generator] | None = None) -> None:
        """What a resume file saves and restores (``generators``: any beside the run's own)."""
        self._tracked = (modules, optimiser, scheduler,
                         {"device": self.generator, "cpu": self.cpu_generator, **(generators or {})})

    def restore(self) -> tuple[int, dict, dict[str, torch.Tensor]] | None:
        """Load the resume file if there is one: (step, extra, tensors), else None."""
        if self.resume is None or not self.resume.exists():
            return None
        step, extra, tensors = self.resume.load(*self._tracked)
        self.micro_batch = extra.get("micro_batch")
        return step, extra, tensors

    def save(self, step: int, extra: dict | None = None, tensors: dict | None = None, force: bool = False) -> None:
        """Write the resume file when forced or every ``resume.every`` steps."""
        if self.resume is None or not self.saver:
            return
        if force or (self.resume.every and step % self.resume.every == 0):
            extra = dict(extra or {}, micro_batch=self.micro_batch)
            self.resume.save(step, *self._tracked, extra=extra, tensors=tensors)


# Bytes of activations one image keeps for the backward pass, per base filter and per pixel, when this
# U-Net (depth 4) trains in float32 on the CPU: 29-36 from the peak memory of `coral pretrain` at two
# batch sizes (16 and 48 filters, 128 to 512 pixels; bf16 about 19; docs/reliability.md). 40 leaves a margin.
ACTIVATION_BYTES = 40


def training_bytes_per_image(model_config) -> int:
    """About how much memory one image needs in a training step of a model of ``model_config``."""
    return ACTIVATION_BYTES * model_config.base_filters * model_config.image_size**2


def free_memory() -> int:
    """Memory the system can give this process now (a seam for tests)."""
    return free_host_memory()


def fit_cpu_batch(run: "TrainingRun", n: int, item_bytes: int, item: str = "slice", note: str = "",
                  distributed: bool = False) -> None:
    """On the CPU, plan the step's pieces so that it fits in half the free memory.

    A GPU raises an error when it runs out of memory, which :func:`accumulate` answers by halving
    its pieces; on the CPU the system kills the process instead, losing the run. So before the
    first step, a step of ``n`` items of about ``item_bytes`` each that would take more than half
    the free memory goes in halved pieces from the start (as after a GPU's error, with the same
    warning), and one that would not fit even one item at a time is refused in one sentence.
    """
    if run.device.type != "cpu" or run.micro_batch is not None:  # a resumed run keeps its pieces
        return
    budget = free_memory() // 2
    size = n
    while size > 1 and size * item_bytes > budget:
        size = (size + 1) // 2
    gib = 1 << 30
    if size * item_bytes > budget:
        raise UserError(
            f"training needs about {item_bytes / gib:.1f} GiB for a single {item}{note}, more than half of this machine's "
            f"free memory ({2 * budget / gib:.1f} GiB); use a smaller --image-size or --base-filters"
        )
    if size < n:
        if distributed:
            raise UserError(
                f"a step of {n} {item}s{note} per process needs about {n * item_bytes / gib:.1f} GiB, more than half of "
                f"this machine's free memory ({2 * budget / gib:.1f} GiB); lower --batch-size"
            )
        run.micro_batch = size
        print(f"warning: a step of {n} {item}s{note} needs about {n * item_bytes / gib:.1f} GiB, more than half of the "
              f"free memory ({2 * budget / gib:.1f} GiB); continuing with batches of {size}", file=sys.stderr)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device out-of-memory error (CUDA or MPS), which a smaller batch can avoid."""
    return isinstance(exc, OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "mps" in str(exc).lower()
    )


def accumulate(
    run: TrainingRun,
    optimiser: torch.optim.Optimizer,
    n: int,
    step_loss: Callable[[slice, float], dict[str, torch.Tensor]],
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """Zero the gradients and run one step's forward and backward passes over ``n`` samples.

    ``step_loss(part, weight)`` computes the losses of the samples ``part``, calls backward on
    ``weight * losses["loss"]`` and returns the detached losses. The whole batch goes in one
    piece until the device runs out of memory; then the piece size halves (for the rest of the
    run) and the pieces' gradients add up, so the step still covers every sample. (For the
    contrastive losses a piece is a smaller batch: fewer negatives per anchor.)

    With ``distributed`` (one of several DDP processes) out of memory is an error instead: the
    processes must run the same collective operations, and one that halved alone would hang the rest.
    """
    while True:
        size = min(run.micro_batch or n, n)
        optimiser.zero_grad(set_to_none=True)
        try:
            totals: dict[str, torch.Tensor] = {}
            for start in range(0, n, size):
                part = slice(start, min(start + size, n))
                weight = (part.stop - part.start) / n
                for key, value in step_loss(part, weight).items():
                    totals[key] = totals.get(key, 0.0) + weight * value
            return totals
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if distributed:
                raise UserError(
                    f"the {run.device.type} device ran out of memory with {n} samples per process; "
                    "lower --batch-size or run more processes"
                ) from None
            if size <= 1:
                raise UserError(
                    f"the {run.device.type} device ran out of memory even for one sample; "
                    "use a smaller --image-size or --base-filters, or --device cpu"
                ) from None
            run.micro_batch = max(1, size // 2)
            print(f"warning: out of memory on {run.device}; continuing with batches of {run.micro_batch}", file=sys.stderr)
        _free_device_memory(run.device)  # outside the except block, so the failed pass's tensors are gone


def _free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
