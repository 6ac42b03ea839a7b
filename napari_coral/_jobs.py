"""Training jobs that run off the GUI thread: in a child process (default) or a thread.

A job runs a coral_core trainer and streams messages through a queue:
``("progress", step, total, metrics)``, then ``("done", checkpoint_path, stopped)`` or
``("error", sentence)``. Inputs travel as files (a checkpoint and an .npz), so a child
process needs nothing pickled but paths and plain settings. A crash in a child process
cannot take napari down: the parent sees the process gone without "done" and reports it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import threading
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from coral_core.errors import UserError


def _finetune(spec: dict, messages, stop) -> None:
    from coral_core.checkpoint import load_checkpoint, save_checkpoint
    from coral_core.finetune import FinetuneConfig, finetune

    model, _ = load_checkpoint(spec["model"])
    data = np.load(spec["data"])
    slices = [int(i) for i in data["slices"]]
    validation = None
    if data["val_slices"].size:
        validation = ([data["image"]], [data["labels"]], [[int(i) for i in data["val_slices"]]])
    cfg = FinetuneConfig(**spec["config"])
    result = finetune(
        cfg, model, [data["image"]], [data["labels"]], [slices],
        callback=lambda s, t, m: messages.put(("progress", s, t, m)), stop_event=stop, validation=validation,
    )
    save_checkpoint(spec["out"], result.model, {**spec.get("training", {}), "steps_done": len(result.history.steps)})
    messages.put(("done", spec["out"], result.history.stopped))


def _pretrain(spec: dict, messages, stop) -> None:
    from coral_core.checkpoint import save_checkpoint
    from coral_core.model import UNetConfig
    from coral_core.pretrain import PretrainConfig, pretrain

    data = np.load(spec["data"])
    volumes = [data[k] for k in sorted(data.files)]
    settings = dict(spec["config"])
    settings["model"] = UNetConfig(**settings["model"])
    result = pretrain(PretrainConfig(**settings), volumes, lambda s, t, m: messages.put(("progress", s, t, m)), stop)
    save_checkpoint(spec["out"], result.model, {**spec.get("training", {}), "steps_done": len(result.history.steps)})
    messages.put(("done", spec["out"], result.history.stopped))


JOBS = {"finetune": _finetune, "pretrain": _pretrain}


def _run(kind: str, spec: dict, messages, stop) -> None:
    try:
        JOBS[kind](spec, messages, stop)
    except UserError as exc:
        messages.put(("error", str(exc)))
    except Exception as exc:  # reported to the user; the traceback goes to the log
        traceback.print_exc()
        messages.put(("error", f"training failed: {type(exc).__name__}: {exc}"))


class Job:
    """A running training job; ``poll()`` returns the messages that arrived since last time."""

    def __init__(self, kind: str, spec: dict, mode: str = "process") -> None:
        if mode == "process":
            ctx = mp.get_context("spawn")
            self._messages, self._stop = ctx.Queue(), ctx.Event()
            self._worker = ctx.Process(target=_run, args=(kind, spec, self._messages, self._stop), daemon=True)
        else:
            self._messages, self._stop = queue_module.Queue(), threading.Event()
            self._worker = threading.Thread(target=_run, args=(kind, spec, self._messages, self._stop), daemon=True)
        self.mode = mode
        self.finished = False

    def start(self) -> "Job":
        self._worker.start()
        return self

    def cancel(self) -> None:
        self._stop.set()

    def poll(self) -> list[tuple]:
        out = []
        while True:
            try:
                out.append(self._messages.get_nowait())
            except queue_module.Empty:
                break
        if any(m[0] in ("done", "error") for m in out):
            self.finished = True
        elif not self.finished and not self._worker.is_alive():
            # The worker is gone: give the queue a moment for a last message, then call it a crash.
            try:
                out.append(self._messages.get(timeout=1.0))
            except queue_module.Empty:
                code = getattr(self._worker, "exitcode", None)
                out.append(("error", f"the training process stopped unexpectedly (exit code {code}); the previous model is kept"))
            self.finished = True
        return out

    def join(self, timeout: float | None = None) -> None:
        self._worker.join(timeout)


def write_inputs(folder: Path, **arrays) -> Path:
    """Save the arrays a job needs as one .npz in ``folder``."""
    path = folder / "inputs.npz"
    np.savez(path, **arrays)
    return path


def config_dict(config) -> dict:
    """A dataclass config as plain values for a job spec."""
    return asdict(config)
