"""Odd napari layers through every panel of the plugin, in a real viewer: what the user can open or make.

Each case is one layer added to a new viewer with a tiny model: an image (dtypes, values, shapes, geometry, lazy and
multiscale data, names), a Labels layer painted on a plain scan, or a layer already named "scan labels" (which
Segment writes into). It is pressed through the panels as a user would: Segment, Embedding's Embed, then Suggest
slices with each suggestion clicked (the viewer must show that slice), Fine-tune (5 steps, on a slice painted in
its Labels layer, in a training process as the panel starts it, then the re-segmenting) and the Model panel's
Pretrain (1 epoch). Every press ends as

* ``ran``: its result is there and right (a Labels layer of the image's shape with the model's classes outside the
  slices kept as painted, a finite trajectory of every slice, the suggested slices shown, a fine-tuned model that
  re-segmented the image, a pretrained model), or
* ``refused``: one sentence in the panel's status line or error notification, nothing made,

or as a defect: an exception that is not the product's own sentence (raised by the press, by a worker, by a Qt slot,
or a job's "training failed: TypeError: ..."), a training process that died, a status that is not one sentence, a
result of the wrong kind, shape or values, a layer of the user's already named "scan labels" written over (a Labels
layer of the scan's shape may take the prediction outside its painted slice), a press that never finished (timed
out). A layer napari itself does not
take is listed as ``napari refused`` and not pressed.

Each case runs in its own Python process (a crash loses one case), under the caller's display:

    xvfb-run -a python benchmarks/fuzz_layers.py [--cases NAME,...] [--show] [--timeout S] [--options]

``--options`` checks every option box of the panels first (Segment's "Keep each class's largest piece"; Fine-tune's
"Keep the embedding in slice order", "Balance classes", "For other scans", "In millimetres" and "Also learn from the
other open images", with a plain scan "other scan" opened beside the case's layers for it, unless the case's image
is not a volume; the Model panel's "In millimetres"); by default they are left as they start.

The table lists every case and press; defects are listed again after it, and the exit status is 1 when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ACTIONS = ("segment", "embed", "suggest", "finetune", "pretrain")
N_CLASSES = 3


# ----------------------------------------------------------------------------- the cases

def _random(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _ints(dtype, shape=(6, 40, 40)):
    info = np.iinfo(dtype)
    return np.random.default_rng(1).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _painted(shape, value=1, dtype=np.uint8, slice_index=None):
    """A Labels array of ``shape`` (z, y, x) or (t, z, y, x) with one painted square on one slice."""
    labels = np.zeros(shape, dtype)
    z = slice_index if slice_index is not None else min(1, shape[-3] - 1)
    y, x = shape[-2], shape[-1]
    labels[(..., z, slice(y // 4, max(y // 4 + 1, y // 2)), slice(x // 4, max(x // 4 + 1, x // 2)))] = value
    return labels


def _dask(array, chunks):
    import dask.array as da

    return da.from_array(array, chunks=chunks)


def _readonly(array):
    array.setflags(write=False)
    return array


def _memmap(array):
    path = Path(tempfile.mkdtemp(prefix="fuzz-layers-")) / "volume.dat"
    mapped = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
    mapped[:] = array
    mapped.flush()
    return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)


def image_cases() -> dict:
    """name -> (data, add_image keywords): images the Segment, Embedding, Fine-tune and Model panels are given."""
    base = _random((6, 40, 40))
    cases = {
        "plain float32": (base, {}),
        # every dtype napari shows
        "bool": (base > 0.5, {}),
        **{f"{np.dtype(t).name} full range": (_ints(t), {}) for t in
           (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)},
        "float16": (base.astype(np.float16), {}),
        "float64": (base.astype(np.float64), {}),
        "big-endian float32": (base.astype(">f4"), {}),
        # values
        "all NaN": (np.full((6, 40, 40), np.nan, np.float32), {"contrast_limits": (0, 1)}),
        "all +inf": (np.full((6, 40, 40), np.inf, np.float32), {"contrast_limits": (0, 1)}),
        "half -inf": (np.where(base > 0.5, -np.inf, base).astype(np.float32), {"contrast_limits": (0, 1)}),
        "float32 extremes": ((base * 2 - 1) * np.finfo(np.float32).max, {}),
        "float64 1e300": (base.astype(np.float64) * 1e300, {}),
        "subnormal": (base * np.float32(1e-44), {"contrast_limits": (0, 1e-44)}),
        "all zero": (np.zeros((6, 40, 40), np.float32), {"contrast_limits": (0, 1)}),
        "one voxel 1e30": (np.where(np.arange(base.size).reshape(base.shape) == 7, np.float32(1e30), base), {}),
        "negative": (base - 1000, {}),
        # shapes
        "one slice": (_random((1, 40, 40)), {}),
        "two slices": (_random((2, 40, 40)), {}),
        "one row": (_random((6, 1, 40)), {}),
        "one column": (_random((6, 40, 1)), {}),
        "2x2 slices": (_random((6, 2, 2)), {}),
        "1x1 slices": (_random((6, 1, 1)), {}),
        "wide 3x700": (_random((6, 3, 700)), {}),
        "odd 129x97": (_random((5, 129, 97)), {}),
        "500 thin slices": (_random((500, 8, 8)), {}),
        "cine 3 frames": (_random((3, 4, 32, 32)), {}),
        "cine 1 frame": (_random((1, 4, 32, 32)), {}),
        "cine of one slice": (_random((3, 1, 32, 32)), {}),
        "5-D": (_random((2, 2, 4, 32, 32)), {}),
        "2-D": (_random((40, 40)), {}),
        "RGB": (_random((6, 40, 40, 3)), {"rgb": True}),
        # geometry
        "negative scale": (base, {"scale": (-2.0, 1.0, -1.0)}),
        "scale 1e-6": (base, {"scale": (1e-6, 1e-6, 1e-6)}),
        "scale 1e6": (base, {"scale": (1e6, 1e6, 1e6)}),
        "anisotropic 10x": (base, {"scale": (10.0, 0.5, 0.5)}),
        "translate 1e9": (base, {"translate": (1e9, -1e9, 1e9)}),
        "rotated": (base, {"rotate": 30}),
        "sheared": (base, {"shear": (0.3, 0.0, 0.2)}),
        "affine flip": (base, {"affine": np.diag([1.0, -1.0, 1.0, 1.0])}),
        "units um": (base, {"scale": (2000.0, 700.0, 700.0), "units": ("um", "um", "um")}),
        # storage
        "dask chunks": (_dask(base, (2, 20, 20)), {"contrast_limits": (0, 1)}),
        "dask cine": (_dask(_random((3, 4, 32, 32)), (1, 4, 32, 32)), {"contrast_limits": (0, 1)}),
        "multiscale": ([base, base[:, ::2, ::2]], {"multiscale": True, "contrast_limits": (0, 1)}),
        "Fortran order": (np.asfortranarray(base), {}),
        "reversed view": (base[::-1, ::-1, ::2], {}),
        "read-only": (_readonly(base.copy()), {}),
        "memmap": (_memmap(base), {}),
        # names (the name names files: annotations, kept models)
        "name a/b": (base, {"name": "a/b"}),
        "name ..": (base, {"name": ".."}),
        "name 300 chars": (base, {"name": "x" * 300}),
        "name 100 non-ASCII": (base, {"name": "é" * 100}),
        "name newline": (base, {"name": "scan\nsecond line"}),
        "name empty": (base, {"name": ""}),
        "name %s{}": (base, {"name": "%s {} {0}"}),
    }
    return cases


def labels_cases() -> dict:
    """name -> (labels data, add_labels keywords): Labels layers painted on a plain (6, 40, 40) scan, for Fine-tune."""
    shape = (6, 40, 40)
    every = np.zeros(shape, np.uint8)
    every[:] = 1
    every[:, :20] = 2
    cases = {
        "labels plain uint8": (_painted(shape), {}),
        "labels int8 with -1": (_painted(shape, -1, np.int8) + _painted(shape, 1, np.int8, 3), {}),
        "labels int64 2**40": (_painted(shape, 2**40, np.int64) + _painted(shape, 1, np.int64, 3), {}),
        "labels uint64 max": (_painted(shape, np.iinfo(np.uint64).max, np.uint64), {}),
        "labels bool": (_painted(shape, True, bool), {}),
        "labels uint32": (_painted(shape, 2, np.uint32), {}),
        "labels beyond the classes": (_painted(shape, N_CLASSES + 2), {}),
        "labels nothing painted": (np.zeros(shape, np.uint8), {}),
        "labels every slice painted": (every, {}),
        "labels every voxel one class": (np.ones(shape, np.uint8), {}),
        "labels other scale": (_painted(shape), {"scale": (3.0, 2.0, 2.0)}),
        "labels translated": (_painted(shape), {"translate": (1.0, 5.0, 0.0)}),
        "labels dask": (_dask(_painted(shape), (2, 40, 40)), {}),
        "labels multiscale": ([_painted(shape), _painted(shape)[:, ::2, ::2]], {"multiscale": True}),
        "labels other shape": (_painted((6, 40, 39)), {}),
        "labels cine on a volume": (_painted((2, *shape)), {}),
        "labels name a/b": (_painted(shape), {"name": "a/b"}),
        "labels name 300 chars": (_painted(shape), {"name": "y" * 300}),
        "labels name 100 non-ASCII": (_painted(shape), {"name": "é" * 100}),
        "labels name ..": (_painted(shape), {"name": ".."}),
        "labels name newline": (_painted(shape), {"name": "paint\nagain"}),
        "labels name empty": (_painted(shape), {"name": ""}),
    }
    return cases


def existing_cases() -> dict:
    """name -> (add the layer to the viewer): a layer already named "scan labels" beside a plain (6, 40, 40) scan,
    which Segment (and Fine-tune's re-segmenting) writes into, keeping what was painted there."""
    shape = (6, 40, 40)
    return {
        "into labels int8 with -1": lambda v: v.add_labels(_painted(shape, -1, np.int8), name="scan labels"),
        "into labels int64 2**40": lambda v: v.add_labels(_painted(shape, 2**40, np.int64), name="scan labels"),
        "into labels uint16 300": lambda v: v.add_labels(_painted(shape, 300, np.uint16), name="scan labels"),
        "into labels bool": lambda v: v.add_labels(_painted(shape, True, bool), name="scan labels"),
        "into labels other shape": lambda v: v.add_labels(_painted((6, 40, 39)), name="scan labels"),
        "into labels multiscale": lambda v: v.add_labels([_painted(shape), _painted(shape)[:, ::2, ::2]],
                                                         multiscale=True, name="scan labels"),
        "into labels dask": lambda v: v.add_labels(_dask(_painted(shape), (2, 40, 40)), name="scan labels"),
        "into labels read-only": lambda v: v.add_labels(_readonly(_painted(shape)), name="scan labels"),
        "into an image": lambda v: v.add_image(_random(shape, 5), name="scan labels"),
        "into points": lambda v: v.add_points(np.array([[1, 2, 3]]), name="scan labels"),
        "into shapes": lambda v: v.add_shapes([np.array([[1, 2, 3], [1, 5, 3], [1, 5, 8]])], shape_type="polygon",
                                              name="scan labels"),
    }


# ----------------------------------------------------------------------------- one case, in its own process

def _one_sentence_problem(text: str) -> str | None:
    import re

    if not text.strip():
        return "an empty status"
    if "Traceback" in text or "\n" in text.strip():
        return "a status of several lines"
    if re.search(r"[^.] The previous model is kept", text) or text.count("previous model is kept") > 1:
        return "sentences run together"
    return None


class _Pump:
    """Qt's events, run until a condition holds or a deadline passes; records exceptions that reach Qt's slots,
    threads and napari's notifications."""

    def __init__(self, app) -> None:
        import threading

        from napari.utils.notifications import notification_manager

        self.app, self.exceptions = app, []

        def hook(kind, value, tb):
            value.__traceback__ = value.__traceback__ or tb
            self.exceptions.append(value)

        self.errors_shown = []  # what the panels said in napari's error notifications
        from napari.utils import notifications

        shown = notifications.show_error

        def show_error(message):
            self.errors_shown.append(str(message))
            return shown(message)
        notifications.show_error = show_error
        sys.excepthook = hook
        threading.excepthook = lambda args: self.exceptions.append(args.exc_value)
        notification_manager.notification_ready.connect(
            lambda n: getattr(n, "exception", None) is not None and self.exceptions.append(n.exception))

    def until(self, condition, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.app.processEvents()
            if condition():
                for _ in range(20):  # what the result's handlers queue (layers added, status set)
                    self.app.processEvents()
                    time.sleep(0.005)
                return True
            time.sleep(0.01)
        return False


def _exception_outcome(exc: BaseException) -> dict:
    from coral_core.errors import UserError

    sys.path.insert(0, str(Path(__file__).parent))
    from forked import exception_result

    if isinstance(exc, UserError):
        return {"outcome": "refused", "message": str(exc)}
    result = exception_result(exc)
    return {"outcome": "exception", "message": result["message"], "where": result["where"]}


def _press(pump, press, settled, status, check, timeout: float) -> dict:
    """Press (call ``press()``), wait for ``settled()``, then say what happened. The exceptions of a napari worker
    that the press returns count too (a panel reports them in its status line; any but the product's is a defect)."""
    before, said, errors = len(pump.exceptions), len(pump.errors_shown), []
    try:
        started = press()
    except Exception as exc:  # a defect unless it is the product's sentence
        return _exception_outcome(exc)
    if hasattr(started, "errored"):  # connected before the worker's signal can be delivered: events run below
        started.errored.connect(errors.append)
    if started is None:  # the panel said no: in an error notification, and mostly in its status line too
        outcome = {"outcome": "refused", "message": (pump.errors_shown[said:] or [status()])[-1]}
    elif not pump.until(settled, timeout):
        outcome = {"outcome": "timed out", "message": status()}
    else:
        outcome = check()
    caught = pump.exceptions[before:] + [e for e in errors if not _is_user_error(e)]
    if caught and outcome["outcome"] != "exception":
        outcome = _exception_outcome(caught[0]) | {"status": status()}
        if outcome["outcome"] == "refused":  # a UserError that reached Qt instead of the status line
            outcome = {"outcome": "exception", "message": f"UserError escaped to Qt: {caught[0]}"}
    if outcome["outcome"] == "refused":
        problem = _one_sentence_problem(outcome["message"])
        if problem:
            outcome = {"outcome": "bad message", "message": f"{problem}: {outcome['message']!r}"}
        elif "training failed:" in outcome["message"] or "stopped unexpectedly" in outcome["message"] \
                or "was killed by the system" in outcome["message"]:
            outcome["outcome"] = "job failed"
    return outcome


def _full(layer):
    from napari_coral._layers import full_resolution

    return full_resolution(layer)


def _layer_shape(layer) -> tuple:
    return tuple(_full(layer).shape)


def _labels_check(viewer, image, name: str) -> dict | None:
    """A defect where the Labels layer ``name`` is not the image's shape with the model's classes, else None."""
    if name not in viewer.layers:
        return {"outcome": "no result", "message": f"no layer {name!r}"}
    layer = viewer.layers[name]
    if type(layer).__name__ != "Labels":
        return {"outcome": "wrong result", "message": f"the result went into a {type(layer).__name__} layer"}
    data = np.asarray(_full(layer))
    if data.shape != _layer_shape(image):
        return {"outcome": "wrong result", "message": f"labels of shape {data.shape} for an image of {_layer_shape(image)}"}
    kept = layer.metadata.get("coral_painted", [])  # slices painted before, kept as they were
    data = np.delete(data.reshape(-1, *data.shape[-2:]), kept, axis=0)
    if not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() >= N_CLASSES:
        return {"outcome": "wrong result", "message": f"labels of {data.dtype} from {data.min()} to {data.max()}"}
    return None


def _lost(layer, users: np.ndarray) -> dict | None:
    """A defect where the user's layer already named "scan labels" lost what it held: a Labels layer of the scan's
    shape its painted slice (1), any other layer anything."""
    now = np.asarray(_full(layer))
    same_shape = type(layer).__name__ == "Labels" and users.shape == (6, 40, 40) and not layer.multiscale
    if same_shape and now.shape == users.shape and np.array_equal(now[1], users[1]):
        return None
    if not same_shape and now.shape == users.shape and np.array_equal(now, users):
        return None
    return {"outcome": "user's layer lost", "message": f"the user's {type(layer).__name__} layer {layer.name!r} was "
                                                       f"written over ({users.shape} -> {now.shape})"}


def _went_to(viewer, embedding) -> dict:
    """Each suggested slice, as the Embedding panel lists it, clicked: the viewer must show that slice of the image
    it names (of the frame embedded, in a cine)."""
    from qtpy.QtCore import Qt

    from napari_coral._layers import shown_index

    suggested = [embedding.suggestions.item(i) for i in range(embedding.suggestions.count())]
    if not suggested:
        return {"outcome": "no result", "message": f"no slice listed; status {embedding.status.text()!r}"}
    for item in suggested:
        name, index = item.data(Qt.ItemDataRole.UserRole)
        embedding.go_to(name, index)
        want = (embedding.frames[name], index) if name in embedding.frames else (index,)
        shown = shown_index(viewer, viewer.layers[name])  # the case's image, or "other scan" beside it
        if shown != want:
            return {"outcome": "wrong result", "message": f"went to slice {want} of {name!r}, the viewer shows {shown}"}
    return {"outcome": "ran"}


def run_case(kind: str, name: str, timeout: float, home: Path, options: bool = False) -> dict:
    os.environ["NAPARI_CORAL_HOME"] = str(home)
    import napari
    from qtpy.QtWidgets import QApplication

    from coral_core.model import UNetConfig, build_model
    from napari_coral._session import session_for
    from napari_coral._widgets.segment import labels_layer_name

    try:
        from napari_coral._widgets.segment import labels_target
    except ImportError:  # a checkout from before it, which always wrote "IMAGE labels"
        def labels_target(viewer, image_name, shape):
            return labels_layer_name(image_name)

    data, kwargs = {"image": image_cases, "labels": labels_cases}[kind]()[name] if kind != "existing" else (None, {})
    viewer = napari.Viewer(show=False)
    pump = _Pump(QApplication.instance())
    model = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=N_CLASSES,
                                   class_names=["background", "c1", "c2"]))
    session_for(viewer).set_model(model, {"training": {}}, "tiny test model")
    results = {}
    try:
        if kind == "image":
            image = viewer.add_image(data, **({"name": name} | kwargs))
            labels_data = _painted(_layer_shape(image)) if image.ndim in (3, 4) and not image.rgb else None
            geometry = {k: kwargs[k] for k in ("scale", "translate", "rotate", "shear", "affine", "units") if k in kwargs}
            labels = None if labels_data is None else viewer.add_labels(labels_data, name="paint", **geometry)
        elif kind == "labels":
            image = viewer.add_image(_random((6, 40, 40)), name="scan")
            labels = viewer.add_labels(data, **({"name": name} | kwargs))
        else:  # Segment writes into the layer named "scan labels"; Fine-tune trains on "paint" and writes there too
            image = viewer.add_image(_random((6, 40, 40)), name="scan")
            existing = existing_cases()[name](viewer)
            labels = viewer.add_labels(_painted((6, 40, 40)), name="paint")
            users = np.array(_full(existing), copy=True)  # what must stay (a Labels layer's painted slice, else all)
        if options and (kind != "image" or labels is not None):  # for "Also learn from the other open images"
            viewer.add_image(_random((6, 40, 40)), name="other scan")  # (none beside an image that is no volume)
    except Exception as exc:
        return {"napari": f"{type(exc).__name__}: {str(exc)[:160]}"}

    def dock(panel):
        return viewer.window.add_plugin_dock_widget("napari-coral", panel)[1]

    segment, embedding, finetune, model_panel = (dock(p) for p in ("Segment", "Embedding", "Fine-tune", "Model"))
    for w in (segment, embedding, finetune, model_panel):
        w.device_picker.setCurrentText("cpu")
    if options:
        for box in (segment.largest_box, finetune.keep_embedding, finetune.balance_classes, finetune.wider_zoom,
                    finetune.physical_scale, finetune.use_unlabelled, model_panel.physical_scale):
            box.setChecked(True)
    if kind in ("image", "existing"):
        segment.image_picker.setCurrentText(image.name)

        def segmented():
            bad = _labels_check(viewer, image, labels_target(viewer, image.name, _layer_shape(image)))
            return bad or (kind == "existing" and _lost(existing, users)) or {"outcome": "ran"}
        results["segment"] = _press(pump, segment.segment, lambda: segment.segment_button.isEnabled(),
                                    segment.status.text, lambda: segmented() if "failed" not in segment.status.text()
                                    else {"outcome": "refused", "message": segment.status.text()}, timeout)
        if labels_layer_name(image.name) in viewer.layers and kind == "image":
            viewer.layers.remove(labels_layer_name(image.name))
        def embedded():
            if "failed" in embedding.status.text():
                return {"outcome": "refused", "message": embedding.status.text()}
            mine = [t for t in embedding.trajectories if t.name == image.name]
            if not mine:
                return {"outcome": "no result", "message": f"no trajectory; status {embedding.status.text()!r}"}
            slices = _layer_shape(image)[-3]  # a cine: the frame shown
            if mine[0].xy.shape != (slices, 2) or not np.isfinite(mine[0].xy).all():
                return {"outcome": "wrong result", "message": f"a trajectory of {mine[0].xy.shape} points, "
                                                              f"{int(np.isfinite(mine[0].xy).all(1).sum())} finite"}
            return {"outcome": "ran"}
        results["embed"] = _press(pump, embedding.embed, lambda: embedding.embed_button.isEnabled(),
                                  embedding.status.text, embedded, timeout)
        if results["embed"]["outcome"] == "ran":
            results["suggest"] = _press(pump, lambda: embedding.suggest() or None, lambda: True,
                                        embedding.status.text, lambda: _went_to(viewer, embedding), timeout)
    if labels is not None:
        finetune.steps.setValue(5)
        finetune.image_picker.setCurrentText(image.name)
        finetune.labels_picker.setCurrentText(labels.name)

        def tuned_settled():  # the job ended and, after a fine-tuning, the re-segmenting too
            runner = finetune.runner
            return (runner is not None and not runner.running and finetune.finetune_button.isEnabled()
                    and not finetune.status.text().startswith("Fine-tuned. Loading"))

        def tuned():
            text = finetune.status.text()
            if text.startswith("Fine-tuned and re-segmented"):
                bad = _labels_check(viewer, image, labels_target(viewer, image.name, _layer_shape(image)))
                return bad or (kind == "existing" and _lost(existing, users)) or {"outcome": "ran"}
            if text.startswith("Fine-tuned."):
                return {"outcome": "no result", "message": f"status left as {text!r}"}
            return {"outcome": "refused", "message": text}
        results["finetune"] = _press(pump, finetune.finetune, tuned_settled, finetune.status.text, tuned, 3 * timeout)
    if kind == "image":
        model_panel.epochs.setValue(1)

        def pretrained():
            text = model_panel.pretrain_status.text()
            if not text.startswith("Pretraining finished"):
                return {"outcome": "refused", "message": text}
            return {"outcome": "ran"}
        results["pretrain"] = _press(pump, model_panel.pretrain,
                                     lambda: model_panel.runner is not None and not model_panel.runner.running,
                                     model_panel.pretrain_status.text, pretrained, 3 * timeout)
    viewer.close()
    return results


def _is_user_error(exc) -> bool:
    from coral_core.errors import UserError

    return isinstance(exc, UserError)


# ----------------------------------------------------------------------------- the table

DEFECTS = {"exception", "job failed", "bad message", "timed out", "no result", "wrong result", "crashed",
           "user's layer lost"}


def _cell(outcome: dict | None) -> str:
    if outcome is None:
        return "-"
    return outcome["outcome"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a press may take (training: 3x)")
    parser.add_argument("--show", action="store_true", help="print every outcome's message")
    parser.add_argument("--options", action="store_true", help="check every option box of the panels first")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        try:
            result = run_case(*args.child, args.timeout, Path(args.home), args.options)
        except Exception as exc:  # outside the presses (the case's set-up, the viewer's closing): the case crashed
            import traceback

            sys.__excepthook__(type(exc), exc, exc.__traceback__)  # the pump's hook would keep it to itself
            message = f"outside the presses: {''.join(traceback.format_exception_only(exc)).strip()[:300]}"
            result = {a: {"outcome": "crashed", "message": message} for a in ACTIONS}
        print("@fuzz " + json.dumps(result), flush=True)
        os._exit(0)  # leave without Qt's teardown
    cases = ([("image", n) for n in image_cases()] + [("labels", n) for n in labels_cases()]
             + [("existing", n) for n in existing_cases()])
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",")]
        unknown = set(wanted) - {n for _, n in cases}
        if unknown:
            parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c[1] in wanted]
    started = time.monotonic()
    rows, defects = [], []
    for kind, name in cases:
        with tempfile.TemporaryDirectory(prefix="fuzz-layers-home-") as home:
            t0 = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, __file__, "--child", kind, name, "--home", home,
                                       "--timeout", str(args.timeout), *(["--options"] if args.options else [])],
                                      capture_output=True, text=True,
                                      timeout=12 * args.timeout + 120)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@fuzz ")]
                result = json.loads(lines[-1][6:]) if lines else {
                    a: {"outcome": "crashed", "message": f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"}
                    for a in ACTIONS}
            except subprocess.TimeoutExpired:
                result = {a: {"outcome": "timed out", "message": "the case's process"} for a in ACTIONS}
            seconds = time.monotonic() - t0
        if "napari" in result:
            rows.append((name, "napari refused", *[""] * (len(ACTIONS) - 1), seconds))
            if args.show:
                print(f"  {name}: napari: {result['napari']}")
            continue
        rows.append((name, *(_cell(result.get(a)) for a in ACTIONS), seconds))
        for action in ACTIONS:
            outcome = result.get(action)
            if outcome and outcome["outcome"] in DEFECTS:
                defects.append((name, action, outcome))
            if outcome and args.show:
                where = f" [{outcome['where']}]" if outcome.get("where") else ""
                print(f"  {name} / {action}: {outcome['outcome']}: {outcome.get('message', '')}{where}")
        print(f"{name:<30} {'  '.join(f'{c:<12}' for c in rows[-1][1:-1])} {seconds:5.1f} s", flush=True)
    print()
    print(f"| case | {' | '.join(ACTIONS)} |")
    print("|---|" + "---|" * len(ACTIONS))
    for row in rows:
        print(f"| {row[0]!r} | " + " | ".join(row[1:-1]) + " |")
    counts = {}
    for row in rows:
        for cell in row[1:-1]:
            if cell:
                counts[cell] = counts.get(cell, 0) + 1
    print()
    print(f"{len(rows)} cases, {sum(counts.values())} outcomes: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; {time.monotonic() - started:.0f} s")
    print(f"defects: {len(defects)}")
    for name, action, outcome in defects:
        where = f" [{outcome['where']}]" if outcome.get("where") else ""
        print(f"  {name!r} / {action}: {outcome['outcome']}: {outcome.get('message', '')[:300]}{where}")
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
