"""Segment dock widget: label the chosen image with the current model, in the background."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QCheckBox, QFormLayout, QPushButton, QVBoxLayout, QWidget

from napari_coral._layers import LayerArray, full_resolution, has_spacing, layer_spacing_mm, slice_digests
from napari_coral._session import session_for
from napari_coral._widgets._common import (DevicePicker, LayerPicker, WorkerError, alive, class_colormap, failure_text,
                                          no_volume_text, status_label)


def labels_layer_name(image_name: str) -> str:
    return f"{image_name} labels"


def _writable(layer, shape: tuple) -> bool:
    """Whether Segment may write labels of ``shape`` into ``layer``: a Labels layer of one level, of that shape, or
    of another shape holding nothing but an earlier prediction (no painted slice kept in it)."""
    from napari.layers import Labels

    if not isinstance(layer, Labels) or layer.multiscale:
        return False
    if tuple(layer.data.shape) == tuple(shape):
        return True
    return bool(layer.metadata.get("coral_prediction")) and not layer.metadata.get("coral_painted")


def labels_target(viewer, image_name: str, shape: tuple) -> str:
    """The layer Segment writes an image's labels (of ``shape``) into: "IMAGE labels", or where a layer of that
    name cannot take them (an image, points, a multiscale layer, labels of another shape that are not an earlier
    prediction: the user's, left as they are), the first of "IMAGE labels 2", "IMAGE labels 3", ... that can."""
    base = labels_layer_name(image_name)
    name, n = base, 2
    while name in viewer.layers and not _writable(viewer.layers[name], shape):
        name, n = f"{base} {n}", n + 1
    return name


def put_labels(viewer, image_layer, labels: np.ndarray, class_names: list[str], digests: list | None = None
               ) -> tuple[object, int]:
    """Add, or update in place, the Labels layer that belongs to ``image_layer``; returns it and how many
    slices were kept. What the user painted in that layer is kept, so that nothing painted is lost to a prediction
    (a fine-tuning trains on it again): the slices the Fine-tune panel counts as annotated, the slices edited since
    Segment last wrote the layer (told by the digests it keeps in the layer's metadata, ``coral_written``), in a
    layer Segment did not write (a label file opened under that name) every slice that holds a label, and the slices
    kept so by earlier runs (``coral_painted``; a fresh prediction everywhere takes deleting the layer). ``digests``:
    :func:`napari_coral._layers.slice_digests` of ``labels``, when the caller computed them off napari's thread."""
    name = labels_target(viewer, image_layer.name, labels.shape)
    features = {"class": list(class_names)}
    keep = set()
    flat = labels.reshape(-1, *labels.shape[-2:])  # a cine's slices frame by frame, as the digests go
    if digests is None:
        digests = slice_digests(flat)
    digests = list(digests)
    if name in viewer.layers:
        layer = viewer.layers[name]
        if tuple(layer.data.shape) == labels.shape:
            old = np.asarray(layer.data).reshape(flat.shape)
            keep = set(_flat_indices(session_for(viewer).annotated_in(layer), labels.shape))
            keep |= {i for i in layer.metadata.get("coral_painted", ()) if i < len(old)}  # kept by earlier runs
            written = layer.metadata.get("coral_written")
            if not layer.metadata.get("coral_prediction"):  # not Segment's: its labelled slices are the user's
                keep |= {i for i in range(len(old)) if old[i].any()}
            elif written is not None and len(written) == len(old):  # Segment's: the slices edited since it wrote them
                now = slice_digests(old)
                keep |= {i for i, (a, b) in enumerate(zip(now, written)) if a != b}
            if keep:
                index = np.array(sorted(keep))
                painted, room = old[index], np.iinfo(flat.dtype)
                # painted values the prediction's type lacks (above 255, or -1 of an int8 layer: it became 255)
                widen = painted.max(initial=0) > room.max or painted.min(initial=0) < room.min
                flat = (flat.astype(np.promote_types(flat.dtype, old.dtype)) if widen
                        else flat if flat.flags.writeable else flat.copy())
                flat[index] = painted
                labels = flat.reshape(labels.shape)
                if widen:  # every slice's bytes changed with the type
                    digests = slice_digests(flat)
                else:
                    for i, digest in zip(index, slice_digests(flat[index])):  # as stored, in the layer's type
                        digests[i] = digest
        layer.data = labels
    else:
        layer = viewer.add_labels(
            labels, name=name, scale=image_layer.scale, translate=image_layer.translate,
            metadata={**image_layer.metadata}, units=image_layer.units,
        )
    layer.colormap = class_colormap(len(class_names))
    layer.features = features
    layer.metadata["coral_prediction"] = True  # its unannotated slices are predictions
    layer.metadata["coral_written"] = digests  # what each slice held as written: an edit since shows as a change
    layer.metadata["coral_painted"] = sorted(int(i) for i in keep)  # the user's, kept at every run
    return layer, len(keep)


def _flat_indices(annotated: list, shape: tuple) -> list[int]:
    """Annotated slices (numbers, or a cine's (frame, slice) pairs) as indices of the slices frame by frame."""
    if annotated and isinstance(annotated[0], tuple):
        return [t * shape[-3] + z for t, z in annotated]
    return list(annotated)


def start_segmentation(viewer, image_layer, device, on_done=None, on_error=None):
    """Run :func:`coral_core.infer.iter_segment_series` (one frame for a 3-D image) in a napari thread worker, then
    :func:`coral_core.infer.keep_largest_components` when the session asks for it. ``on_done(layer, kept, removed)``:
    the Labels layer, the annotated slices kept as painted, and the voxels of smaller pieces made background (None
    when the session keeps every piece)."""
    from napari.qt.threading import thread_worker
    from napari.utils import progress

    from coral_core.errors import naming
    from coral_core.infer import iter_segment_series, keep_largest_components

    session = session_for(viewer)
    model = session.ensure_model()
    largest = session.largest_component  # as it is when the run starts
    volume = LayerArray(image_layer)  # read in the worker: a lazy layer is read from disk there
    n_slices = int(np.prod(volume.shape[:-2]))  # a cine series (t, z, y, x): every slice of every frame
    bar = progress(total=n_slices, desc=f"Segmenting {image_layer.name}")

    @thread_worker(ignore_errors=True)  # errors are reported below, not re-raised in napari's event loop
    def work():
        try:
            data = volume.read()
            labels = None
            with naming(image_layer.name):  # an image a model with a physical scale cannot see at its spacing
                for done, labels in iter_segment_series(model, data if data.ndim == 4 else data[None], device,
                                                        spacing=volume.spacing):
                    yield done  # handed to the GUI thread, which advances the bar
            labels = labels if data.ndim == 4 else labels[0]
            labels, removed = keep_largest_components(labels) if largest else (labels, None)
            return labels, removed, slice_digests(labels.reshape(-1, *labels.shape[-2:]))  # hashed here, not in napari
        except RuntimeError as exc:  # torch's errors, out of memory among them: passed on as another type
            raise WorkerError(exc) from exc

    worker = work()
    worker.yielded.connect(lambda done: bar.update(done - bar.n))

    def finished(result):
        labels, removed, digests = result
        bar.update(n_slices - bar.n)
        bar.close()
        from coral_core.errors import UserError

        if image_layer not in viewer.layers:  # closed or removed while segmenting: the panel must come back
            errored(UserError(f"layer {image_layer.name!r} was closed while it was segmented, so nothing was written"))
            return
        now = tuple(full_resolution(image_layer).shape)
        if now != volume.shape:  # its data replaced: labels of the old shape would not fit it
            errored(UserError(f"layer {image_layer.name!r} changed from {_shape_text(volume.shape)} to "
                              f"{_shape_text(now)} while it was segmented, so nothing was written; segment it again"))
            return
        try:
            layer, kept = put_labels(viewer, image_layer, labels, model.config.class_names, digests)
        except Exception as exc:  # said as a failure (the panel's button comes back), its traceback logged
            errored(exc)
            return
        if on_done:
            on_done(layer, kept, removed)

    def errored(exc):
        bar.close()
        if on_error:
            on_error(exc)
        else:
            from napari.utils.notifications import show_error

            show_error(f"Segmentation failed: {failure_text(exc)}")

    worker.returned.connect(finished)
    worker.errored.connect(errored)
    worker.start()
    return worker


def _shape_text(shape: tuple) -> str:
    return " x ".join(str(n) for n in shape)


def removed_text(removed: int | None) -> str:
    """What a status line adds when each class's largest piece was kept (nothing when every piece was)."""
    if removed is None:
        return ""
    return f", {removed} voxel{'s' if removed != 1 else ''} of smaller pieces made background"


def kept_slices_text(kept: int) -> str:
    """What a status line adds when segmenting kept ``kept`` annotated slices (nothing when none)."""
    return f", keeping the {kept} annotated slice{'s' if kept != 1 else ''} as painted" if kept else ""


def scale_note(model, layer) -> str:
    """What a status line adds when a model with a physical scale labels ``layer``: that its slices, larger than
    the square the model sees, were segmented in several windows of it, and that a layer without a spacing
    (scale 1) is read as 1 mm per pixel."""
    from coral_core.data import tiling_note

    if model.config.pixel_spacing is None:
        return ""
    tiled = tiling_note(model.config, layer.data.shape, layer_spacing_mm(layer))
    note = f" {tiled[0].upper()}{tiled[1:]}." if tiled else ""
    if not has_spacing(layer):
        note += f" {layer.name} has no spacing (scale 1), so its pixels were read as 1 mm."
    return note


class SegmentWidget(QWidget):
    """Pick an image and a device, press Segment: a Labels layer appears with class names."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = session_for(napari_viewer)
        self.image_picker = LayerPicker(napari_viewer, "image", cine=True)
        self.device_picker = DevicePicker()
        self.segment_button = QPushButton("Segment")
        self.segment_button.clicked.connect(self.segment)
        self.largest_box = QCheckBox("Keep each class's largest piece")
        self.largest_box.setToolTip(
            "Make every piece of a class but its largest (3-D, touching at faces, edges or corners) background: "
            "stray islands go, for anatomy of one piece per class such as the heart's. A class of several organs "
            "(both kidneys) would keep one of them. Fine-tune's re-segmenting follows it too.")
        self.largest_box.setChecked(self.session.largest_component)
        self.largest_box.toggled.connect(lambda on: setattr(self.session, "largest_component", bool(on)))
        self.status = status_label("Choose an image and press Segment.")
        form = QFormLayout()
        form.addRow("Image", self.image_picker)
        form.addRow("Device", self.device_picker)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.largest_box)
        layout.addWidget(self.segment_button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.worker = None

    def segment(self):
        from napari.utils.notifications import show_error

        if not self.segment_button.isEnabled():  # called again while it runs, as its greyed-out button is not
            return None
        image = self.image_picker.layer()
        if image is None:
            message = no_volume_text(self.viewer, "Open a 3-D image first (File > Open, or File > Open Sample > "
                                                  "Cardiac phantom).")
            self.status.setText(message)
            show_error(message)
            return None
        self.session.ensure_model()
        if self.session.pretrained_only:
            message = (f"The current model ({self.session.source}) is pretrained only: its segmentation head is "
                       "untrained. Paint a few slices and fine-tune it first (Fine-tune panel, where Classes names your "
                       "classes).")
            self.status.setText(message)
            show_error(message)
            return None
        device = self.device_picker.device_or_none(self.status)
        if device is None:
            return None
        self.segment_button.setEnabled(False)
        self.status.setText(f"Segmenting {image.name} on {device.type}...")
        model, source = self.session.model, self.session.source  # the model that segments, whatever is loaded since

        def done(layer, kept, removed):
            if not alive(self):
                return
            self.segment_button.setEnabled(True)
            self.status.setText(f"Wrote {layer.name} ({source}){kept_slices_text(kept)}{removed_text(removed)}."
                                f"{scale_note(model, image)}")

        def failed(exc):
            if not alive(self):
                return
            self.segment_button.setEnabled(True)
            message = f"Segmentation failed: {failure_text(exc)}"
            self.status.setText(message)
            show_error(message)

        self.worker = start_segmentation(self.viewer, image, device, done, failed)
        return self.worker
