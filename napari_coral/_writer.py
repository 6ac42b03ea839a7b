"""npe2 writers: Labels and Image layers (3-D, or 4-D cine series) to NIfTI, MHA or NRRD, restoring the
source geometry, and a Labels layer's class names (its features' "class" column) in the file's header."""

from __future__ import annotations

import numpy as np

from coral_core.volume import save_volume
from napari_coral._layers import affine_from_layer, spacing_mm


def _write(path: str, data, meta: dict, dtype, class_names: list[str] | None = None) -> list[str]:
    array = np.asarray(data)
    if array.ndim not in (3, 4):
        raise ValueError(f"{path}: only 3-D layers and 4-D (cine) series can be saved (this one has {array.ndim} "
                         "dimensions)")
    scale = meta.get("scale")
    if scale is not None:
        scale = spacing_mm(scale, meta.get("units"))[-3:]  # a layer in micrometres is written in mm
    affine = affine_from_layer(meta.get("metadata"), scale)
    save_volume(path, array.astype(dtype), affine, class_names)  # a (t, z, y, x) series: frames on the fourth axis
    return [path]


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
    dtype = np.uint8 if np.asarray(data).max(initial=0) <= 255 else np.int32
    return _write(path, data, meta, dtype, layer_class_names(meta.get("features")))


def write_image(path: str, data, meta: dict) -> list[str]:
    return _write(path, data, meta, np.float32)
