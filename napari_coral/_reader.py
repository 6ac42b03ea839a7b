"""npe2 reader: NIfTI, MHA/MHD, NRRD and DICOM series folders, and 4-D cine series (images and their labels)."""

from __future__ import annotations

import numpy as np

from coral_core.errors import UserError
from coral_core.volume import Volume, is_volume_path, load_frames, read_class_names
from napari_coral._layers import volume_to_layer


def get_reader(path):
    """Return a reader for a volume path we handle, else None (never raises)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        if not is_volume_path(path):
            return None
    except OSError:
        return None
    return read_volume


def read_volume(path):
    """Layer data for one volume; a label map opens as Labels, and a 4-D (cine) series as one
    (t, z, y, x) layer with a slider for its frames: an image, or Labels for labels drawn on a cine (which
    Fine-tune trains on with the cine's image, every annotated frame a scan). A label
    file that names its classes (as coral segment and the napari-coral writer save them) opens with those
    names as the layer's "class" feature and Segment's colours."""
    if isinstance(path, list):
        path = path[0]
    try:
        frames = load_frames(path)
    except UserError as exc:
        # napari shows reader exceptions as a notification; keep it to the one sentence.
        raise ValueError(str(exc)) from None
    if len(frames) > 1:  # one (t, z, y, x) layer: an image, or labels drawn on a cine (as Segment and the writer keep them)
        series = Volume(np.stack([frame.array for frame in frames]), frames[0].affine, frames[0].path)
        del frames
        data, kwargs, kind = volume_to_layer(series)
        kwargs["scale"] = (1.0, *kwargs["scale"])
        kwargs["metadata"]["frames"] = len(series.array)
    else:
        data, kwargs, kind = volume_to_layer(frames[0])
    names = read_class_names(path) if kind == "labels" else None
    if names and int(data.max(initial=0)) < len(names):  # names that cover every label (no label left uncoloured)
        from napari_coral._widgets._common import class_colormap

        kwargs["features"] = {"class": names}
        kwargs["colormap"] = class_colormap(len(names))
    return [(data, kwargs, kind)]
