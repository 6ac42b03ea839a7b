"""Qt pieces the dock widgets share: layer pickers, device picker, job runner, plot canvas."""

from __future__ import annotations

import weakref

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QLabel, QListWidget, QListWidgetItem, QSizePolicy

from coral_core.device import resolve_device
from napari_coral._jobs import Job


class WorkerError(Exception):
    """A RuntimeError raised in a napari generator worker (torch's errors, out of memory among them), passed on as
    another type: superqt takes a generator's RuntimeError for a sign that its worker was deleted and emits neither
    ``errored`` nor ``finished``, which left the Segment panel at "Segmenting..." with its button greyed out for good.
    Its cause is the error."""


def failure_text(exc: BaseException) -> str:
    """What a panel says of an exception that ended its work: a UserError's sentence; of anything else (torch's
    error, a bug), its type and first line, its traceback printed to napari's log (stderr)."""
    import traceback

    from coral_core.errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    cause = exc.__cause__ if isinstance(exc, WorkerError) and exc.__cause__ is not None else exc
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


def no_volume_text(viewer, otherwise: str) -> str:
    """Why a panel has no image to work on, where images are open but none is a volume (a 3-D image, or a 4-D cine
    series): what each is; else ``otherwise``."""
    from napari.layers import Image

    images = [layer for layer in viewer.layers if isinstance(layer, Image)]
    if not images or any(layer.ndim in (3, 4) and not layer.rgb for layer in images):
        return otherwise
    kinds = ", ".join(f"{layer.name!r} is {'RGB' if layer.rgb else f'{layer.ndim}-D'}" for layer in images[:3])
    more = f" and {len(images) - 3} more" if len(images) > 3 else ""
    return (f"No open image is a 3-D volume or a 4-D cine series ({kinds}{more}); open one (File > Open, or "
            "File > Open Sample > Cardiac phantom).")


def save_model_as(session, path):
    """Write the session's model, with how it was trained, to ``path``; says where in a notification, or why not
    in one sentence (a folder that is missing or not writable, a full disk), and returns the path or None."""
    from napari.utils.notifications import show_error, show_info

    from coral_core.checkpoint import save_checkpoint
    from coral_core.errors import UserError

    try:
        saved = save_checkpoint(path, session.ensure_model(), dict(session.meta.get("training") or {}))
    except (UserError, OSError) as exc:
        show_error(f"The model was not saved: {exc}")
        return None
    show_info(f"Saved the model to {saved}.")
    return saved


def ask_model_path(parent, default: str) -> str:
    """A file name from napari's save dialog for a model, ending in .safetensors when typed without a suffix;
    "" when the dialog is cancelled."""
    from pathlib import Path

    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getSaveFileName(parent, "Save model", default, "Models (*.safetensors)")
    return path + ".safetensors" if path and not Path(path).suffix else path


def drop_job_files(widget) -> None:
    """Remove ``widget._tmp``, the temporary folder of its job's files (a copy of every image the job read, its
    start and result models), once the job has ended and its model is loaded: a large scan's copy would otherwise
    stay in the temporary folder until the next run or until napari closes."""
    if widget._tmp is not None:
        widget._tmp.cleanup()
        widget._tmp = None


def while_alive(widget, method_name: str):
    """A function that calls ``widget.<method_name>(*args)`` while Qt has not deleted the widget (its dock closed),
    and does nothing after, to connect to napari's events in place of the widget's bound method: napari drops a
    deleted widget's bound method when an event reaches it, but napari 0.5.0 raises doing so (it compares the method
    with the event's other callbacks, and comparing a deleted Qt object raises), failing whatever emitted the event
    (adding a layer, say). Holds the widget weakly; napari ignores the same function connected twice."""
    ref = weakref.ref(widget)

    def call(*args):
        target = ref()
        if target is not None and alive(target):
            getattr(target, method_name)(*args)

    return call


def follow_layer_list(viewer, widget) -> None:
    """Call ``widget.refresh`` whenever a layer is added, removed, moved or renamed. napari 0.5.0's layer list has
    no 'renamed' event: there each layer's own name event is followed, by :func:`follow_layer_names`, which
    ``refresh`` calls each time."""
    widget._follow = while_alive(widget, "refresh")
    events = viewer.layers.events
    for name in ("inserted", "removed", "reordered", "renamed"):
        emitter = getattr(events, name, None)
        if emitter is not None:
            emitter.connect(widget._follow)


def follow_layer_names(viewer, widget) -> None:
    """Where the layer list has no 'renamed' event (napari 0.5.0), follow each layer's own name event with
    ``widget.refresh`` (see :func:`follow_layer_list`); again for layers added since."""
    if getattr(viewer.layers.events, "renamed", None) is None:
        for layer in viewer.layers:
            layer.events.name.connect(widget._follow)


class LayerPicker(QComboBox):
    """A combo box of the viewer's 3-D layers of one type (with ``cine``, 4-D (t, z, y, x) ones too),
    kept in step with the layer list: a renamed layer stays chosen under its new name."""

    def __init__(self, viewer, layer_type: str, parent=None, cine: bool = False) -> None:
        super().__init__(parent)
        self.viewer, self.layer_type, self.cine = viewer, layer_type, cine
        self._shown: list = []  # the layers listed, in the combo's order
        follow_layer_list(viewer, self)
        self.refresh()

    def layers(self):
        from napari import layers

        kind = {"image": layers.Image, "labels": layers.Labels}[self.layer_type]
        dims = (3, 4) if self.cine else (3,)
        return [layer for layer in self.viewer.layers if isinstance(layer, kind) and layer.ndim in dims
                and not getattr(layer, "rgb", False)]

    def refresh(self, *_):
        follow_layer_names(self.viewer, self)
        index = self.currentIndex()
        current = self._shown[index] if 0 <= index < len(self._shown) else None
        self.blockSignals(True)
        self.clear()
        self._shown = self.layers()
        self.addItems([layer.name for layer in self._shown])
        if any(layer is current for layer in self._shown):
            self.setCurrentIndex(next(i for i, layer in enumerate(self._shown) if layer is current))
        self.blockSignals(False)
        self.currentTextChanged.emit(self.currentText())

    def layer(self):
        name = self.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None


class VolumeChecklist(QListWidget):
    """The viewer's 3-D image layers as a checkable list (new layers start checked); with ``cine``,
    4-D (t, z, y, x) image layers too, each frame of which is a volume (pretraining). ``changed`` is
    emitted when the checked layers may have changed: a check toggled, or the layer list."""

    changed = Signal()

    def __init__(self, viewer, parent=None, cine: bool = False) -> None:
        super().__init__(parent)
        self.viewer, self.cine = viewer, cine
        self.setMaximumHeight(85)
        self._shown: list = []  # the layers listed, in the list's order
        follow_layer_list(viewer, self)
        self.itemChanged.connect(lambda *_: self.changed.emit())
        self.refresh()

    def refresh(self, *_):
        from napari.layers import Image

        follow_layer_names(self.viewer, self)
        before = [(layer, self.item(i).checkState()) for i, layer in enumerate(self._shown) if i < self.count()]
        self.clear()
        self._shown = []
        for layer in self.viewer.layers:
            if isinstance(layer, Image) and not layer.rgb and (layer.ndim == 3 or (self.cine and layer.ndim == 4)):
                item = QListWidgetItem(layer.name)
                if layer.ndim == 4:
                    item.setToolTip(f"a series of {layer.data.shape[0]} frames: each frame is a volume")
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                # a layer keeps its check when moved or renamed; a new one starts checked
                item.setCheckState(next((state for old, state in before if old is layer), Qt.CheckState.Checked))
                self.addItem(item)
                self._shown.append(layer)
        self.changed.emit()

    def checked(self) -> list[str]:
        return [self.item(i).text() for i in range(self.count()) if self.item(i).checkState() == Qt.CheckState.Checked]

    def checked_slices(self) -> int:
        """The 2-D slices of the checked layers, every frame's of a cine series."""
        from napari_coral._layers import full_resolution

        return sum(int(np.prod(full_resolution(layer).shape[:-2])) for i, layer in enumerate(self._shown)
                   if i < self.count() and self.item(i).checkState() == Qt.CheckState.Checked)


class DevicePicker(QComboBox):
    """auto (CUDA, then MPS, then CPU) or a named device; a device this computer lacks is greyed out."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.addItems(["auto", "cpu", "cuda", "mps"])
        self.setToolTip(f"auto uses {resolve_device('auto').type} on this machine")
        for i in range(self.count()):
            if not _available(self.itemText(i)):
                item = self.model().item(i)
                item.setEnabled(False)
                item.setToolTip("not available on this computer")

    def device(self):
        """The chosen torch device; a UserError in one sentence when this computer lacks it."""
        from coral_core.errors import UserError

        try:
            return resolve_device(self.currentText())
        except UserError:  # resolve_device words it for the command line (--device ...)
            name = self.currentText()
            raise UserError(f"Device {name}: not available on this computer; choose auto or cpu.") from None

    def device_or_none(self, status):
        """:meth:`device`, or None with the reason in a notification and in the ``status`` label."""
        from napari.utils.notifications import show_error

        from coral_core.errors import UserError

        try:
            return self.device()
        except UserError as exc:
            show_error(str(exc))
            status.setText(str(exc))
            return None


def _available(name: str) -> bool:
    from coral_core.errors import UserError

    try:
        resolve_device(name)
    except UserError:
        return False
    return True


class JobRunner(QObject):
    """Polls a background :class:`Job` from the Qt event loop and re-emits its messages."""

    progressed = Signal(int, int, dict)
    finished = Signal(str, bool)
    failed = Signal(str)

    def __init__(self, job: Job, description: str, parent=None) -> None:
        super().__init__(parent)
        from napari.utils import progress

        self.job = job
        self._bar = progress(total=0, desc=description)
        self._timer = QTimer(self)
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)

    def start(self) -> "JobRunner":
        self.job.start()
        self._timer.start()
        _RUNNERS.add(self)
        job_events().changed.emit()
        return self

    def cancel(self) -> None:
        self.job.cancel()

    @property
    def running(self) -> bool:
        try:
            return self._timer.isActive()
        except RuntimeError:  # Qt deleted the timer with its dock; the job itself may still be at work
            return self.job.alive

    def _poll(self) -> None:
        messages = self.job.poll()
        progress_msgs = [m for m in messages if m[0] == "progress"]
        if progress_msgs:
            _, step, total, metrics = progress_msgs[-1]
            if self._bar.total != total:
                self._bar.total = total
            self._bar.update(step - self._bar.n)
            for _, s, t, m in progress_msgs:
                self.progressed.emit(s, t, m)
        for message in messages:
            if message[0] == "done":
                self._stop()
                self.finished.emit(message[1], bool(message[2]))
                job_events().changed.emit()
            elif message[0] == "error":
                self._stop()
                self.failed.emit(message[1])
                job_events().changed.emit()

    def _stop(self) -> None:
        self._timer.stop()
        self._bar.close()


_RUNNERS: "weakref.WeakSet[JobRunner]" = weakref.WeakSet()  # every runner started in this process


class _JobEvents(QObject):
    """Tells every dock, in any viewer of this process, that a training job started or ended."""

    changed = Signal()


_JOB_EVENTS: list[_JobEvents] = []


def job_events() -> _JobEvents:
    """The process's one :class:`_JobEvents` (made on first use, once Qt is up)."""
    if not _JOB_EVENTS:
        _JOB_EVENTS.append(_JobEvents())
    return _JOB_EVENTS[0]


def on_job_events(widget, method_name: str) -> None:
    """Call ``widget.<method_name>()`` whenever a training job starts or ends, for as long as the widget
    lives (held weakly: a closed dock is let go and disconnected)."""
    ref = weakref.ref(widget)
    events = job_events()

    def call() -> None:
        target = ref()
        if target is None or not alive(target):
            events.changed.disconnect(call)
            return
        getattr(target, method_name)()

    events.changed.connect(call)


def any_job_running() -> bool:
    """Whether a training job of any dock, in any viewer of this process, is running (they share
    the resume folder)."""
    return any(runner.running for runner in list(_RUNNERS))


def alive(widget) -> bool:
    """False once Qt has deleted the widget (its dock was closed): late callbacks skip it."""
    try:
        widget.isVisible()
    except RuntimeError:
        return False
    return True


def status_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    return label


class PlotCanvas:
    """A small matplotlib figure embedded in Qt.

    Margins are fixed once: a layout engine re-running on every draw costs ~100 ms on a
    busy CPU, which the viewer would feel as a pause.
    """

    def __init__(self, height: float = 2.4, hint: str = "") -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, height))
        self.figure.subplots_adjust(left=0.14, right=0.97, bottom=0.2, top=0.88)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(int(height * 70))
        self.ax = self.figure.add_subplot(1, 1, 1)
        # Until there is something to plot, say what will be plotted instead of showing empty 0-1 axes.
        self.hint = None
        if hint:
            self.ax.set_xticks([])
            self.ax.set_yticks([])
            self.hint = self.ax.text(0.5, 0.5, hint, transform=self.ax.transAxes, ha="center", va="center",
                                     fontsize=8, color="0.45", wrap=True)

    def clear_hint(self) -> None:
        """Remove the placeholder text and give the axes their ticks back (once data arrives)."""
        from matplotlib.ticker import AutoLocator

        if self.hint is not None:
            self.hint.remove()
            self.hint = None
            self.ax.xaxis.set_major_locator(AutoLocator())
            self.ax.yaxis.set_major_locator(AutoLocator())

    def clear(self) -> None:
        """Empty the axes for a new plot (the placeholder text goes with them)."""
        self.ax.clear()
        self.hint = None

    def draw(self) -> None:
        self.canvas.draw_idle()


def class_colormap(n_classes: int):
    """napari colours for labels 1..n-1 matching coral_core's figures."""
    from napari.utils import DirectLabelColormap

    from coral_core.plotting import LABEL_COLOURS

    colours = {0: np.zeros(4), None: np.zeros(4)}
    for c in range(1, n_classes):
        colours[c] = LABEL_COLOURS[c % len(LABEL_COLOURS)] if c < len(LABEL_COLOURS) else "white"
    return DirectLabelColormap(color_dict=colours)
