"""npe2 reader: NIfTI, MHA/MHD, NRRD, DICOM series (a folder, one of its slice files, or several), multi-frame
DICOM files, and 4-D cine series (images and their labels)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from coral_core.errors import OffGridError, UserError
from coral_core.volume import (Volume, dicom_cine_stack, dicom_folder_series, dicom_series_title, dicom_slice_series,
                               is_dicom_file, is_dicom_labels, is_dicom_seg, is_volume_path, load_dicom_series,
                               load_frames, load_labels_like, read_class_names)
from napari_coral._layers import slice_digests, volume_to_layer

_NOTIFIED: dict[tuple[str, str], float] = {}  # (folder, series UID) -> when "already open" was last said


def get_reader(path):
    """Return a reader for a volume path we handle, else None (never raises): several paths only when each is a
    single-slice DICOM file (napari's stacked open of a series' files)."""
    try:
        if isinstance(path, list):
            if len(path) == 1:
                path = path[0]
            else:
                return read_volume if all(dicom_slice_series(p) is not None for p in path) else None
        if not (is_volume_path(path) or is_dicom_file(path)):
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
    paths = path if isinstance(path, list) else [path]
    path = paths[0]
    try:
        uid = dicom_slice_series(path)
        if uid is not None:  # one slice file of a series (or several): the series
            return _read_dicom_slices(paths, uid)
        if is_dicom_labels(path):  # a SEG or contours: on the open image they were drawn on
            data, kwargs, kind = _seg_layer(path)
        else:
            data, kwargs, kind = _frames_layer(load_frames(path))
            series = dicom_folder_series(path)  # a DICOM folder: its series, as a file of it records them
            if series:
                kwargs["metadata"]["dicom_series"] = series
    except UserError as exc:
        # napari shows reader exceptions as a notification; keep it to the one sentence.
        raise ValueError(str(exc)) from None
    names = read_class_names(path) if kind == "labels" else None
    if names and int(data.max(initial=0)) < len(names):  # names that cover every label (no label left uncoloured)
        from napari_coral._widgets._common import class_colormap

        kwargs["features"] = {"class": names}
        kwargs["colormap"] = class_colormap(len(names))
    return [(data, kwargs, kind)]


def _seg_layer(path) -> tuple:
    """A DICOM SEG file (or RT structure set) as a Labels layer on an open 3-D image or cine series whose voxel grid
    its frames (contours) lie on (it holds only what it labels, so it needs the image's grid; on a cine, each goes in
    the frame of the image it names), placed as that image is: the image read from the series it refers to, else
    the topmost in the layer list that fits. Contours fit any image
    with their slices; when several such images are open, a notification names the one they were filled on."""
    from napari import current_viewer
    from napari.layers import Image

    from coral_core.dicomlabels import referenced_series

    viewer = current_viewer()
    images = [layer for layer in (viewer.layers if viewer is not None else [])
              if isinstance(layer, Image) and layer.ndim in (3, 4) and "affine" in layer.metadata]
    series = referenced_series(path)
    images = sorted(reversed(images), key=lambda layer: not _holds_series(layer, series))
    fits = []
    for layer in images:
        like = Volume(np.broadcast_to(np.uint8(0), layer.data.shape), np.asarray(layer.metadata["affine"]),
                      Path(layer.metadata.get("source_path") or layer.name))
        try:
            labels = load_labels_like(path, like)
        except OffGridError:  # drawn on another grid: try the next image
            continue
        fits.append((layer, labels))
        if is_dicom_seg(path) or _holds_series(layer, series):  # a SEG's grid is exact
            break
    if fits:
        layer, labels = fits[0]
        if len(fits) > 1:
            from napari.utils.notifications import show_info

            show_info(f"{path}: its contours lie in the slices of {len(fits)} open images; filled on the grid of "
                      f"{layer.name!r}, the topmost in the layer list")
        data, kwargs, kind = volume_to_layer(labels, as_labels=True, name=Path(path).stem)
        kwargs.update(scale=tuple(layer.scale), translate=tuple(layer.translate))
        # Fine-tune fills structures picked by name from the file one by one where not painted since (a cine's: each
        # frame's slices in turn)
        kwargs["metadata"]["coral_slice_digests"] = slice_digests(data.reshape(-1, *data.shape[-2:]))
        return data, kwargs, kind
    what = ("a DICOM SEG segmentation, which holds only the slices it labels" if is_dicom_seg(path) else
            "a DICOM RT structure set, which holds only contours")
    raise UserError(f"{path}: {what}; open the image it was drawn on first, then this file, to see it on that image"
                    + (f" (none of the {len(images)} open images has its voxel grid)" if images else ""))


def _frames_layer(frames: list, name: str | None = None) -> tuple:
    """Layer data for a volume, or for a series' frames one (t, z, y, x) layer: an image, or labels drawn on a cine
    (as Segment and the writer keep them)."""
    if len(frames) == 1:
        return volume_to_layer(frames[0], name=name)
    series = Volume(np.stack([frame.array for frame in frames]), frames[0].affine, frames[0].path)
    frames.clear()  # the caller's list: the frames' own arrays go now, the stacked copy stays
    data, kwargs, kind = volume_to_layer(series, name=name)
    kwargs["scale"] = (1.0, *kwargs["scale"])
    kwargs["metadata"]["frames"] = len(series.array)
    return data, kwargs, kind


def _read_dicom_slices(paths: list, uid: str) -> list:
    """The DICOM series one slice file belongs to, read from its folder (or the series several slice files make), as
    medical viewers open a series from any of its files. napari opens the files of a multiple selection one by one:
    a file whose series the viewer shows already (read from the same folder) adds nothing, so selecting all of a
    series' files opens it once."""
    folder = str(Path(paths[0]).resolve().parent)
    if len(paths) == 1 and _series_open(folder, uid):
        key = (folder, uid)
        if time.monotonic() - _NOTIFIED.get(key, -1e9) > 10:  # once for a selection of many files
            from napari.utils.notifications import show_info

            show_info(f"{paths[0]}: its DICOM series is open already (from {folder}); remove that layer to open it again")
        _NOTIFIED[key] = time.monotonic()
        return [(None,)]  # npe2's "read, nothing to add"
    stack = dicom_cine_stack(folder, {dicom_slice_series(p) for p in paths})  # a cine exported a series per slice
    data, kwargs, kind = _frames_layer(load_dicom_series(paths),
                                       name=Path(folder).name if stack else dicom_series_title(folder, uid))
    kwargs["metadata"]["dicom_series"] = stack or uid
    return [(data, kwargs, kind)]


def _series_open(folder: str, uid: str) -> bool:
    """Whether the current napari viewer holds a layer this reader made from that folder's series (or from the
    cine stack, a series per slice position, that the series is part of)."""
    from napari import current_viewer

    viewer = current_viewer()
    return viewer is not None and any(
        layer.metadata.get("source_path") == folder and _holds_series(layer, uid) for layer in viewer.layers)


def _holds_series(layer, uid: str) -> bool:
    """Whether a layer was read from the DICOM series ``uid`` (its ``dicom_series``: the UID, or a cine stack's list
    of them, a series per slice position)."""
    series = layer.metadata.get("dicom_series")
    return bool(uid) and (series == uid or (isinstance(series, (list, tuple)) and uid in series))
