"""npe2 writers: Labels and Image layers to NIfTI, restoring the source geometry."""

from __future__ import annotations

import numpy as np

from coral_core.volume import save_volume
from napari_coral._layers import affine_from_layer


def _write(path: str, data, meta: dict, dtype) -> list[str]:
    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"{path}: only 3-D layers can be saved as NIfTI (this one has {array.ndim} dimensions)")
    affine = affine_from_layer(meta.get("metadata"), meta.get("scale"))
    save_volume(path, array.astype(dtype), affine)
    return [path]


def write_labels(path: str, data, meta: dict) -> list[str]:
    dtype = np.uint8 if np.asarray(data).max(initial=0) <= 255 else np.int32
    return _write(path, data, meta, dtype)


def write_image(path: str, data, meta: dict) -> list[str]:
    return _write(path, data, meta, np.float32)
