"""Slice datasets for pretraining and fine-tuning, and discovery of dataset folders.

Volumes are normalised once, and their slices resampled to the model's square input size
and kept as one float tensor, so a training step indexes a batch instead of collating
items. ``PretrainSlices`` carries what every pretraining method needs per slice (relative
position, partition index, volume id); ``LabelledSlices`` carries slices with labels.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

from coral_core.errors import ScaleError, UserError
from coral_core.losses import partition_index
from coral_core.volume import (VOLUME_SUFFIXES, Volume, as_float32, dicom_slice_series, float32_scale,
                               is_dicom_file, is_dicom_labels, is_volume_path, load_frames, load_volume,
                               normalise_intensity)

__all__ = [
    "slice_positions",
    "resize_slices",
    "resample_slices",
    "resize_labels",
    "at_pixel_spacing",
    "FieldOfView",
    "field_of_view",
    "windows_per_slice",
    "tiling_note",
    "prepare_labelled",
    "PretrainSlices",
    "LabelledSlices",
    "Case",
    "discover_acdc",
    "discover_pairs",
    "discover_flat",
    "discover_volumes",
    "case_volumes",
    "output_name",
    "evaluation_pairs",
    "parse_slices",
    "parse_label_values",
    "label_map",
    "MAX_CLASSES",
]


def slice_positions(n_slices: int) -> Tensor:
    """Relative position (i + 1) / S of each slice i of an S-slice volume."""
    return (torch.arange(n_slices, dtype=torch.float32) + 1) / n_slices


def resize_slices(array: np.ndarray, size: int, slices: list[int] | None = None) -> Tensor:
    """(S, H, W) intensities -> (S, 1, size, size) normalised float32 slices.

    Normalisation uses the whole volume; only ``slices`` (all by default) are resampled.
    """
    x = normalise_intensity(array)
    return resample_slices(torch.from_numpy(x if slices is None else x[list(slices)]).unsqueeze(1), size)


def resample_slices(x: Tensor, size: int) -> Tensor:
    """(S, 1, H, W) normalised slices -> (S, 1, size, size), on their own device
    (bilinear with antialiasing; unchanged when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_labels(labels: np.ndarray, size: int) -> Tensor:
    """(S, H, W) integer labels -> (S, size, size) int64 by nearest neighbour."""
    y = torch.from_numpy(np.asarray(labels).astype(np.int64)).unsqueeze(1).float()
    if y.shape[-2:] != (size, size):
        y = F.interpolate(y, size=(size, size), mode="nearest")
    return y.squeeze(1).long()


# Classes a label map may hold besides background: labels are stored as uint8.
MAX_CLASSES = 255


def parse_label_values(text: str, option: str = "--label-values") -> list[int]:
    """``"205,420,500"`` -> [205, 420, 500]: the values a dataset's label files use for classes 1, 2, ...
    in that order (distinct whole numbers above 0), or one sentence says what is wrong."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{option} {text}: give whole numbers separated by commas, e.g. 205,420,500") from None
    if not values:
        raise UserError(f"{option}: give the label values of classes 1, 2, ... separated by commas, e.g. 205,420,500")
    if min(values) <= 0:
        raise UserError(f"{option} {text}: 0 is background and is not listed; give the values of the foreground "
                        "classes, each above 0")
    if len(set(values)) != len(values):
        raise UserError(f"{option} {text}: a value is listed twice; give each class's value once")
    if len(values) > MAX_CLASSES:
        raise UserError(f"{option}: {len(values)} values; at most {MAX_CLASSES} classes are supported")
    return values


def label_map(raw: np.ndarray, source, values: list[int] | None = None) -> np.ndarray:
    """A label volume as uint8 classes 0 (background), 1, 2, ..., or one sentence naming ``source``
    says why it is not a label map. ``values`` (:func:`parse_label_values`): the values that stand
    for classes 1, 2, ... (MM-WHS's 205, 420, ... 850); any other value becomes background, with a
    warning that names it."""
    raw = np.asarray(raw)
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.rint(raw)):
        raise UserError(f"{source}: holds non-integer values, so it is an image, not a label map; give the labels "
                        "(0 background, 1, 2, ...)")
    if values is not None:
        found, counts = np.unique(raw, return_counts=True)
        other = [(int(v), int(n)) for v, n in zip(found, counts) if v != 0 and int(v) not in values]
        if other:
            listed = ", ".join(f"{v} ({n} voxels)" for v, n in other[:8]) + (" ..." if len(other) > 8 else "")
            print(f"warning: {source}: values {listed} are not in --label-values; read as background",
                  file=sys.stderr)
        lut = {v: k for k, v in enumerate(values, 1)}
        out = np.zeros(raw.shape, dtype=np.uint8)
        for v in found:
            if int(v) in lut:
                out[raw == v] = lut[int(v)]
        return out
    if raw.min() < 0:
        raise UserError(f"{source}: holds negative label values, so it is not a label map; labels must be 0 "
                        "(background), 1, 2, ...")
    if raw.max() > MAX_CLASSES:
        raise UserError(f"{source}: holds label value {int(raw.max())}, above the {MAX_CLASSES} classes supported; "
                        "if its values are codes (MM-WHS: 205, 420, ...), give --label-values with the values of "
                        "classes 1, 2, ... in order")
    return raw.astype(np.uint8)


@dataclass(frozen=True)
class FieldOfView:
    """A square of a slice that a model with a physical scale sees.

    A model whose config has ``pixel_spacing`` (mm per pixel of its input) sees ``image_size x
    pixel_spacing`` mm of a slice at a time, whatever the scan's own spacing and field of view: a square
    of that side cut from a larger slice or padded around a smaller one, then resized whole to the
    model's input as any slice is. So one heart has one size in the model's pixels on every scanner, as
    in the published methods' preprocessing. ``shape`` is the slice's (H, W), ``window`` that square's
    size in the slice's own pixels (h, w), and ``start`` its top-left corner in the slice (negative
    where the window overhangs a smaller slice); None: centred on the slice. Segmentation covers a
    larger slice with several windows (:meth:`tiles`); fine-tuning places one on the painted labels
    (:meth:`around`)."""

    shape: tuple[int, int]
    window: tuple[int, int]
    start: tuple[int, int] | None = None

    @classmethod
    def of(cls, shape, spacing, mm: float, size: int) -> "FieldOfView":
        """The centred field of view of a model of input ``size`` at ``mm`` per pixel on slices of (H, W)
        ``shape`` whose in-plane spacing is ``spacing`` (y, x) in mm."""
        if mm <= 0:
            raise ValueError(f"the model's pixel spacing must be above 0, got {mm}")
        check_scale(spacing, mm)
        sy, sx = (float(v) for v in spacing[-2:])
        side = size * mm
        return cls((int(shape[0]), int(shape[1])), (max(1, round(side / sy)), max(1, round(side / sx))))

    @property
    def origin(self) -> tuple[int, int]:
        """The window's top-left corner in the slice's pixels (centred when ``start`` is None)."""
        if self.start is not None:
            return self.start
        return tuple((n - w) // 2 for n, w in zip(self.shape, self.window))

    @property
    def whole(self) -> bool:
        """Whether the window is the slice itself (nothing to cut or pad)."""
        return self.window == self.shape and self.origin == (0, 0)

    @property
    def covers(self) -> bool:
        """Whether this one window holds every pixel of the slice (cut nothing away)."""
        return all(s <= 0 and s + w >= n for s, w, n in zip(self.origin, self.window, self.shape))

    def spans(self):
        """Per axis (slice start, window start, length) of the part the slice and the window share."""
        return [(max(s, 0), max(-s, 0), min(n, s + w) - max(s, 0))
                for s, w, n in zip(self.origin, self.window, self.shape)]

    def crop(self, array: np.ndarray, fill: float | None = None) -> np.ndarray:
        """The window of every slice of ``array`` (..., H, W): cut out, or padded with ``fill``
        (default: the array's lowest finite value, as a scan's background)."""
        if self.whole:
            return array
        (ys, yw, yn), (xs, xw, xn) = self.spans()
        if fill is None:
            finite = array[np.isfinite(array)] if np.issubdtype(array.dtype, np.floating) else array
            fill = finite.min() if finite.size else 0
        out = np.full((*array.shape[:-2], *self.window), fill, dtype=array.dtype)
        out[..., yw : yw + yn, xw : xw + xn] = array[..., ys : ys + yn, xs : xs + xn]
        return out

    def paste(self, window: np.ndarray) -> np.ndarray:
        """Labels of the window (..., h, w) put back on the slice's grid (..., H, W): background
        (0) where the slice reaches beyond the window, the padding dropped."""
        if self.whole:
            return window
        (ys, yw, yn), (xs, xw, xn) = self.spans()
        out = np.zeros((*window.shape[:-2], *self.shape), dtype=window.dtype)
        out[..., ys : ys + yn, xs : xs + xn] = window[..., yw : yw + yn, xw : xw + xn]
        return out

    def outside(self, labels: np.ndarray) -> int:
        """How many labelled (non-zero) voxels of ``labels`` (..., H, W) lie outside the window."""
        if self.covers:
            return 0
        (ys, _, yn), (xs, _, xn) = self.spans()
        return int(np.count_nonzero(labels)) - int(np.count_nonzero(labels[..., ys : ys + yn, xs : xs + xn]))

    def around(self, labels: np.ndarray) -> "FieldOfView":
        """This window, moved where ``labels`` (..., H, W) are: unchanged when it already holds every
        labelled voxel (or none is labelled); otherwise placed where it holds the most of them (of such
        places, the nearest to centring the labels' bounding box), inside the slice along each axis where
        the slice is the larger."""
        if not self.outside(labels):
            return self
        counts = np.count_nonzero(labels.reshape(-1, *self.shape), axis=0)
        integral = np.pad(counts.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        ranges, wanted = [], []
        for axis, (w, n, s) in enumerate(zip(self.window, self.shape, self.origin)):
            hits = np.flatnonzero(counts.any(axis=1 - axis))
            ranges.append(np.arange(n - w + 1) if w <= n else np.array([s]))
            wanted.append((hits[0] + hits[-1] + 1 - w) / 2)
        ys, xs = np.meshgrid(*ranges, indexing="ij")
        y0, x0 = np.clip(ys, 0, None), np.clip(xs, 0, None)
        y1, x1 = np.clip(ys + self.window[0], None, self.shape[0]), np.clip(xs + self.window[1], None, self.shape[1])
        held = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        distance = np.abs(ys - wanted[0]) + np.abs(xs - wanted[1])
        best = np.lexsort((distance.ravel(), -held.ravel()))[0]
        return FieldOfView(self.shape, self.window, (int(ys.ravel()[best]), int(xs.ravel()[best])))

    def tiles(self, overlap: float = 0.5) -> list["FieldOfView"]:
        """Windows that together cover the slice: the centred one and, along each axis where the slice
        is the larger, others stepped out from it by ``1 - overlap`` of the window's side, the last ones
        flush with the slice's edges; along an axis where the slice is the smaller, the one window that
        pads it. One window (this one) when it covers the slice."""
        per_axis = []
        for s, w, n in zip(self.origin, self.window, self.shape):
            if w >= n:
                per_axis.append([s])
                continue
            step = max(1, int(w * (1 - overlap)))
            down = list(range(s, 0, -step)) + [0]
            up = list(range(s, n - w, step)) + [n - w]
            per_axis.append(sorted(set(down + up)))
        if per_axis == [[o] for o in self.origin]:
            return [self]
        return [FieldOfView(self.shape, self.window, (y, x)) for y in per_axis[0] for x in per_axis[1]]


# How much finer or coarser than a model's millimetres per pixel an image's may be. Finer: the model's square is
# that many times its input size in the image's pixels (memory, where the slice is smaller than the square; "In
# millimetres" on a 4096-pixel slice and a 128-pixel input is 32). Coarser: the square is that many times smaller
# than the input, and a slice is segmented in ever more windows of ever fewer pixels.
MAX_FINER, MAX_COARSER = 32, 8


def check_scale(spacing, mm: float) -> None:
    """Refuse an in-plane ``spacing`` ((y, x) mm, the last two of a (z, y, x) one) that a model of ``mm`` per pixel
    cannot see an image at: not a positive size, or more than :data:`MAX_FINER` times finer or :data:`MAX_COARSER`
    times coarser than ``mm`` (metres or microns written as millimetres: the model's square would need millions of
    pixels, or one pixel would hold it). Raises :class:`ScaleError`."""
    sy, sx = (float(v) for v in spacing[-2:])
    if not all(math.isfinite(s) and s > 0 for s in (sy, sx)):
        raise ScaleError(f"its pixel spacing {sy:g} x {sx:g} mm is not a size; fix the spacing in its header")
    finer, coarser = mm / min(sy, sx), max(sy, sx) / mm
    if finer > MAX_FINER or coarser > MAX_COARSER:
        how = f"{finer:.3g} times finer" if finer > MAX_FINER else f"{coarser:.3g} times coarser"
        raise ScaleError(f"its pixels of {sy:.4g} x {sx:.4g} mm are {how} than the model's {mm:g} mm (at most "
                         f"{MAX_FINER} times finer or {MAX_COARSER} times coarser); check the spacing in its header "
                         "(metres or microns written as millimetres?), or use a model without a physical scale")


def field_of_view(config, shape, spacing) -> FieldOfView | None:
    """The :class:`FieldOfView` a model of ``config`` (a UNetConfig) sees on slices of (H, W) ``shape``
    at in-plane ``spacing`` (y, x) mm; None for a model without a physical scale, or a slice of
    unknown spacing (``spacing`` None), which it sees whole."""
    mm = getattr(config, "pixel_spacing", None)
    if mm is None or spacing is None:
        return None
    return FieldOfView.of(shape[-2:], spacing[-2:], mm, config.image_size)


def windows_per_slice(config, shape, spacing) -> int:
    """How many windows (:meth:`FieldOfView.tiles`) a model of ``config`` segments each slice of (H, W)
    ``shape`` at (y, x) ``spacing`` mm in: 1 for a model without a physical scale, or a slice that one
    window covers."""
    fov = field_of_view(config, shape, spacing)
    return 1 if fov is None or fov.covers else len(fov.tiles())


def tiling_note(config, shape, spacing) -> str:
    """A clause saying that a model with a physical scale segmented slices of (H, W) ``shape`` at (y, x)
    ``spacing`` mm in several windows; "" when one window covers them, or the model has no scale."""
    n = windows_per_slice(config, shape, spacing)
    if n == 1:
        return ""
    (h, w), (sy, sx) = tuple(shape[-2:]), (float(v) for v in spacing[-2:])
    return (f"each {h * sy:.4g} x {w * sx:.4g} mm slice was segmented in {n} overlapping windows of the "
            f"{config.image_size * config.pixel_spacing:.4g} mm square the model sees")


def at_pixel_spacing(image: np.ndarray, spacing, mm: float, size: int, labels: np.ndarray | None = None,
                     chunk: int = 16) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float], int]:
    """A (z, y, x) volume resampled in-plane to ``mm`` per pixel, then centre-cropped or padded to
    ``size`` x ``size``: the published methods' preprocessing (PCL's and CORAL's code resample ACDC to
    1.25 mm and take 352 x 352), so every subject's anatomy has one scale in pixels.

    ``spacing`` is the volume's (z, y, x) spacing in mm; the slices are kept. The image is resampled
    bilinearly (antialiased when shrinking) and padded with its lowest value; ``labels`` (classes),
    if given, class by class as soft masks that the largest wins, which keeps thin structures better
    than nearest neighbour. Returns (image as float32, times a power of two if float32 cannot hold its values,
    labels as uint8 or None, the new spacing, how many foreground label voxels the crop cut away)."""
    if mm <= 0:
        raise ValueError("mm must be above 0")
    check_scale(spacing, mm)
    image = np.asarray(image)
    sz, sy, sx = (float(v) for v in spacing)
    grid = (max(1, round(image.shape[1] * sy / mm)), max(1, round(image.shape[2] * sx / mm)))

    def crop_or_pad(x: Tensor, fill: float) -> Tensor:  # (S, C, H, W) -> (S, C, size, size), centred
        for axis in (2, 3):
            n = x.shape[axis]
            if n > size:
                x = x.narrow(axis, (n - size) // 2, size)
            elif n < size:
                before = (size - n) // 2
                pad = [0, 0, 0, 0]
                pad[2 * (3 - axis)] = before
                pad[2 * (3 - axis) + 1] = size - n - before
                x = F.pad(x, pad, value=fill)
        return x

    def resample(x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == grid:
            return x
        return F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=True)

    out = np.empty((image.shape[0], size, size), np.float32)
    scale = float32_scale(image)  # 1.0 but for float64 values float32 cannot hold: those are scaled down
    fill = float(np.nanmin(image)) * scale if image.size else 0.0
    for start in range(0, image.shape[0], chunk):
        part = torch.from_numpy(np.ascontiguousarray(as_float32(image[start : start + chunk], scale))).unsqueeze(1)
        out[start : start + chunk] = crop_or_pad(resample(part), fill)[:, 0].numpy()
    new_spacing = (sz, mm, mm)
    if labels is None:
        return out, None, new_spacing, 0
    labels = np.asarray(labels)
    if labels.shape != image.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the image's {image.shape}")
    classes = [int(c) for c in np.unique(labels)]
    lab = np.zeros((image.shape[0], size, size), np.uint8)
    cut = 0
    for start in range(0, labels.shape[0], chunk):
        part = torch.from_numpy(np.ascontiguousarray(labels[start : start + chunk]))
        best = None
        winner = torch.zeros((part.shape[0], *grid), dtype=torch.uint8)
        for c in classes:
            soft = resample((part == c).float().unsqueeze(1))[:, 0]
            if best is None:
                best = soft
                winner.fill_(c)
            else:
                wins = soft > best
                best = torch.where(wins, soft, best)
                winner[wins] = c
        kept = crop_or_pad(winner.unsqueeze(1), 0)[:, 0]
        cut += int(torch.count_nonzero(winner)) - int(torch.count_nonzero(kept))
        lab[start : start + chunk] = kept.numpy()
    return out, lab, new_spacing, cut


def prepare_labelled(volume: np.ndarray, labels: np.ndarray, size: int, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """An image and its label volume as fine-tuning will use them, made once: ((S, 1, size, size)
    normalised float32 slices, (S, size, size) uint8 labels), each slice exactly as
    :class:`LabelledSlices` would resample it. A caller reading many large labelled scans prepares
    each as it reads it, so the full-resolution volumes never sit in memory together. Labels are
    resampled ``chunk`` slices at a time (they pass through int64 on the way) and must be 0..255."""
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the image's {volume.shape}")
    out = torch.empty((labels.shape[0], size, size), dtype=torch.uint8)
    for start in range(0, labels.shape[0], chunk):
        out[start : start + chunk] = resize_labels(labels[start : start + chunk], size)
    return resize_slices(volume, size), out


def parse_slices(text: str, n_slices: int, source: str = "the image") -> list[int]:
    """Slice numbers from text such as ``3,7,9`` or ``2-5`` (0-based), checked against ``n_slices``."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise UserError(f"slices {text!r}: the range {part} runs backwards; write it low to high, "
                                    f"{hi}-{lo}")
                if not (0 <= lo and hi < n_slices):  # checked before the range is listed: 1-99999999999 is not
                    bad = [i for i in (lo, hi) if not 0 <= i < n_slices]
                    raise UserError(f"slices {bad}: outside the {n_slices} slices (0..{n_slices - 1}) of {source}")
                out.extend(range(lo, hi + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise UserError(f"slices {text!r}: not a list of slice numbers such as 3,7,9 or 2-5") from None
    bad = [i for i in out if not 0 <= i < n_slices]
    if bad:
        raise UserError(f"slices {bad}: outside the {n_slices} slices (0..{n_slices - 1}) of {source}")
    return sorted(set(out))


class PretrainSlices(Dataset):
    """Every slice of a set of unlabeled volumes with its relative position.

    ``volumes`` are (S, H, W) intensity arrays, or volumes already prepared by
    :func:`resize_slices` ((S, 1, h, w) normalised tensors, resampled again only when ``h, w``
    differ from ``image_size``): a caller reading many large files prepares each as it reads it,
    so the full-resolution volumes never sit in memory together.

    Items are ``(slice (1, H, W), position, partition, volume_id)``; the whole set is also
    available as tensors (``images``, ``positions``, ``partitions``, ``volume_ids``).
    """

    def __init__(self, volumes: list[np.ndarray | Tensor], image_size: int, n_partitions: int = 4,
                 consume: bool = False, dtype: torch.dtype = torch.float32,
                 storage: str | os.PathLike | None = None) -> None:
        """``consume``: empty the list ``volumes`` as each volume is copied in, so that its memory
        can be freed at once (the set's memory plus one volume's, instead of both sets').
        ``dtype``: how ``images`` are stored; torch.float16 halves their memory (intensities in
        0..1 keep about three significant digits) and training takes them back to float32.
        ``storage``: a ``.npy`` file to write the slices into, memory-mapped, instead of RAM
        (:mod:`coral_core.slicecache` builds on it); call :meth:`flush` when done."""
        if not len(volumes):
            raise UserError("no volumes to pretrain on; give at least one image or --phantom N")
        counts = [int(vol.shape[0]) for vol in volumes]
        shape = (sum(counts), 1, image_size, image_size)
        if storage is None:
            self.images = torch.empty(shape, dtype=dtype)  # (M, 1, H, W), filled below
        else:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            self._mapped = np.lib.format.open_memmap(storage, mode="w+", dtype=np_dtype, shape=shape)
            self.images = torch.from_numpy(self._mapped)
        start = 0
        for vid, n in enumerate(counts):
            vol = volumes.pop(0) if consume else volumes[vid]
            prepared = isinstance(vol, Tensor)
            self.images[start : start + n] = resample_slices(vol, image_size) if prepared else resize_slices(vol, image_size)
            del vol
            start += n
        self._index(counts, n_partitions)

    @classmethod
    def from_array(cls, images: np.ndarray, counts: list[int], n_partitions: int = 4) -> "PretrainSlices":
        """A slice set over prepared ``images`` ((M, 1, H, W), e.g. a memory-mapped ``.npy``, used
        as it is, not copied) holding volumes of ``counts`` slices in order."""
        if images.ndim != 4 or images.shape[1] != 1 or sum(counts) != images.shape[0]:
            raise ValueError(f"slices of shape {images.shape} do not hold volumes of {sum(counts)} slices in all")
        data = cls.__new__(cls)
        data.images = torch.from_numpy(images)
        data._index([int(n) for n in counts], n_partitions)
        return data

    def _index(self, counts: list[int], n_partitions: int) -> None:
        self.positions = torch.cat([slice_positions(n) for n in counts])  # (M,)
        self.partitions = torch.cat([partition_index(torch.arange(n), n, n_partitions) for n in counts])  # (M,)
        self.volume_ids = torch.cat([torch.full((n,), vid, dtype=torch.long) for vid, n in enumerate(counts)])  # (M,)

    def flush(self) -> None:
        """Write memory-mapped slices through to their file (nothing to do for slices in RAM)."""
        mapped = getattr(self, "_mapped", None)
        if mapped is not None:
            mapped.flush()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.positions[i], self.partitions[i], self.volume_ids[i]


class LabelledSlices(Dataset):
    """Annotated slices of one or more volumes: items are ``(slice (1, H, W), label (H, W))``.

    ``volumes`` are (S, H, W) intensity arrays with (S, H, W) label volumes, or pairs already made
    by :func:`prepare_labelled` ((S, 1, h, w) normalised tensors with (S, h, w) labels, resampled
    again only when ``h, w`` differ from ``image_size``).
    """

    def __init__(
        self,
        volumes: list[np.ndarray | Tensor],
        labels: list[np.ndarray | Tensor],
        annotated: list[list[int]],
        image_size: int,
    ) -> None:
        if not (len(volumes) == len(labels) == len(annotated)):
            raise ValueError("volumes, labels and annotated slice lists must have the same length")
        images, targets = [], []
        for vol, lab, idx in zip(volumes, labels, annotated):
            prepared = isinstance(vol, Tensor)
            shape = (vol.shape[0], *vol.shape[2:]) if prepared else tuple(vol.shape)
            if tuple(lab.shape) != shape:
                raise UserError(f"labels of shape {tuple(lab.shape)} do not match the image's {shape}; give the labels drawn on this image")
            bad = [i for i in idx if not 0 <= i < vol.shape[0]]
            if bad:
                raise UserError(f"annotated slice(s) {bad} outside the image's {vol.shape[0]} slices")
            if not idx:
                continue
            idx = list(idx)
            images.append(resample_slices(vol[idx], image_size) if prepared else resize_slices(vol, image_size, idx))
            targets.append(resize_labels(lab[idx], image_size))
        if not images:
            raise UserError("no annotated slices; paint at least one slice or pass --slices")
        self.images = torch.cat(images)  # (M, 1, H, W)
        self.labels = torch.cat(targets)  # (M, H, W)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


# --------------------------------------------------------------------------- discovery


@dataclass
class Case:
    """One image file, its label file if any, and the subject it belongs to. ``frames``: every frame
    of the file (a 4-D cine series) is a volume of its own (:func:`case_volumes`)."""

    image: Path
    label: Path | None
    subject: str
    frames: bool = False


def case_volumes(case: Case) -> list[tuple[str, Volume]]:
    """(name, volume) of each volume a case holds: its image, or with ``case.frames`` each frame of
    it, named ``SUBJECT_t00``, ``SUBJECT_t01``, ... (one frame: ``SUBJECT``)."""
    if not case.frames:
        return [(case.subject, load_volume(case.image))]
    frames = load_frames(case.image)
    if len(frames) == 1:
        return [(case.subject, frames[0])]
    return [(f"{case.subject}_t{t:02d}", frame) for t, frame in enumerate(frames)]


_ACDC_FRAME = re.compile(r"^(?P<subject>patient\d+)_frame(?P<frame>\d+)(?P<gt>_gt)?\.nii(\.gz)?$")
_ACDC_CINE = re.compile(r"^(?P<subject>patient\d+)_4d\.nii(\.gz)?$")


def discover_acdc(root: str | os.PathLike, cine: bool = False) -> list[Case]:
    """ACDC layout: ``root/patientXXX/patientXXX_frameYY.nii.gz`` with ``..._gt.nii.gz`` labels.

    The 4-D cine file (``_4d``) is skipped; frames without ``_gt`` get ``label=None``. With
    ``cine``, a patient with a cine file is that file instead, every frame of it a volume
    (``frames``; its ED and ES frames are among them): the published methods' unlabelled
    pretraining set. ``root`` may also be one patient's folder.
    """
    root = Path(root)
    cases = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        cases.extend(_acdc_patient(patient, cine))
    return cases or _acdc_patient(root, cine)


def _acdc_patient(patient: Path, cine: bool = False) -> list[Case]:
    """The frames of one ACDC patient folder, each with its ``_gt`` file if there is one (with
    ``cine``: its 4-D cine file instead, when it has one)."""
    files = {f.name: f for f in patient.iterdir() if f.is_file()}
    if cine:
        movie = [f for name, f in sorted(files.items()) if _ACDC_CINE.match(name)]
        if movie:
            return [Case(movie[0], None, _ACDC_CINE.match(movie[0].name).group("subject"), frames=True)]
    cases = []
    for name, f in sorted(files.items()):
        m = _ACDC_FRAME.match(name)
        if not m or m.group("gt"):
            continue
        stem = name.split(".nii")[0]
        ext = name[len(stem):]
        gt = files.get(f"{stem}_gt{ext}")
        cases.append(Case(f, gt, m.group("subject")))
    return cases


def _stem(path: Path) -> str:
    """A volume's name less its suffix; a folder's (a DICOM series: ``1.000000-CT``) whole name."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else path.stem


# How label files end (``case_gt``, ``case_label``, ...) and how image files may end (nnU-Net's
# ``case_0000``, CHD's and MM-WHS's ``ct_1001_image``); the part before is the case's name.
_LABEL_ENDING = re.compile(r"(_gt|_label|_labels|_seg|_segmentation|_mask)$", re.IGNORECASE)
_IMAGE_ENDING = re.compile(r"(_0000|_img|_image)$", re.IGNORECASE)
_LABEL_NAME = re.compile(r"^(gt|label|labels|seg|segmentation|mask)$", re.IGNORECASE)


def discover_pairs(images_dir: str | os.PathLike, labels_dir: str | os.PathLike) -> list[Case]:
    """An images folder and a labels folder whose files share names (suffix and an optional
    ``_gt``/``_label``/``_seg`` ending aside)."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    labels = {_LABEL_ENDING.sub("", _stem(f)): f for f in sorted(labels_dir.iterdir()) if is_volume_path(f)}
    cases = []
    for f in sorted(images_dir.iterdir()):
        if is_volume_path(f):
            key = _IMAGE_ENDING.sub("", _stem(f))
            cases.append(Case(f, labels.get(key), key))
    return cases


def _label_files(files: list[Path]) -> dict[Path, str]:
    """Which of ``files`` are label files, each with the case name it names ("" for a bare name such as
    ``segmentation.nii.gz``, which names the one image beside it)."""
    found = {}
    for f in files:
        stem = _stem(f)
        if _LABEL_NAME.match(stem):
            found[f] = ""
        elif _LABEL_ENDING.search(stem):
            found[f] = _LABEL_ENDING.sub("", stem)
    return found


def discover_flat(folder: str | os.PathLike, subject: str | None = None) -> list[Case]:
    """The volumes directly in ``folder``, each image paired with a label file beside it when one is
    named after it: ``ct_1001_image.nii.gz`` with ``ct_1001_label.nii.gz`` (CHD, MM-WHS),
    ``case.nii.gz`` with ``case_gt.nii.gz`` or ``case_seg.nii.gz``, and the only image of a case's
    folder with a bare ``segmentation.nii.gz`` (``seg``, ``label``, ``mask``, ``gt``; KiTS). A DICOM SEG or RT
    structure set (a ``.dcm`` file, or a folder of one, as TCIA exports a SEG or RTSTRUCT series) labels the DICOM
    series folder beside it that it refers to, or else the image it is named after (``case_seg.dcm``). Label
    files are never read as scans (pretraining must not learn from label maps), paired or not.
    ``subject``: the case name of every image (a case's folder); by default each image's own."""
    entries = sorted(Path(folder).iterdir())
    segs = _dicom_segs(entries)
    files = [f for f in entries if is_volume_path(f) and f not in segs]
    label_files = _label_files(files)
    images = [f for f in files if f not in label_files]
    by_key: dict[str, list[Path]] = {}
    for f, key in label_files.items():
        by_key.setdefault(key, []).append(f)
    for f, key in _segs_by_reference(segs, images).items():
        by_key.setdefault(key, []).append(f)
    if len(images) == 1 and len(by_key.get("", [])) == 1:  # a bare segmentation.nii.gz beside one image
        by_key.setdefault(_IMAGE_ENDING.sub("", _stem(images[0])), []).extend(by_key[""])
    cases, used = [], set()
    for f in images:
        stem = _stem(f)
        key = _IMAGE_ENDING.sub("", stem)
        found = by_key.get(stem) or by_key.get(key) or []
        if len(found) > 1:
            raise UserError(f"{f}: {' and '.join(str(g.name) for g in found)} both name it as their image; "
                            "keep one label file per image in that folder")
        if found and found[0] in used:
            other = next(c.image.name for c in cases if c.label == found[0])
            raise UserError(f"{found[0]}: both {other} and {f.name} could be its image; rename one of them")
        if found:
            used.add(found[0])
        cases.append(Case(f, found[0] if found else None, subject or (key if found else stem)))
    return cases


def _dicom_segs(entries: list[Path]) -> dict[Path, str]:
    """The DICOM label files (SEG, RT structure set) among ``entries``, and the folders that hold them (a folder whose
    first DICOM file is one, as TCIA exports a SEG or RTSTRUCT series: never an image), each with the Series Instance
    UID of the image series it refers to ("" when it names none). One header is read per folder of DICOM files, and
    one per label file."""
    from coral_core.dicomlabels import referenced_series

    found = {}
    for entry in entries:
        if entry.is_dir():
            first = next((f for f in sorted(entry.iterdir()) if f.is_file() and is_dicom_file(f)), None)
            if first is None or not is_dicom_labels(first):
                continue  # no DICOM file, or an image series
            segs = [f for f in sorted(entry.iterdir()) if f.is_file() and is_dicom_labels(f)]
            found[entry] = ""
        elif is_dicom_labels(entry):
            segs = [entry]
        else:
            continue
        for seg in segs:
            found[seg] = referenced_series(seg)
    return found


def _segs_beside_folders(folder: Path) -> bool:
    """Whether a folder of DICOM files holds label files (SEG, RT structure set) beside folders (a study: series
    folders, a SEG file of one): a dataset folder, not a series."""
    return any(d.is_dir() for d in folder.iterdir()) and holds_dicom_labels(folder)


def _segs_by_reference(segs: dict[Path, str], images: list[Path]) -> dict[Path, str]:
    """Each DICOM SEG file of ``segs`` with the case name (stem) of the image series folder among ``images`` that it
    refers to; else, named as a label file (``case_seg.dcm``), that name; others left out."""
    if not segs:
        return {}
    series = {}
    for image in images:
        if image.is_dir():
            first = next((f for f in sorted(image.iterdir()) if f.is_file() and is_dicom_file(f)), None)
            uid = dicom_slice_series(first) if first is not None else None
            if uid:
                series[uid] = _stem(image)
    found = {}
    for f, uid in segs.items():
        if f.is_dir():
            continue
        named = _label_files([f])  # case_seg.dcm, or a bare segmentation.dcm beside one image
        if uid in series:
            found[f] = series[uid]
        elif named:
            found[f] = named[f]
    return found


def discover_volumes(paths: list[str | os.PathLike], all_frames: bool = False) -> list[Case]:
    """Expand the inputs a user gives (volume files, DICOM folders, dataset folders) into cases.
    ``all_frames``: every frame of a 4-D (cine) file is a volume (``Case.frames``), and an ACDC
    patient is its cine file's frames (:func:`discover_acdc`).

    A folder that is an ACDC root (or one patient's folder), or an ``imagesTr``/``labelsTr`` (or
    ``images``/``labels``) parent, is read with its labels; any other folder contributes the volumes
    directly in it, each with the label file named after it, if any (:func:`discover_flat`), or, when
    it holds none, those of each of its folders, named by that folder (a folder per case), found in it or up to two
    levels below it (a patient's study folders of DICOM series, as TCIA exports them).
    """
    cases: list[Case] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{p}: no such file or folder; check the path")
        if p.is_file() or is_volume_path(p) and not _segs_beside_folders(p):
            cases.append(Case(p, None, _stem(p), frames=all_frames))
            continue
        acdc = discover_acdc(p, cine=all_frames)
        if acdc:
            cases.extend(acdc)
            continue
        for img_name, lab_name in (("imagesTr", "labelsTr"), ("images", "labels")):
            if (p / img_name).is_dir() and (p / lab_name).is_dir():
                cases.extend(replace(case, frames=all_frames) for case in discover_pairs(p / img_name, p / lab_name))
                break
        else:
            found = discover_flat(p)
            if not found:  # a folder per case (KiTS's case_00000/imaging.nii.gz): each named by its folder
                for case_dir in sorted(d for d in p.iterdir() if d.is_dir()):
                    found.extend(_cases_below(case_dir, case_dir.name, depth=2))
            if all_frames:
                found = [replace(case, frames=True) for case in found]
            if not found:
                labels = [f.name for f in p.iterdir() if is_volume_path(f)]
                held = f" (only label files: {', '.join(sorted(labels)[:3])}{' ...' if len(labels) > 3 else ''})" if labels else ""
                raise UserError(f"{p}: folder holds no volumes (.nii.gz, .mha, .nrrd or DICOM series){held}")
            cases.extend(found)
    return cases


def _cases_below(folder: Path, subject: str, depth: int) -> list[Case]:
    """The cases of ``folder``, or else of the first folders below it (down to ``depth`` levels) that hold volumes,
    all of subject ``subject``: a case's folder (KiTS), or a patient's folder of study folders of DICOM series (TCIA:
    patient/study/series)."""
    found = discover_flat(folder, subject=subject)
    if found or depth == 0:
        return found
    for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
        found.extend(_cases_below(sub, subject, depth - 1))
    return found


def output_name(case: Case) -> str:
    """The name ``coral segment --out-dir`` gives a case's labels, before ``_labels`` and the suffix: the image
    file's own name, led by its case folder's when the folder names the case (KiTS:
    ``case_00000/imaging.nii.gz`` -> ``case_00000_imaging``)."""
    stem = _stem(case.image)  # the file's own name: an ACDC patient's frames share their subject
    return stem if case.subject in stem else f"{case.subject}_{stem}"


def case_images(folder: str | os.PathLike) -> dict[str, Path]:
    """The image of each case of a dataset folder, by the name coral segment gives its labels."""
    try:
        return {output_name(c): c.image for c in discover_volumes([folder])}
    except UserError:
        return {}


def holds_dicom_labels(folder: str | os.PathLike) -> bool:
    """Whether a folder's first DICOM file is a SEG or RT structure set (a folder of such files: labels, not a
    series)."""
    first = next((f for f in sorted(Path(folder).iterdir()) if f.is_file() and is_dicom_file(f)), None)
    return first is not None and is_dicom_labels(first)


def _labelled_cases(folder: Path) -> dict[str, Path]:
    """The label file of each labelled case of a dataset folder, by the name coral segment gives its labels."""
    try:
        cases = discover_volumes([folder])
    except UserError:  # a folder of label files alone holds no images
        return {}
    return {output_name(c): c.label for c in cases if c.label is not None}


def _reference_labels(folder: Path) -> dict[str, Path]:
    """The reference label file of each case in ``folder``, by the name coral segment gives that case's labels: a
    dataset folder's labelled cases (ACDC, imagesTr/labelsTr, images beside their label files), or else every volume
    file in the folder, a folder of label files alone, each by its name less a ``_gt``/``_label``/``_seg`` ending."""
    found = _labelled_cases(folder)
    if found:
        return found
    return {_LABEL_ENDING.sub("", _stem(f)): f for f in sorted(folder.iterdir()) if f.is_file() and is_volume_path(f)}


def evaluation_pairs(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike
                     ) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """Pair the label files in ``pred_dir`` (as ``coral segment --out-dir`` writes them: NAME_labels.nii.gz) with
    the reference labels of the same cases in ``truth_dir`` (the dataset folder segmented, or a folder of label
    files), by name: NAME, less a ``_labels``/``_seg``/... ending, equal to the case's name; failing that, equal once
    an image ending (``_0000``, ``_image``) is dropped from both. Returns (name, prediction, reference) of each pair,
    the predictions without a reference, and the references without a prediction."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if _labelled_cases(pred_dir):
        raise UserError(f"{pred_dir}: a dataset folder (images with their labels), given as the predictions; give the "
                        "folder of predictions first and the dataset folder second")
    preds: dict[str, Path] = {}
    for f in sorted(pred_dir.iterdir()):
        if f.is_file() and (is_volume_path(f) or is_dicom_labels(f)):  # DICOM SEG files too (coral segment --dicom-seg)
            name = _LABEL_ENDING.sub("", _stem(f))
            if name in preds:
                raise UserError(f"{pred_dir}: {preds[name].name} and {f.name} are both labels of case {name}; keep one "
                                "prediction per case in that folder")
            preds[name] = f
    truths = _reference_labels(truth_dir)

    def loose(names):  # name without an image ending -> name, for the names it leaves distinct
        keys: dict[str, list[str]] = {}
        for n in names:
            keys.setdefault(_IMAGE_ENDING.sub("", n), []).append(n)
        return {k: v[0] for k, v in keys.items() if len(v) == 1}

    loose_truths = loose(truths)
    pairs, used = [], set()
    for name, pred in preds.items():
        match = name if name in truths else loose_truths.get(_IMAGE_ENDING.sub("", name))
        if match is not None and match not in used:
            used.add(match)
            pairs.append((name, pred, truths[match]))
    paired = {p for _, p, _ in pairs}
    return pairs, [p for p in preds.values() if p not in paired], [t for n, t in truths.items() if n not in used]
