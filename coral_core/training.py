"""What the pretraining and fine-tuning loops share: seeding, device, precision, stopping."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from coral_core.device import mixed_precision, resolve_device

__all__ = ["StepCallback", "TrainingRun", "History"]


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
    ) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.device = resolve_device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cpu_generator = torch.Generator().manual_seed(seed)
        self.amp = amp and self.device.type == "cuda"
        self.callback = callback
        self.stop_event = stop_event
        self.history = History()

    def autocast(self):
        return mixed_precision(self.device, self.amp)

    def should_stop(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            self.history.stopped = True
            return True
        return False

    def report(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.history.add(step, metrics)
        if self.callback is not None:
            self.callback(step, total, metrics)
