"""Turning coral_core volumes into napari layer data and back (no Qt here)."""

from __future__ import annotations

import re

import numpy as np

from coral_core.volume import Volume

LABEL_NAME = re.compile(r"(_gt|_seg|label|labels|mask|segmentation)$", re.IGNORECASE)


def looks_like_labels(volume: Volume) -> bool:
    """A label map: integer voxels with few distinct values, or a name that says so."""
    a = volume.array
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        return False
    if a.size and (a.min() < 0):
        return False
    if LABEL_NAME.search(volume.name):
        return True
    return len(np.unique(a[:: max(1, a.shape[0] // 8)])) <= 16 and a.max() < 256


def layer_metadata(volume: Volume) -> dict:
    return {"affine": volume.affine.tolist(), "source_path": str(volume.path) if volume.path else None}


def volume_to_layer(volume: Volume, as_labels: bool | None = None, name: str | None = None):
    """A napari layer-data tuple ``(data, kwargs, layer_type)``; scale is the (z, y, x) spacing."""
    labels = looks_like_labels(volume) if as_labels is None else as_labels
    kwargs = {"name": name or volume.name, "scale": volume.spacing, "metadata": layer_metadata(volume)}
    if labels:
        return volume.array.astype(np.int32 if volume.array.max(initial=0) > 255 else np.uint8), kwargs, "labels"
    return volume.array, kwargs, "image"


def affine_from_layer(metadata: dict | None, scale=None) -> np.ndarray:
    """The source affine kept in a layer's metadata, or a diagonal one from its scale."""
    meta = metadata or {}
    if meta.get("affine") is not None:
        return np.asarray(meta["affine"], dtype=np.float64)
    affine = np.eye(4)
    if scale is not None and len(scale) == 3:
        affine[0, 0], affine[1, 1], affine[2, 2] = scale[2], scale[1], scale[0]
    return affine
