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


def slice_digests(data) -> list[str]:
    """A short digest of each slice of a (z, y, x) array (a cine's slices frame by frame): kept in the metadata of a
    Labels layer read from a DICOM SEG or RT structure set, so the slices still as read can be told from those
    painted since."""
    import hashlib

    return [hashlib.blake2b(np.ascontiguousarray(np.asarray(plane)).tobytes(), digest_size=8).hexdigest()
            for plane in data]


def mm_per_unit(unit) -> float | None:
    """Millimetres in one ``unit`` (a pint unit, as napari gives each axis of a layer), or None
    for one that is not a length: napari's default, 'pixel', or none at all."""
    if unit is None:
        return None
    try:
        return float((1 * unit).to("mm").magnitude)
    except Exception:  # pint's DimensionalityError for 'pixel', or a unit that is not pint's
        return None


def spacing_mm(scale, units=None) -> tuple[float, ...]:
    """A layer's ``scale`` in mm, axis by axis: an axis whose unit is a length (micrometres, say) converted to
    mm, and one without a length unit (napari's 'pixel', the default) taken as mm, as this plugin has always
    read it and as its reader writes it (the spacing in mm, the units left at the default)."""
    units = list(units) if units is not None else [None] * len(scale)
    return tuple(float(s) * (mm_per_unit(u) or 1.0) for s, u in zip(scale, units))


def layer_spacing_mm(layer) -> tuple[float, ...]:
    """``layer``'s voxel size in mm, every axis (see :func:`spacing_mm`): its scale's magnitude, as a negative
    scale is napari's way of showing an axis flipped (it was refused as "not a size" by a model in millimetres)."""
    return tuple(abs(v) for v in spacing_mm(layer.scale, getattr(layer, "units", None)))


def has_spacing(layer) -> bool:
    """Whether ``layer``'s in-plane scale says something: a length unit, or a scale other than 1 (a layer made
    from a plain array has scale 1 in 'pixel', which is read as 1 mm)."""
    units = getattr(layer, "units", None)
    if units is not None and any(mm_per_unit(u) is not None for u in list(units)[-2:]):
        return True
    return tuple(float(v) for v in layer.scale[-2:]) != (1.0, 1.0)


def volume_to_layer(volume: Volume, as_labels: bool | None = None, name: str | None = None):
    """A napari layer-data tuple ``(data, kwargs, layer_type)``; scale is the (z, y, x) spacing in mm. Its units
    stay napari's default (pixel, read as mm): napari warns on every new layer while layers' units differ, and
    most layers (other readers', arrays from the console) have the default."""
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


def full_resolution(layer):
    """A layer's data as napari holds it, not read: a NumPy array, or a lazy array (dask, zarr,
    a memory map) read only when converted. A multiscale layer gives its largest level."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def shown_index(viewer, layer) -> tuple[int, ...]:
    """Which slice of ``layer`` the viewer shows: ``(z,)`` for a volume, ``(t, z)`` for a cine series
    (t, z, y, x), each clipped to the layer's extent."""
    point = layer.world_to_data(viewer.dims.point)
    shape = full_resolution(layer).shape
    return tuple(int(np.clip(round(float(point[i])), 0, shape[i] - 1)) for i in range(layer.ndim - 2))


def show_index(viewer, layer, index: tuple[int, ...]) -> None:
    """Move the viewer to slice ``index`` of ``layer`` (``(z,)``, or ``(t, z)`` for a cine). The layer's
    axes are the viewer's last ones: a volume's z is the viewer's second axis while a cine is open. The point
    keeps its place in the slice: where the layer is sheared or rotated out of its slices' plane, the world's
    slice position depends on it too (taking the slice's corner, a sheared layer showed another slice)."""
    offset = viewer.dims.ndim - layer.ndim
    here = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)[-layer.ndim:]
    here[: len(index)] = index
    world = layer.data_to_world(here)
    for i in range(layer.ndim):
        viewer.dims.set_point(offset + i, world[i])


def extent_mm(layer) -> float:
    """The longer in-plane side of ``layer``'s slices in mm (its scale as the spacing): the field of view a
    model given a physical scale by the "In millimetres" options takes in whole."""
    (h, w), (sy, sx) = layer.data.shape[-2:], layer_spacing_mm(layer)[-2:]
    return float(max(h * sy, w * sx))


class LayerArray:
    """A layer's voxels to be read later, off napari's GUI thread: for a lazy layer, reading is
    the whole cost (seconds per GB from disk), and napari would stop answering while it ran.
    ``frame``: one frame of a cine series (t, z, y, x), the others never read. ``spacing`` is the
    layer's in-plane (y, x) scale in mm: the mm per pixel a model with a physical scale needs.

    ``read()`` returns the NumPy array (in ``dtype`` if given; float32 from float64 values beyond its range is
    scaled by a power of two, :func:`coral_core.volume.as_float32`), or raises a UserError that names
    the layer when its data cannot be read."""

    def __init__(self, layer, dtype=None, frame: int | None = None) -> None:
        self.name, self.data, self.dtype = layer.name, full_resolution(layer), dtype
        self.spacing = layer_spacing_mm(layer)[-2:]
        if frame is not None:
            self.name, self.data = f"{layer.name} frame {frame}", self.data[frame]
        self.shape = tuple(self.data.shape)

    def read(self) -> np.ndarray:
        from coral_core.errors import UserError
        from coral_core.volume import as_float32

        try:
            wide = self.dtype == np.float32 and self.data.dtype.kind == "f" and self.data.dtype.itemsize > 4
            return as_float32(self.data) if wide else np.asarray(self.data, dtype=self.dtype)
        except MemoryError as exc:
            raise UserError(f"layer {self.name!r} {self.shape} does not fit in this computer's memory; "
                            "crop or downsample it first") from exc
        except Exception as exc:
            raise UserError(f"could not read the data of layer {self.name!r} ({type(exc).__name__}: {exc}); "
                            "check that the files it was opened from are still there") from exc


class SourceFilled:
    """Labels picked by name from a layer read from a DICOM SEG or RT structure set, filled from that file when the
    job reads them, not on napari's thread (filling an RT structure set of 1,100-1,200 contours on 200 slices of
    512 x 512 took 0.7-0.9 s on a 2-core CPU, benchmarks/dicom_labels.py): ``painted`` is the snapshot as the layer
    shows it, and ``read()`` gives it with the ``slices`` still as read taken from ``source``, each of the structures
    ``entries`` filled alone (as ``coral finetune --structures`` does), so one drawn over another (a PTV over the
    heart) keeps its voxels. When the file cannot be read as it was, ``read()`` gives ``painted``. Of a cine:
    ``painted`` is frame ``frame`` of a layer of shape ``grid`` (t, z, y, x) drawn on the images read from
    ``image_source`` (each frame's labels are in the file's frame of the images they name)."""

    def __init__(self, painted: np.ndarray, source, affine: np.ndarray, entries: list[str], slices: list[int],
                 frame: int | None = None, grid: tuple | None = None, image_source=None) -> None:
        self.painted, self.source, self.affine, self.entries, self.slices = painted, source, affine, entries, slices
        self.frame, self.grid, self.image_source = frame, grid, image_source
        self.shape = painted.shape

    def read(self) -> np.ndarray:
        from pathlib import Path

        from coral_core.errors import UserError
        from coral_core.volume import load_labels_like

        cine = self.frame is not None
        like = Volume(np.broadcast_to(np.uint8(0), self.grid if cine else self.shape), self.affine,
                      Path(self.image_source) if cine and self.image_source else self.source)
        try:  # picked structures drawn over one another: the later one's, as the reader said when it opened the file
            alone = load_labels_like(self.source, like, self.entries, quiet=True).array
        except (UserError, OSError, ValueError):
            return self.painted
        if cine:
            alone = alone[self.frame]
        filled = self.painted.copy()
        filled[self.slices] = alone[self.slices]
        return filled
