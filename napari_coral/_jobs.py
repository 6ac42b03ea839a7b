"""Training jobs that run off the GUI thread: in a child process (default) or a thread.

A job runs a coral_core trainer and streams messages:
``("progress", step, total, metrics)``, then ``("done", checkpoint_path, stopped)`` or
``("error", sentence)``. Inputs travel as files (a checkpoint, an .npz and a JSON spec).
The child is a plain ``python -m napari_coral._jobs`` process rather than a
multiprocessing one, whose "spawn" start would re-import the user's ``__main__`` (a
script that opened napari without a main guard would run again). A crash in the child
cannot take napari down: the parent sees its output end without "done" and says so.
"""

from __future__ import annotations

import json
import os
import queue as queue_module
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import numpy as np

from coral_core.errors import UserError, naming


def _finetune(spec: dict, messages, stop) -> None:
    from coral_core.checkpoint import load_checkpoint, save_checkpoint
    from coral_core.finetune import FinetuneConfig, finetune
    from coral_core.resume import ResumeState

    model, _ = load_checkpoint(spec["model"])
    data = np.load(spec["data"])
    arrays = {k: data[k] for k in sorted(data.files)}
    slices = [int(i) for i in arrays["slices"]]
    # Progress kept every 50 steps and when stopped: the same start model, annotations and settings
    # continue it (the file's name hashes all of them, here in the job, not on napari's thread).
    resume = None
    if spec.get("resume_folder"):
        weights = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        config = spec["config"] | ({"spacings": spec["spacings"]} if spec.get("spacings") else {})
        path, fingerprint = resume_file("finetune", config, arrays | weights, Path(spec["resume_folder"]))
        resume = ResumeState(path, fingerprint, every=50)
    cfg = FinetuneConfig(**spec["config"])  # nested dicts become their dataclasses
    # other annotated scans, when the user added some, come as image_1, labels_1, slices_1, ...
    extra = range(1, 1 + sum(name.startswith("image_") for name in arrays))
    images = [arrays["image"], *(arrays[f"image_{k}"] for k in extra)]
    labels = [arrays["labels"], *(arrays[f"labels_{k}"] for k in extra)]
    annotated = [slices, *([int(i) for i in arrays[f"slices_{k}"]] for k in extra)]
    # and images without labels for the embedding loss, when asked for: unlabelled_0, unlabelled_1, ...
    unlabelled = [arrays[f"unlabelled_{k}"] for k in range(sum(name.startswith("unlabelled_") for name in arrays))]
    if spec.get("spacings"):  # a model with a physical scale trains on a square of each scan it sees
        from coral_core.data import field_of_view

        windows = [field_of_view(model.config, image.shape, spacing).around(lab)  # where it holds the most paint
                   for image, lab, spacing in zip(images, labels, spec["spacings"])]
        images = [fov.crop(image) for fov, image in zip(windows, images)]
        labels = [fov.crop(lab, 0) for fov, lab in zip(windows, labels)]
        unlabelled = [field_of_view(model.config, image.shape, spacing).crop(image)
                      for image, spacing in zip(unlabelled, spec["unlabelled_spacings"])]
    validation = None
    if arrays["val_slices"].size:
        validation = ([images[0]], [labels[0]], [[int(i) for i in arrays["val_slices"]]])
    result = finetune(
        cfg, model, images, labels, annotated, unlabelled=unlabelled or None,
        callback=lambda s, t, m: messages.put(("progress", s, t, m)), stop_event=stop, validation=validation,
        resume=resume,
    )
    save_checkpoint(spec["out"], result.model, {**spec.get("training", {}), "steps_done": len(result.history.steps)})
    if resume is not None and not result.history.stopped:
        resume.remove()
    messages.put(("done", spec["out"], result.history.stopped))


def _pretrain(spec: dict, messages, stop) -> None:
    from coral_core.checkpoint import save_checkpoint
    from coral_core.data import field_of_view
    from coral_core.pretrain import PretrainConfig, pretrain
    from coral_core.resume import ResumeState

    data = np.load(spec["data"])
    arrays = {k: data[k] for k in sorted(data.files)}
    cfg = PretrainConfig(**spec["config"])
    spacings = spec.get("spacings") or {}  # a model with a physical scale pretrains on the square of each it sees
    volumes = []
    layers = dict(zip(arrays, spec.get("training", {}).get("volumes", [])))  # v0000, ...: the layers' names in order
    for name, v in arrays.items():
        with naming(layers.get(name, name)):  # an image the model's physical scale cannot see at its spacing
            volumes += [frame if name not in spacings else field_of_view(cfg.model, frame.shape, spacings[name]).crop(
                frame) for frame in (v if v.ndim == 4 else [v])]  # a cine: each frame
    # progress kept at every epoch's end and when stopped; a later job with the same images and
    # settings continues from it. Its name hashes every voxel (about 1 s per GB): done here, in the
    # job, not on napari's GUI thread.
    resume = None
    if spec.get("resume_folder"):
        config = spec["config"] | ({"spacings": spacings} if spacings else {})
        path, fingerprint = resume_file("pretrain", config, arrays, Path(spec["resume_folder"]))
        resume = ResumeState(path, fingerprint)
    result = pretrain(cfg, volumes, lambda s, t, m: messages.put(("progress", s, t, m)), stop,
                      resume=resume)
    save_checkpoint(spec["out"], result.model, {**spec.get("training", {}), "steps_done": len(result.history.steps),
                                                "slices": sum(v.shape[0] for v in volumes)})
    if resume is not None and not result.history.stopped:
        resume.remove()
    messages.put(("done", spec["out"], result.history.stopped))


def resume_folder() -> Path:
    """Where the plugin's pretraining jobs keep their progress: ``data_home()/resume``."""
    from napari_coral._session import data_home

    folder = data_home() / "resume"
    folder.mkdir(exist_ok=True)
    return folder


def stopped_runs() -> list[Path]:
    """The progress files that stopped pretraining and fine-tuning jobs left in :func:`resume_folder`
    (without creating it)."""
    from napari_coral._session import data_home

    folder = data_home() / "resume"
    return sorted([*folder.glob("pretrain-*.resume.safetensors"), *folder.glob("finetune-*.resume.safetensors")])


def resume_file(kind: str, config: dict, arrays: dict[str, np.ndarray], folder: Path | None = None) -> tuple[Path, dict]:
    """Where a ``kind`` ("pretrain", "finetune") job with ``config`` on ``arrays`` keeps its
    progress, and the fingerprint its resume file must carry: both from a hash of the settings
    and of every value of every array, so a job continues only what was stopped with the very
    same inputs and settings. The file is in ``folder`` (default :func:`resume_folder`) and is
    removed when the job finishes."""
    import hashlib

    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}{array.shape}{array.dtype.str}".encode())
        digest.update(memoryview(array).cast("B"))
    key = digest.hexdigest()[:20]
    folder = folder if folder is not None else resume_folder()
    return folder / f"{kind}-{key}.resume.safetensors", {"job": kind, "key": key}


JOBS = {"finetune": _finetune, "pretrain": _pretrain}
MESSAGE_PREFIX = "@coral "


def _run(kind: str, spec: dict, messages, stop) -> None:
    try:
        JOBS[kind](spec, messages, stop)
    except UserError as exc:
        messages.put(("error", str(exc)))
    except Exception as exc:  # reported to the user; the traceback goes to the log
        traceback.print_exc()
        messages.put(("error", f"training failed: {type(exc).__name__}: {exc}"))


class _StdoutMessages:
    """The child's side of the pipe: one JSON message per line on stdout."""

    def put(self, message: tuple) -> None:
        sys.stdout.write(MESSAGE_PREFIX + json.dumps(message) + "\n")
        sys.stdout.flush()


def child_environment(environ=None) -> dict:
    """The environment of a job's child process: the parent's, with OpenMP's threads waiting passively (unless
    the user set ``OMP_WAIT_POLICY``). The child shares the CPU with napari and with any other job, and libgomp's
    threads spin before they sleep: beside two busy processes on 2 cores a fine-tuning took 1.8 times as long with
    them as with passive threads, which cost 11% on the idle machine (docs/performance.md, "OpenMP threads beside
    other work")."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def child_main(argv: list[str]) -> int:
    """Entry point of the child process: ``python -m napari_coral._jobs SPEC.json``.

    A line "stop" on stdin, or stdin closing (napari went away), stops training after the
    current step.
    """
    spec = json.loads(Path(argv[0]).read_text())
    if hasattr(os, "nice"):
        os.nice(10)  # yield the CPU to napari when both want it; full speed when napari is idle
    stop = threading.Event()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    _run(spec["kind"], spec, _StdoutMessages(), stop)
    return 0


class Job:
    """A running training job; ``poll()`` returns, without blocking, the messages so far.

    ``mode="process"`` runs ``python -m napari_coral._jobs`` as a child process (a crash
    there cannot take napari down, and the GUI thread never competes with it for the GIL);
    ``mode="thread"`` runs the same code in a thread of this process.

    ``inputs``, (folder, arrays): the arrays the job reads, written to ``folder/inputs.npz``
    (the spec's "data") by the job's own thread before the training starts, not by the
    caller's: on napari's GUI thread that write took 0.8-2.9 s per GB. An array may be a
    :class:`napari_coral._layers.LayerArray`, a layer's data not read yet (a lazy layer is read
    from disk here too; one that cannot be read ends the job with an error naming the layer), or a
    :class:`napari_coral._layers.SourceFilled`, labels filled from their DICOM file here.
    ``before``: a function the job's thread calls first (the Fine-tune panel saves the annotations with it); a
    UserError it raises ends the job with its sentence.
    """

    def __init__(self, kind: str, spec: dict, mode: str = "process",
                 inputs: tuple[Path, dict[str, np.ndarray]] | None = None, before=None) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        self.kind, self.spec, self.mode = kind, {**spec, "kind": kind}, mode
        self._inputs = inputs[1] if inputs is not None else None
        self._before = before
        if inputs is not None:
            self.spec["data"] = str(Path(inputs[0]) / "inputs.npz")
        self._messages: queue_module.Queue = queue_module.Queue()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.finished = False
        self.log: list[str] = []

    def start(self) -> "Job":
        self._reader = threading.Thread(target=self._work, daemon=True)
        self._reader.start()
        return self

    def _work(self) -> None:
        if self._before is not None:  # even when cancelled at once: what the user made is saved first
            try:
                self._before()
            except UserError as exc:
                self._messages.put(("error", str(exc)))
                return
            finally:
                self._before = None
        if self._inputs is not None:
            try:
                write_inputs(Path(self.spec["data"]).parent, **self._inputs)
            except UserError as exc:  # a layer's data could not be read
                self._messages.put(("error", str(exc)))
                return
            except OSError as exc:
                self._messages.put(("error", f"could not write the training inputs to {self.spec['data']} ({exc}); "
                                             "free some disk space and try again"))
                return
            finally:
                self._inputs = None  # the user's layer data: not held beyond the write
            if self._stop.is_set():  # cancelled while the inputs were written: nothing was trained
                self._messages.put(("done", self.spec["out"], True))
                return
        if self.mode == "thread":
            _run(self.kind, self.spec, self._messages, self._stop)
            return
        spec_path = Path(self.spec["out"]).with_suffix(".job.json")
        spec_path.write_text(json.dumps(self.spec))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "napari_coral._jobs", str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=child_environment(),
        )
        if self._stop.is_set():  # cancelled while the child was starting
            self.cancel()
        self._read_child()

    def _read_child(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(MESSAGE_PREFIX):
                self._messages.put(tuple(json.loads(line[len(MESSAGE_PREFIX):])))
            else:
                self.log.append(line.rstrip())
        self._proc.wait()

    @property
    def alive(self) -> bool:
        """Whether the job's thread is still at work (writing inputs, training, or reading the child)."""
        return self._reader is not None and self._reader.is_alive()

    def cancel(self) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.write("stop\n")
                self._proc.stdin.flush()
            except OSError:  # the child is already gone
                pass

    def poll(self) -> list[tuple]:
        out = []
        while True:
            try:
                out.append(self._messages.get_nowait())
            except queue_module.Empty:
                break
        if any(m[0] in ("done", "error") for m in out):
            self.finished = True
        elif not self.finished and self._reader is not None and not self._reader.is_alive() and self._messages.empty():
            # Everything the worker said has been read and it said neither done nor error.
            code = self._proc.returncode if self._proc is not None else None
            tail = f": {self.log[-1]}" if self.log else ""
            if code == -signal.SIGKILL:  # what the system's out-of-memory killer sends
                why = "was killed by the system, most often for running out of memory; try a smaller model or fewer images"
                out.append(("error", f"the training process {why}; the previous model is kept"))
            else:
                out.append(("error", f"the training process stopped unexpectedly (exit code {code}{tail}); the previous model is kept"))
            self.finished = True
        return out

def write_inputs(folder: Path, **arrays) -> Path:
    """Save the arrays a job needs as one .npz in ``folder``, reading each
    :class:`~napari_coral._layers.LayerArray` first (a UserError names a layer that cannot be read) and filling
    each :class:`~napari_coral._layers.SourceFilled` from its file."""
    from napari_coral._layers import LayerArray, SourceFilled

    path = folder / "inputs.npz"
    np.savez(path, **{k: v.read() if isinstance(v, (LayerArray, SourceFilled)) else v for k, v in arrays.items()})
    return path


def config_dict(config) -> dict:
    """A dataclass config as plain values for a job spec."""
    from coral_core.model import plain_config

    return plain_config(config)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
