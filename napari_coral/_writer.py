"""npe2 writers: Labels and Image layers (3-D, or 4-D cine series) to NIfTI, MHA or NRRD, restoring the
source geometry, and a Labels layer's class names (its features' "class" column) in the file's header; a 3-D Labels
layer drawn on a DICOM series also to a DICOM SEG (.dcm) or, with the "RT structure set" writer that napari's Save
dialog offers beside it, to an RT structure set (.dcm), both referring to the series' images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coral_core.dicomlabels import check_dicom_seg_source, is_dicom_seg_name, save_dicom_seg, save_rt_structure_set
from coral_core.errors import UserError
from coral_core.volume import Volume, float32_scale, save_volume
from napari_coral._layers import affine_from_layer, spacing_mm


def _write(path: str, data, meta: dict, dtype, class_names: list[str] | None = None) -> list[str]:
    array = np.asarray(data)
    if array.ndim not in (3, 4):
        raise UserError(f"{path}: only 3-D layers and 4-D (cine) series can be saved (this one has {array.ndim} "
                        "dimensions)")  # napari would take a ValueError for "no writer" and say only that
    # a (t, z, y, x) series: frames on the file's fourth axis
    save_volume(path, array.astype(dtype), _layer_affine(meta), class_names)
    return [path]


def _layer_affine(meta: dict) -> np.ndarray:
    """The voxel-to-RAS affine of a layer being written: its source's, else one from its scale (a layer in
    micrometres written in mm)."""
    scale = meta.get("scale")
    if scale is not None:
        scale = spacing_mm(scale, meta.get("units"))[-3:]
    return affine_from_layer(meta.get("metadata"), scale)


def layer_class_names(features) -> list[str] | None:
    """A Labels layer's class names by label value, background first, from its features' "class" column (as
    Segment and the reader set it; rows by label value, or by an "index" column where it has one), else None."""
    if features is None or "class" not in features or len(features["class"]) < 2:
        return None
    names = [str(n) for n in features["class"]]
    if "index" in features:
        by_value = dict(zip((int(i) for i in features["index"]), names))
        names = [by_value.get(v, f"class {v}") for v in range(max(by_value) + 1)]
    return names


def write_labels(path: str, data, meta: dict) -> list[str]:
    if is_dicom_seg_name(path):
        return _write_dicom_labels(path, data, meta, save_dicom_seg, "DICOM SEG")
    dtype = np.uint8 if np.asarray(data).max(initial=0) <= 255 else np.int32
    return _write(path, data, meta, dtype, layer_class_names(meta.get("features")))


def write_rt_structure_set(path: str, data, meta: dict) -> list[str]:
    if not is_dicom_seg_name(path):
        raise UserError(f"{path}: an RT structure set is a DICOM file; end the name with .dcm")
    return _write_dicom_labels(path, data, meta, save_rt_structure_set, "DICOM RT structure set")


def _write_dicom_labels(path: str, data, meta: dict, save, what: str) -> list[str]:
    """A Labels layer as DICOM labels (``save``: a SEG's or an RT structure set's writer) on the DICOM images it was
    drawn on: the layer's own source (a layer Segment made, or one read from the series), else the open image read
    from DICOM with the layer's shape and placement (a label file opened over it). Segments (ROIs) are named by the
    layer's classes; Segment's predictions are SEMIAUTOMATIC (corrected by hand or not), other layers MANUAL."""
    array = np.asarray(data)
    info = dict(meta.get("metadata") or {})
    affine = _layer_affine(meta)
    source = info.get("source_path")
    try:
        check_dicom_seg_source(source, path, what)
    except UserError:
        info = _dicom_image_like(array.shape, affine) or info  # the open DICOM image this label file lies on
    series = info.get("dicom_series")
    like = Volume(np.broadcast_to(np.uint8(0), array.shape), affine,
                  Path(info["source_path"]) if info.get("source_path") else None)
    save(path, array, like, layer_class_names(meta.get("features")),  # UserError: napari shows it
         series_uid=series or None,  # a UID, or a cine stack's UIDs (one series per slice position)
         algorithm="SEMIAUTOMATIC" if info.get("coral_prediction") else "MANUAL")
    return [path]


def _dicom_image_like(shape, affine) -> dict | None:
    """The metadata of the first Image layer of the current viewer read from DICOM whose shape and affine are these."""
    from napari import current_viewer
    from napari.layers import Image

    viewer = current_viewer()
    for layer in (viewer.layers if viewer is not None else []):
        info = layer.metadata
        if (isinstance(layer, Image) and tuple(layer.data.shape) == tuple(shape) and info.get("affine") is not None
                and np.allclose(np.asarray(info["affine"]), affine, atol=1e-4)):
            try:
                check_dicom_seg_source(info.get("source_path"), "")
            except UserError:
                continue
            return dict(info)
    return None


def write_image(path: str, data, meta: dict) -> list[str]:
    array = np.asarray(data)  # float32, but float64 where float32 cannot hold the values (they would be infinite)
    return _write(path, array, meta, np.float64 if float32_scale(array) != 1.0 else np.float32)
