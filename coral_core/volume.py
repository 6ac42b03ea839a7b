"""Volumes on disk and in memory: loading, saving with the source geometry, normalisation.

A :class:`Volume` holds voxels as a (z, y, x) array where z is the *last* voxel axis of the
file (k, the slice axis of an axial or short-axis stack), plus the geometry needed to write
a result that overlays the input in any viewer: the 4x4 affine from file voxel indices
(i, j, k) to world coordinates in RAS (NIfTI's convention; ITK's LPS is converted).

NIfTI goes through nibabel; MHA/MHD/NRRD and DICOM series folders through SimpleITK. A label map can carry
its classes' names (background first) in its header, which :func:`read_class_names` reads back: NIfTI in a
comment extension holding ``{"napari_coral": {"class_names": [...]}}``, MHA and NRRD in the header field
``napari_coral_class_names`` (a JSON list). Other programs ignore both.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from coral_core.device import host_memory
from coral_core.errors import UserError
from coral_core.fileio import atomic_target

__all__ = [
    "Volume",
    "load_volume",
    "load_frames",
    "frame_count",
    "save_volume",
    "save_like",
    "read_class_names",
    "intensity_bounds",
    "normalise_intensity",
    "normalise_intensity_tensor",
    "float32_scale",
    "as_float32",
    "is_volume_path",
    "is_dicom_file",
    "dicom_slice_series",
    "load_dicom_series",
    "dicom_series_title",
    "dicom_cine_stack",
    "dicom_phases",
    "dicom_folder_series",
    "is_dicom_seg",
    "is_rt_structure_set",
    "is_dicom_labels",
    "load_labels_like",
    "VOLUME_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_CLASS_NAMES_KEY = "napari_coral_class_names"  # MHA and NRRD header field


@dataclass
class Volume:
    """Voxels in (z, y, x) order with the geometry of the file they came from.

    Attributes
    ----------
    array : ndarray
        (z, y, x) voxels; z is the file's last voxel axis k.
    affine : ndarray
        (4, 4) map from file voxel indices (i, j, k) = (x, y, z) to RAS world millimetres.
    path : Path or None
        Where the volume was read from.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres in (z, y, x) order."""
        sizes = np.linalg.norm(self.affine[:3, :3], axis=0)  # (i, j, k)
        return float(sizes[2]), float(sizes[1]), float(sizes[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def name(self) -> str:
        if self.path is None:
            return "volume"
        name = self.path.name
        for suffix in VOLUME_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a file with a known volume suffix or a folder holding DICOM files."""
    p = Path(path)
    if p.is_dir():
        return any(_looks_like_dicom(f) for f in sorted(p.iterdir())[:20] if f.is_file())
    return p.name.lower().endswith(VOLUME_SUFFIXES)


def _looks_like_dicom(f: Path) -> bool:
    if f.suffix.lower() == ".dcm":
        return True
    try:
        with open(f, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file that is DICOM by its name (.dcm) or its contents (the DICM marker): one slice of a series,
    or a multi-frame file that holds a volume."""
    p = Path(path)
    return p.is_file() and not p.name.lower().endswith(VOLUME_SUFFIXES) and _looks_like_dicom(p)


def dicom_slice_series(path: str | os.PathLike) -> str | None:
    """The Series Instance UID of a DICOM file that holds one slice of a series, from its header alone; None for
    anything else (a multi-frame DICOM file, which holds a volume; a file that is not DICOM or not readable)."""
    p = Path(path)
    if not is_dicom_file(p):
        return None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except Exception:  # noqa: BLE001 - not a readable DICOM file: load_volume says why in one sentence
        return None
    size = reader.GetSize()
    if len(size) > 2 and int(np.prod(size[2:])) > 1:
        return None
    return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""


def load_dicom_series(paths: str | os.PathLike | list) -> list[Volume]:
    """The DICOM series that one slice file belongs to (every file of its folder with its Series Instance UID), or
    the series that several slice files make together (those files alone), as medical viewers open a series from any
    of its files: its frames, each a volume in slice order (one for a plain series; a cine series, several images at
    each slice position, one per phase, as :func:`load_frames` gives a 4-D file's); each ``path`` is the folder.
    Any of the files of a cine stack exported one series per slice position give the whole stack, as its folder
    does (:func:`dicom_cine_stack`). Raises :class:`UserError` with one sentence for files of several series or
    folders, or a series GDCM cannot assemble."""
    files = [Path(p).resolve() for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    uids = {dicom_slice_series(f) for f in files}
    folders = {f.parent for f in files}
    if None in uids:
        bad = next(f for f in files if dicom_slice_series(f) is None)
        raise UserError(f"{bad}: not a single-slice DICOM file; give the slices of one series, or its folder")
    if len(folders) == 1 and dicom_cine_stack(next(iter(folders)), uids):  # files of a per-slice cine: the stack
        return load_frames(next(iter(folders)))
    if len(uids) > 1 or len(folders) > 1:
        raise UserError(f"{files[0]}: the {len(files)} files given belong to {max(len(uids), len(folders))} DICOM "
                        "series or folders; open one series at a time")
    folder, uid = folders.pop(), uids.pop()
    try:
        ordered = [Path(f).resolve() for f in _series_file_names(folder, uid)] if uid else []
    except Exception:  # noqa: BLE001 - GDCM could not sort the folder: fall back to the files as named
        ordered = []
    given = set(files) if len(files) > 1 else None
    if given is None and ordered:  # the whole series, from the folder
        _warn_unread(folder, uid, ordered)
    ordered = [f for f in ordered if given is None or f in given] or sorted(files)
    try:
        array, affine = _read_dicom_files(ordered, folder)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{files[0]}: its DICOM series in {folder} is not readable ({_short(exc)}); re-export it") from None
    frames = [array] if array.ndim == 3 else [array[..., t] for t in range(array.shape[3])]
    return [Volume(_as_zyx_3d(frame, folder), affine, folder) for frame in frames]


# The order of a cine series' images at one slice position: temporal position, trigger time, instance number.
_DICOM_TIME_TAGS = ("0020|0100", "0018|1060", "0020|0013")


def _slice_coordinate(position: str, orientation: str | None) -> float | tuple:
    """Where a DICOM image lies along its stack, in mm to 0.01: its position (0020|0032) along the normal of its
    orientation (0020|0037); the position itself where the orientation is missing."""
    xyz = np.array([float(v) for v in position.split("\\")[:3]])
    try:
        o = [float(v) for v in orientation.split("\\")]
        return round(float(xyz @ np.cross(o[:3], o[3:6])), 2)
    except (AttributeError, ValueError):
        return tuple(np.round(xyz, 2))


_HEADER_KEYS: dict = {}  # file -> ((mtime, size), its key): a header is read once while its file stays the same


def _image_keys(files: list) -> list[tuple] | None:
    """(slice coordinate, time key, orientation, series UID) of each DICOM file, from its header; None when a file's
    header gives no readable position. Each file's is read once while it stays the same (the headers of a series
    are asked for when its frames are counted, and again when it is read)."""
    keys = [_image_key(f) for f in files]
    return None if None in keys else keys


def _image_key(f) -> tuple | None:
    import SimpleITK as sitk

    try:
        stat = os.stat(f)
    except OSError:
        return None
    name, stamp = str(f), (stat.st_mtime_ns, stat.st_size)
    known = _HEADER_KEYS.get(name)
    if known is not None and known[0] == stamp:
        return known[1]
    info = sitk.ImageFileReader()
    try:
        info.SetFileName(name)
        info.ReadImageInformation()
        orientation = info.GetMetaData("0020|0037") if info.HasMetaDataKey("0020|0037") else None
        coordinate = _slice_coordinate(info.GetMetaData("0020|0032"), orientation)
    except Exception:  # noqa: BLE001 - no readable position
        key = None
    else:
        key = (coordinate, tuple(_header_number(info, tag) for tag in _DICOM_TIME_TAGS), orientation,
               info.GetMetaData("0020|000e").strip() if info.HasMetaDataKey("0020|000e") else "")
        number = info.GetMetaData("0020|0013").strip() if info.HasMetaDataKey("0020|0013") else ""
        _NUMBERED[name] = number.lstrip("+-").isdigit()
    if len(_HEADER_KEYS) >= 100_000:  # a long session of many folders: start again
        _HEADER_KEYS.clear()
        _NUMBERED.clear()
    _HEADER_KEYS[name] = (stamp, key)
    return key


_NUMBERED: dict = {}  # file -> whether its header gives an instance number (read with its key)


def _series_file_names(folder, uid: str) -> list[str]:
    """The files of series ``uid`` in ``folder`` as GDCM sorts them (``ImageSeriesReader.GetGDCMSeriesFileNames``);
    for a cine series (several images at one slice position) in which a file gives no instance number, sorted here
    by position, time and name instead: GDCM then sorts by instance number, and crashed the process in 9 of 20 tries
    (SimpleITK 2.5.7; a plain series did not). The frames are told apart by their positions and times either way
    (:func:`_dicom_frames`)."""
    import SimpleITK as sitk

    folder = Path(folder)
    members, at, unnumbered = [], {}, False
    for f in sorted(folder.iterdir()):
        key = _image_key(f) if f.is_file() else None
        if key is None or key[3] != uid:
            continue
        members.append((f, key))
        at[key[0]] = at.get(key[0], 0) + 1
        unnumbered |= not _NUMBERED.get(str(f), True)
    if unnumbered and max(at.values()) > 1:
        try:
            return [str(f) for f, key in sorted(members, key=lambda m: (m[1][0], m[1][1], m[0].name))]
        except TypeError:  # positions of other kinds (some with orientation, some without): no order to give
            raise UserError(f"{folder}: a DICOM file of this cine series gives no instance number, and its images' "
                            "positions cannot be ordered; re-export the series") from None
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def main_orientation(orientations: list) -> list[bool]:
    """Which of a series' images lie in the orientation most of them share (image orientation (patient), as DICOM's
    backslash-separated text or as numbers; within 0.001 of it): localizer (scout) images exported among the slices
    of a series do not. Images without a readable one are kept."""
    vectors = []
    for orientation in orientations:
        try:
            values = orientation.split("\\") if isinstance(orientation, str) else list(orientation)
            vector = [float(v) for v in values[:6]]
        except (AttributeError, TypeError, ValueError):
            vector = []
        vectors.append(vector if len(vector) == 6 else None)
    known = np.array([v for v in vectors if v is not None])
    if len(known) < 2:
        return [True] * len(vectors)
    distinct, counts = np.unique(known, axis=0, return_counts=True)
    near = np.abs(distinct[:, None] - distinct[None]).max(-1) <= 1e-3  # which orientations agree with which
    main = distinct[int(np.argmax(near.astype(int) @ counts))]  # the one most images agree with
    return [v is None or bool(np.abs(np.array(v) - main).max() <= 1e-3) for v in vectors]


def _dicom_frames(files: list, where: Path, keys: list | None = None) -> list[list]:
    """A DICOM series' files as its frames, each a list of files in slice order: one frame for a plain series (in
    the order given), one per phase for a cine series (several images at each slice position: positions along the
    stack's normal, the images at a position ordered by time). Files whose headers give no position: one frame."""
    keys = keys or _image_keys(files)
    if keys is None:  # the series reader has the last word
        return [list(files)]
    keep = main_orientation([k[2] for k in keys])  # localizers left out, as _read_dicom_files leaves them
    files, keys = [f for f, kept in zip(files, keep) if kept], [k for k, kept in zip(keys, keep) if kept]
    if len({k[0] for k in keys}) == len(files):
        return [list(files)]
    phases = _phases([k[0] for k in keys], [k[1] for k in keys], f"{where}: DICOM series holds {len(files)} images",
                     "frame")
    return [[files[i] for i in phase] for phase in phases]


def _phases(coordinates: list, times: list, holds: str, unit: str) -> list[list[int]]:
    """Images grouped into a cine's phases (one phase for a plain stack): each phase the images' indices in slice
    order (coordinates ascending; tuple coordinates, positions without an orientation, as they came), the images at
    a position taken in the order of their time keys. A different count of images at some positions is refused in
    one sentence, ``holds`` (where, what it holds) and ``unit`` (what a phase is called) its words."""
    at: dict = {}  # slice coordinate -> [(time key, index)]
    for i, (coordinate, time) in enumerate(zip(coordinates, times)):
        at.setdefault(coordinate, []).append((time, i))
    counts = sorted({len(images) for images in at.values()})
    if len(counts) > 1:
        raise UserError(f"{holds} at {len(at)} slice positions, {counts[0]} to {counts[-1]} at a position, so its "
                        f"{unit}s cannot be told apart; re-export it with every slice in each {unit}")
    stack = sorted(at, key=lambda c: c if isinstance(c, float) else 0.0)  # a tuple: as the files came (sort is stable)
    by_time = [[i for _, i in sorted(at[c], key=lambda image: image[0])] for c in stack]
    return [[images[t] for images in by_time] for t in range(counts[0])]


def _per_slice_cine(folder: Path, ids) -> list[list] | None:
    """The frames of a cine stack exported one series per slice position (as some scanners export short-axis cine
    MRI): every series of the folder holds several images at one position, all series share one orientation and
    their positions differ. None for any other folder of several series (refused, naming each)."""
    found: dict = {}  # series UID -> [(file, key)], from each DICOM file's header (one pass, not one per series)
    for f in sorted(folder.iterdir()):
        key = _image_key(f) if f.is_file() and _looks_like_dicom(f) else None
        if key is not None:
            found.setdefault(key[3], []).append((f, key))
    if set(found) != set(ids):
        return None
    files, orientations = [], set()
    for uid in ids:
        series, keys = [f for f, _ in found[uid]], [k for _, k in found[uid]]
        if len(series) < 2 or len({k[0] for k in keys}) != 1 or not isinstance(keys[0][0], float):
            return None
        orientations |= {tuple(np.round([float(v) for v in (k[2] or "").split("\\") if v], 3)) for k in keys}
        files.append((series, keys))
    if len(orientations) != 1 or len({keys[0][0] for _, keys in files}) != len(files):
        return None
    every = [f for series, _ in files for f in series]
    return _dicom_frames(every, folder, [k for _, keys in files for k in keys])


def dicom_phases(source: str | os.PathLike, series=None) -> dict:
    """Which frame (phase) ``t`` of a DICOM cine, as :func:`load_frames` reads it, each of its images is: {resolved
    file path: t} for a series folder (the files of ``series``, a Series Instance UID or the UIDs of a cine stack
    exported one series per slice position, else of the folder's one series or stack), {frame number, from 1: t} for
    an enhanced multi-frame file. Every image of a plain (3-D) series is frame 0; {} for a source these do not
    describe (the DICOM label writers and readers then refuse a cine in one sentence)."""
    source = Path(source)
    try:
        if not source.is_dir():
            layout = _multiframe_layout(source)
            return {} if layout is None else {i + 1: t for t, phase in enumerate(layout[0]) for i in phase}
        ids = list(_series_ids(source))
        wanted = [series] if isinstance(series, str) and series else list(series or ids)
        if len(wanted) > 1:
            frames = _per_slice_cine(source, ids) if set(wanted) == set(ids) else None
        elif wanted:
            frames = _dicom_frames(_series_file_names(source, wanted[0]), source)
        else:
            frames = None
    except (UserError, OSError, RuntimeError):  # not readable as the reader reads it
        return {}
    return {} if frames is None else {str(Path(f).resolve()): t for t, frame in enumerate(frames) for f in frame}


def dicom_folder_series(folder: str | os.PathLike) -> str | list[str] | None:
    """What a DICOM series folder holds, as a reader of it records it: the Series Instance UID of its one image
    series, the UIDs (sorted) of a cine stack exported one series per slice position, or None (not a DICOM folder,
    or several series that make no stack)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        ids = list(_series_ids(folder))
    except Exception:  # noqa: BLE001 - GDCM could not read the folder: no series to name
        return None
    if len(ids) == 1:
        return ids[0]
    return dicom_cine_stack(folder, ids) if ids else None


def dicom_cine_stack(folder: str | os.PathLike, uids) -> list[str] | None:
    """The Series Instance UIDs of the folder's series when they make one cine stack exported a series per slice
    position (as :func:`load_frames` reads such a folder) and ``uids`` are among them; None otherwise. A slice file
    of such a stack opens the whole stack, as its folder does."""
    folder = Path(folder)
    try:
        ids = list(_series_ids(folder))
        if len(ids) < 2 or not set(uids) <= set(ids):
            return None
        return sorted(ids) if _per_slice_cine(folder, ids) is not None else None
    except Exception:  # noqa: BLE001 - not readable as a stack: read as a series
        return None


def _header_number(info, tag: str) -> float:
    try:
        return float(info.GetMetaData(tag).strip())
    except Exception:  # noqa: BLE001 - absent or not a number: last
        return math.inf


def _read_dicom_files(files: list, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels (z, y, x), or (z, y, x, t) for a cine series, RAS affine) of a DICOM series' files in slice order.
    The files are read once, their headers with them; a cine series (positions repeated: several images at each) is
    read frame by frame. ITK's warnings are not shown (a cine's repeated positions look to ITK like uneven
    spacing, and it reports in several lines): for a plain series with uneven gaps, one sentence says where. A cine
    whose headers (cached per file) show it is one is read frame by frame at once."""
    keys = _image_keys(files)
    if keys is not None:
        keep = main_orientation([k[2] for k in keys])
        if not all(keep):  # localizer (scout) images among the slices: not part of the stack
            import warnings

            left = [Path(f).name for f, kept in zip(files, keep) if not kept]
            warnings.warn(f"{where}: left out {len(left)} image(s) in another orientation than the series' other "
                          f"{sum(keep)}, localizer or scout images ({', '.join(left[:3])}{', ...' if len(left) > 3 else ''})",
                          stacklevel=2)
            files, keys = [f for f, kept in zip(files, keep) if kept], [k for k, kept in zip(keys, keep) if kept]
    if keys is not None and len({k[0] for k in keys}) < len(files):  # positions repeated: a cine's phases
        return _read_frames(_dicom_frames(files, where, keys), where)
    reader = _series_reader(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    img = _quietly(reader.Execute)
    try:
        coordinates = [_slice_coordinate(reader.GetMetaData(i, "0020|0032"), reader.GetMetaData(i, "0020|0037")
                                         if reader.HasMetaDataKey(i, "0020|0037") else None) for i in range(len(files))]
    except Exception:  # noqa: BLE001 - no positions: a stack as the files come
        coordinates = list(range(len(files)))
    if len(set(coordinates)) == len(files):
        _warn_uneven_gaps(coordinates, [Path(f).name for f in files], where)
        array, affine = _itk_arrays(img, where)
        try:
            first, last = (np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")[:3]])
                           for i in (0, len(files) - 1))
        except Exception:  # noqa: BLE001 - no positions: ITK's geometry stands
            return array, affine
        return array, _stack_geometry(affine, first, last, len(files), where)
    del img
    return _read_frames(_dicom_frames(files, where), where)


def _read_frames(frames: list[list], where: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels (z, y, x, t), or (z, y, x) for one frame, RAS affine) of a DICOM cine's frames, each its files in
    slice order."""
    arrays, affine = [], None
    for frame in frames:
        array, affine = _itk_arrays(_quietly(_series_reader(frame).Execute), where)
        arrays.append(array if array.ndim == 3 else array.reshape(-1, *array.shape[-2:]))  # one slice: (1, y, x)
    return (arrays[0], affine) if len(arrays) == 1 else (np.stack(arrays, -1), affine)


def _multiframe_layout(p: Path, why: list | None = None) -> tuple[list[list[int]], np.ndarray] | None:
    """How an enhanced (multi-frame) DICOM file's frames make a volume, from its per-frame functional groups: the
    frame numbers of each phase in slice order along the normal of their orientation (one phase for a plain volume;
    a cine holds several frames at each position, ordered by temporal position index, trigger delay, then number),
    and the RAS affine of a phase. None for a file whose frames give no positions or lie in several orientations:
    it is read as ITK reads it, and why is appended to ``why`` (a list, if given); None without a reason for a file
    of fewer than two per-frame groups (not enhanced)."""
    per = None
    try:
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        if not per or len(per) < 2:
            return None
        shared = (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]

        def value(frame, sequence: str, name: str):
            return _functional_value(frame, shared, sequence, name)

        positions, times, orientations = [], [], set()
        for i, frame in enumerate(per):
            position = value(frame, "PlanePositionSequence", "ImagePositionPatient")
            orientation = value(frame, "PlaneOrientationSequence", "ImageOrientationPatient")
            if position is None or orientation is None:
                if why is not None:
                    why.append(f"its frame {i + 1} has no {'position' if position is None else 'orientation'} in its "
                               "per-frame headers")
                return None
            positions.append(np.array([float(v) for v in position[:3]]))
            orientations.add(tuple(round(float(v), 4) for v in orientation[:6]))
            index = value(frame, "FrameContentSequence", "TemporalPositionIndex")
            delay = value(frame, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
            times.append((math.inf if index is None else float(index), math.inf if delay is None else float(delay), i))
        pixel = value(per[0], "PixelMeasuresSequence", "PixelSpacing")
        row, column = (float(pixel[0]), float(pixel[1])) if pixel else (1.0, 1.0)
        thickness = float(value(per[0], "PixelMeasuresSequence", "SliceThickness") or 1.0)
    except Exception as exc:  # noqa: BLE001 - not readable this way: ITK's reading stands
        if why is not None and per is not None and len(per) >= 2:
            said = str(exc).splitlines()[0][:120] if str(exc) else ""
            why.append(f"its per-frame headers could not be read ({type(exc).__name__}{': ' if said else ''}{said})")
        return None
    if len(orientations) != 1:
        if why is not None:
            why.append(f"its frames lie in {len(orientations)} orientations")
        return None
    o = np.array(orientations.pop())
    normal = np.cross(o[:3], o[3:])
    coordinates = [round(float(position @ normal), 2) for position in positions]
    phases = _phases(coordinates, times, f"{p}: DICOM file holds {len(per)} frames", "phase")
    stack = [coordinates[i] for i in phases[0]]
    _warn_uneven_gaps(stack, [f"frame {i + 1}" for i in phases[0]], p)
    gap = float(np.median(np.diff(stack))) if len(stack) > 1 else thickness
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = o[:3] * column, o[3:] * row, normal * gap
    lps[:3, 3] = positions[phases[0][0]]
    first, last = positions[phases[0][0]], positions[phases[0][-1]]  # the step from the positions as given
    return phases, _stack_geometry(_LPS_TO_RAS @ lps, first, last, len(phases[0]), p)


def _stack_geometry(affine: np.ndarray, first: np.ndarray, last: np.ndarray, count: int, where: Path) -> np.ndarray:
    """A DICOM stack's RAS affine with its slice axis the mean step from the first slice's position to the last's
    (LPS mm of their first pixels; ``count`` slices), where ``affine`` has it along the images' normal: along the
    normal still, its length from the positions, when the step's part across the normal moves the last slice by
    less than a twentieth of a pixel; else sheared, as for slices acquired with a tilted gantry, which is then said
    in one sentence: each slice stays as acquired, at the place its header gives."""
    if count < 2:
        return affine
    lps = np.linalg.inv(_LPS_TO_RAS) @ affine
    step = (np.asarray(last, float) - np.asarray(first, float)) / (count - 1)
    normal = np.cross(lps[:3, 0], lps[:3, 1])
    normal /= np.linalg.norm(normal)
    along = float(step @ normal)
    across = step - along * normal
    if along == 0:
        return affine
    pixel = float(min(np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])))
    sheared = float(np.linalg.norm(across)) * (count - 1) >= 0.05 * pixel
    if not sheared:
        step = along * normal
    if np.allclose(step, lps[:3, 2], rtol=0, atol=1e-6 * abs(along)) and np.allclose(first, lps[:3, 3], atol=1e-6):
        return affine
    lps[:3, 2], lps[:3, 3] = step, first
    if sheared:
        import warnings

        tilt = float(np.degrees(np.arctan2(np.linalg.norm(across), abs(along))))
        warnings.warn(f"{where}: its slices are tilted {tilt:.1f} degrees from the stack's normal (a gantry tilt); "
                      "each is kept as acquired, in a sheared geometry (NIfTI outputs hold it in the sform, and the "
                      "stack untilted in the qform, which ITK-based tools read)", stacklevel=3)
    return _LPS_TO_RAS @ lps


def _series_reader(files: list):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader


def _series_ids(folder: Path) -> tuple:
    """The Series Instance UIDs of a folder's DICOM image series (GDCM's; its warning when none is found not shown)."""
    import SimpleITK as sitk

    return tuple(_quietly(lambda: sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))))


def _quietly(run):
    """``run()`` with ITK's warnings (printed to stderr, several lines each) switched off."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return run()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _warn_unread(folder: Path, uid: str, listed: list, ids=None) -> None:
    """Warn (one sentence) when files of series ``uid`` lie in ``folder`` but GDCM left them out of ``listed``, the
    series' files it can read (a copy cut short, a damaged file): the volume then lacks their slices. Only the
    files that no series of the folder (``ids``, else looked up) lists are opened, their headers alone."""
    known = {Path(f).name for f in listed}
    extras = [f for f in Path(folder).iterdir() if f.is_file() and f.name not in known]
    if not extras:
        return
    try:
        for other in ids if ids is not None else _series_ids(Path(folder)):
            if other != uid:
                known |= {Path(f).name for f in _series_file_names(folder, other)}
    except Exception:  # noqa: BLE001 - GDCM could not scan the folder again: the files left are read below
        pass
    import pydicom

    unread = []
    for f in sorted(extras):
        if f.name in known:
            continue
        try:
            header = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM, or not even its header readable: nothing to name it by
            continue
        if str(header.get("SeriesInstanceUID", "")) == uid:
            unread.append(f.name)
    if unread:
        import warnings

        warnings.warn(f"{folder}: left out {len(unread)} file(s) of the series that could not be read, cut short or "
                      f"damaged ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}); the volume lacks their "
                      "slices: copy or export them again", stacklevel=3)


def _warn_uneven_gaps(coordinates: list, names: list, where: Path) -> None:
    """Warn (one sentence) when a plain series' slices are not evenly spaced along the stack: the volume's spacing
    is then wrong somewhere, usually because a slice is missing. ``names``: each slice's (its file's name, or
    "frame N" of a multi-frame file)."""
    if len(coordinates) < 3 or not all(isinstance(c, float) for c in coordinates):
        return
    gaps = np.abs(np.diff(coordinates))
    typical = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - typical)))
    if abs(gaps[worst] - typical) > max(0.05, 0.1 * typical):
        import warnings

        warnings.warn(f"{where}: DICOM slices {names[worst]} and {names[worst + 1]} are {gaps[worst]:.2f} mm apart "
                      f"where the others are {typical:.2f} mm; a slice may be missing, and the volume's slice spacing "
                      "is wrong there", stacklevel=2)


def dicom_series_title(folder: str | os.PathLike, uid: str) -> str:
    """A name for one DICOM series of a folder, as a layer's name: the folder's name when the series is the folder's
    only one; else the folder's name and the series' description (0008|103e), or its number (0020|0011), or its first
    file's name when its header holds neither, so that two series of one folder are told apart by name."""
    folder = Path(folder)
    try:
        ids = _series_ids(folder)
        files = _series_file_names(folder, uid) if uid else []
    except Exception:  # noqa: BLE001 - GDCM could not scan the folder: its name alone
        return folder.name
    if len(ids) < 2 or not files:
        return folder.name
    words = _header_fields(files[0], ("0008|103e", "0020|0011"))
    if words.get("0008|103e"):
        return f"{folder.name} {words['0008|103e']}"
    if words.get("0020|0011"):
        return f"{folder.name} series {words['0020|0011']}"
    return f"{folder.name} {Path(files[0]).name}"


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a 3-D volume (NIfTI, MHA/MHD, NRRD, or a DICOM series folder).

    A 4-D file is refused with a message naming how to pick one frame (or :func:`load_frames`
    reads each); a 2-D image becomes a single-slice volume. Raises :class:`UserError` with one
    sentence for anything unreadable.
    """
    p, array, affine = _read(path)
    return Volume(_as_zyx_3d(array, p), affine, p)


def load_frames(path: str | os.PathLike) -> list[Volume]:
    """Every frame of a 4-D file (a cine MRI series: ACDC's ``patientXXX_4d.nii.gz``) as a 3-D volume
    of its own, in order, each with the file's geometry; a 3-D file as its one volume."""
    p, array, affine = _read(path)
    if array.ndim == 4 and array.shape[3] > 1:
        return [Volume(_as_zyx_3d(array[..., t], p), affine, p) for t in range(array.shape[3])]
    return [Volume(_as_zyx_3d(array, p), affine, p)]


def frame_count(path: str | os.PathLike) -> int:
    """How many frames a volume file or DICOM series folder holds (1 for a 3-D file, a plain DICOM series or anything
    unreadable), from headers alone: whether :func:`load_frames` would give a series, without reading the voxels."""
    p = Path(path)
    try:
        if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            shape = nib.load(str(p)).shape
        elif p.is_file() and p.name.lower().endswith(ITK_SUFFIXES):
            shape = _itk_information(p).GetSize()
        elif p.is_dir() and is_volume_path(p):  # a DICOM series: a cine holds several images at each position
            ids = _series_ids(p)
            if len(ids) > 1:  # a cine stack exported one series per slice position, or a folder load_frames refuses
                return len(_per_slice_cine(p, ids) or [None])
            return len(_dicom_frames(_series_file_names(p, ids[0]), p)) if ids else 1
        elif is_dicom_file(p):  # a multi-frame file: an enhanced cine's frames hold several phases (a SEG's, segments)
            layout = None if _modality(p) == "SEG" else _multiframe_layout(p)
            return len(layout[0]) if layout else 1
        else:
            return 1
    except Exception:  # noqa: BLE001 - unreadable here: load_frames will say why in one sentence
        return 1
    return int(shape[3]) if len(shape) >= 4 else 1


def _read(path: str | os.PathLike) -> tuple[Path, np.ndarray, np.ndarray]:
    """(path, voxels as the file holds them, affine) of any volume file or DICOM series folder."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder; check the path")
    if p.is_dir():
        if not is_volume_path(p):
            raise UserError(f"{p}: folder holds no DICOM files; give a volume file or a DICOM series folder")
        array, affine = _read_itk(p, dicom=True)
    elif p.name.lower().endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(p)
    elif p.name.lower().endswith(ITK_SUFFIXES):
        array, affine = _read_itk(p, dicom=False)
    elif _looks_like_dicom(p):  # a multi-frame DICOM file holds a volume; a single slice is a series' part
        _refuse_non_image(p, p)
        _check_pixel_bytes(p)
        array, affine = _read_itk(p, dicom=False)
        if array.ndim < 3 or array.shape[0] == 1:
            raise UserError(f"{p}: one DICOM file, a single slice of a series; give the folder that holds the series "
                            f"({p.parent})")
        why = []
        layout = _multiframe_layout(p, why)  # an enhanced file's frames in slice order, a cine's phase by phase
        if layout is not None and array.ndim == 3 and sum(map(len, layout[0])) == len(array):
            phases, affine = layout
            array = array[phases[0]] if len(phases) == 1 else np.stack([array[phase] for phase in phases], -1)
        elif layout is not None and array.ndim == 3:
            why.append(f"its per-frame headers describe {sum(map(len, layout[0]))} frames where it holds {len(array)}")
        if why and array.ndim == 3:
            import warnings

            warnings.warn(f"{p}: {why[0]}; its {len(array)} frames are read in the order it stores them, as one volume "
                          "(a cine's phases would be mixed in it), and placed by its first frame's geometry",
                          stacklevel=3)
    else:
        raise UserError(
            f"{p}: unknown volume format; use .nii, .nii.gz, .mha, .mhd, .nrrd or a DICOM folder"
        )
    _check_geometry(p, affine)
    return p, array, affine


def _check_geometry(p: Path, affine: np.ndarray) -> None:
    """Refuse voxel geometry no slice can be placed by: a NaN or infinite number, an axis of no length, or axes that
    lie along one another (a damaged header; nibabel then cannot even write labels for it)."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    sizes = np.linalg.norm(axes, axis=0) if np.isfinite(affine).all() else np.zeros(3)
    if not (sizes > 0).all() or abs(np.linalg.det(axes)) <= 1e-6 * np.prod(sizes):
        raise UserError(f"{p}: its header's voxel geometry is not usable (a spacing or orientation that is NaN, "
                        "infinite, zero or flat); fix the header or re-export the volume")


def _check_pixel_bytes(p: Path) -> None:
    """Refuse a DICOM file smaller than the uncompressed pixels its rows, columns, frames and bits ask for (cut short,
    or a damaged size): ITK then read past its end, an image of 65535 columns from a file of 20."""
    import pydicom

    try:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=[  # not the per-frame groups, read already
            "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated"])
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return

        def number(name: str, default=None) -> int:  # a damaged header may repeat a value: ITK takes the first
            value = ds.get(name, default)
            return int((value[0] if isinstance(value, (list, tuple)) or hasattr(value, "append") else value) or 1)

        frames, rows, columns = number("NumberOfFrames", 1), number("Rows"), number("Columns")
        needs = (frames * rows * columns * number("SamplesPerPixel", 1) * number("BitsAllocated") + 7) // 8
    except Exception:  # noqa: BLE001 - what ITK makes of it stands
        return
    holds = p.stat().st_size
    if holds < needs:
        raise UserError(f"{p}: DICOM header gives {frames} frames of {rows} x {columns} pixels ({needs} bytes), more "
                        f"than the file's {holds} bytes; the file is damaged or cut short, re-export it")


def _read_nifti(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if p.stat().st_size == 0:
        raise UserError(f"{p}: file is empty; re-export the volume")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise UserError(f"{p}: not a readable NIfTI file ({_short(exc)}); re-export the volume") from None
    _check_claimed_size(p, img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise UserError(f"{p}: not a readable NIfTI file ({_short(exc)}); re-export the volume") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    # nibabel arrays are indexed (i, j, k[, t]); present them as (z=k, y=j, x=i).
    if data.ndim >= 3:
        data = np.moveaxis(data, (0, 1, 2), (2, 1, 0))
    elif data.ndim == 2:
        data = data.T
    return data, affine


def _check_claimed_size(p: Path, img) -> None:
    """Refuse a header whose shape needs more memory than the machine has, or more bytes than
    an uncompressed file holds, before anything is allocated."""
    shape = tuple(int(n) for n in img.shape)
    claimed = int(np.prod(shape, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize
    if claimed > host_memory():
        raise UserError(
            f"{p}: header claims a {' x '.join(map(str, shape))} volume ({claimed / 2**30:.0f} GiB), more than this "
            "machine's memory; the file is damaged or needs a bigger machine"
        )
    if not p.name.lower().endswith(".gz"):
        offset = int(getattr(img.dataobj, "offset", 0) or 0)
        if p.stat().st_size < offset + claimed:
            raise UserError(f"{p}: file is truncated (holds {p.stat().st_size} of {offset + claimed} bytes); re-export the volume")


def _read_itk(p: Path, dicom: bool) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        if dicom:
            ids = _series_ids(p)
            if not ids:
                for f in sorted(p.iterdir())[:20]:  # DICOM files, but no image among them: a SEG or contours?
                    if f.is_file() and _looks_like_dicom(f):
                        _refuse_non_image(f, p)
                raise UserError(f"{p}: its DICOM files hold no image series GDCM can read; give the folder of an "
                                "image series' slice files")
            if len(ids) > 1:
                frames = _per_slice_cine(p, ids)
                if frames is not None:  # a cine stack, one series per slice position
                    return _read_frames(frames, p)
                raise UserError(f"{p}: folder holds {len(ids)} DICOM series ({_describe_series(p, ids)}); put "
                                "each series in its own folder, or open one of its files in napari")
            files = _series_file_names(p, ids[0])
            if files:
                _refuse_non_image(files[0], p)
            _warn_unread(p, ids[0], files, ids)
            return _read_dicom_files(files, p)
        else:
            if p.stat().st_size == 0:
                raise UserError(f"{p}: file is empty; re-export the volume")
            _check_detached_data(p)
            _check_itk_size(p)
            img = sitk.ReadImage(str(p))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{p}: not a readable volume ({_short(exc)}); re-export it") from None
    return _itk_arrays(img, p)


_LABEL_MODALITIES = ("SEG", "RTSTRUCT")  # DICOM objects read as labels on an image's grid
# DICOM objects that are not images, by Modality: what each is, and what to give instead.
_NOT_IMAGES = {
    "SEG": ("a DICOM SEG segmentation", "give it as the labels of the image it was drawn on (coral finetune IMAGE "
            "--labels SEG, coral evaluate PRED SEG), or convert it to a NIfTI, MHA or NRRD label map"),
    "RTSTRUCT": ("a DICOM RT structure set (contours, not voxels)", "give it as the labels of the image it was drawn "
                 "on (coral finetune IMAGE --labels RS.dcm, coral evaluate PRED RS.dcm)"),
    "SR": ("a DICOM structured report", "give the image series' folder"),
    "PR": ("a DICOM presentation state", "give the image series' folder"),
    "REG": ("a DICOM registration", "give the image series' folder"),
}


def _refuse_non_image(f, where: Path) -> None:
    """Refuse, in one sentence, a DICOM file (or a folder's series, by its first file) that holds no image: a
    segmentation or contours, which would be misread as frames or fail in ITK's words."""
    modality = _modality(f)
    if modality in _NOT_IMAGES:
        what, instead = _NOT_IMAGES[modality]
        inside = f" holds {what}" if where != Path(f) else f": is {what}"
        raise UserError(f"{where}{inside}, not an image; {instead}")


def _modality(f) -> str:
    """A DICOM file's Modality (upper case), from its header, read once while the file stays the same (a label file is
    asked what it is by several callers); "" for a file that is not DICOM or not readable."""
    try:
        stat = os.stat(f)
    except OSError:
        return ""
    return _modality_of(str(f), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _modality_of(name: str, mtime: int, size: int) -> str:
    try:
        import pydicom

        header = pydicom.dcmread(name, stop_before_pixels=True, specific_tags=["Modality"])
        return str(header.get("Modality", "")).upper()
    except Exception:  # noqa: BLE001 - not readable here: the image reader says why
        return ""


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """True for a DICOM SEG file: a segmentation, read onto the grid of the image it was drawn on
    (:func:`load_labels_like`)."""
    return is_dicom_file(path) and _modality(path) == "SEG"


def is_rt_structure_set(path: str | os.PathLike) -> bool:
    """True for a DICOM RT structure set file: contours, filled on the grid of the image they were drawn on
    (:func:`load_labels_like`)."""
    return is_dicom_file(path) and _modality(path) == "RTSTRUCT"


def is_dicom_labels(path: str | os.PathLike) -> bool:
    """True for a DICOM SEG or RT structure set file: labels that need the grid of the image they were drawn on."""
    return is_dicom_file(path) and _modality(path) in _LABEL_MODALITIES


def load_labels_like(path: str | os.PathLike, like: Volume, structures: list[str] | None = None, *,
                     quiet: bool = False) -> Volume:
    """Labels for the image ``like``: a label file or DICOM folder as :func:`load_volume` reads it (its shape is the
    caller's to check); a DICOM SEG file placed on the image's voxel grid, each segment's voxels labelled with its
    segment number (segments drawn over one another: the highest number's, with a warning); or a DICOM RT structure
    set's closed contours filled on the grid, ROI n of its regions labelled n
    (:func:`coral_core.dicomlabels.contours_on_grid`). Raises :class:`OffGridError` with one sentence for a SEG or
    contours that do not lie on the image's grid. ``structures``: only the classes, segments or ROIs of these names,
    labelled 1, 2, ... in this order (a label file must name its classes; one sentence says what a file lacks).
    ``quiet``: no warning for structures drawn over one another (a caller that has said so already)."""
    modality = _modality(path) if is_dicom_file(path) else ""
    if modality not in _LABEL_MODALITIES:
        volume = load_volume(path)
        return volume if structures is None else Volume(pick_classes(volume.array, path, structures),
                                                        volume.affine, volume.path)
    from coral_core.dicomlabels import contours_on_grid, seg_on_grid

    if modality == "SEG":
        labels = seg_on_grid(Path(path), like, structures, quiet=quiet)
    else:
        labels = contours_on_grid(Path(path), like, structures, quiet=quiet)[0]
    return Volume(labels, like.affine, Path(path))


def pick_classes(array: np.ndarray, path, structures: list[str]) -> np.ndarray:
    """A label file's classes of these names (:func:`read_class_names`), labelled 1, 2, ... in this order, the others
    background."""
    from coral_core.dicomlabels import pick_structures

    names = read_class_names(path)
    if not names:
        raise UserError(f"{path}: names none of its classes, so structures cannot be picked from it by name; give "
                        "its label values with --label-values instead")
    out = np.zeros(array.shape, np.uint8)
    for n, i in enumerate(pick_structures(names[1:], structures, path), 1):
        out[array == i + 1] = n
    return out


def _functional_value(frame, shared, sequence: str, name: str):
    """A value of an enhanced DICOM file's functional groups: the frame's own, else the one all frames share."""
    for group in (frame, shared):
        items = getattr(group, sequence, None) if group is not None else None
        if items and name in items[0]:
            return items[0][name].value
    return None


def _header_fields(path, tags: tuple) -> dict[str, str]:
    """Those of ``tags`` a DICOM file's header holds, stripped, in the order asked; none for an unreadable file."""
    import SimpleITK as sitk

    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    try:
        info.ReadImageInformation()
    except Exception:  # noqa: BLE001 - nothing to name it by
        return {}
    return {tag: info.GetMetaData(tag).strip() for tag in tags if info.HasMetaDataKey(tag)}


def _describe_series(folder: Path, ids) -> str:
    """Each series of a folder as its file count and its first file's modality and description, the first three."""
    parts = []
    for uid in ids[:3]:
        files = _series_file_names(folder, uid)
        words = _header_fields(files[0], ("0008|0060", "0008|103e")).values()
        parts.append(" ".join([f"{len(files)} files", *(w for w in words if w)]) + f" from {Path(files[0]).name}")
    return "; ".join(parts) + ("; ..." if len(ids) > 3 else "")


def _itk_arrays(img, p: Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels as ITK holds them, (z, y, x)[, t] last, RAS affine) of a SimpleITK image read from ``p``."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{p}: has {img.GetNumberOfComponentsPerPixel()} channels per voxel; give a grey-scale volume")
    array = sitk.GetArrayFromImage(img)  # (k, j, i) already = (z, y, x)
    dim = img.GetDimension()
    spacing = np.ones(3)
    origin = np.zeros(3)
    direction = np.eye(3)
    n = min(dim, 3)
    spacing[:n] = img.GetSpacing()[:n]
    origin[:n] = img.GetOrigin()[:n]
    direction[:n, :n] = np.asarray(img.GetDirection()).reshape(dim, dim)[:n, :n]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = origin
    if dim == 4:
        array = np.moveaxis(array, 0, -1)  # (t, z, y, x) -> (z, y, x, t) like NIfTI
    return array, _LPS_TO_RAS @ lps


def _check_detached_data(p: Path) -> None:
    """Refuse a header-only file (.mhd, .nhdr) whose voxel file is not where the header says, before ITK
    reads it (ITK's own message is a line of its C++ source, and it prints to the terminal besides)."""
    key = {".mhd": "elementdatafile", ".nhdr": "data file"}.get(p.suffix.lower())
    if key is None:
        return
    with open(p, "rb") as f:
        head = f.read(65536).decode("latin-1")
    for line in head.splitlines():
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        name = name.strip().lower()
        if sep and (name == key or (key == "data file" and name == "datafile")):
            value = value.strip()
            # LOCAL/LIST and numbered patterns ("slice%03d.raw 1 40 1") name no single file to look for
            if value and value.upper() not in ("LOCAL", "LIST") and "%" not in value and " " not in value:
                data = Path(value) if Path(value).is_absolute() else p.parent / value
                if not data.is_file():
                    raise UserError(f"{p}: its voxel file {value} is missing; keep it in the same folder as the header")
            return


def _itk_header(p: Path) -> tuple[dict[str, str], int]:
    """The fields of an MHA/MHD or NRRD/NHDR header (names lower-cased) and the byte offset at which voxels
    that follow it in the same file start."""
    with open(p, "rb") as f:
        head = f.read(65536)
    fields: dict[str, str] = {}
    offset = 0
    meta = p.suffix.lower() in (".mha", ".mhd")
    for line in head.splitlines(keepends=True):
        offset += len(line)
        text = line.decode("latin-1").strip()
        if not meta and not text:  # NRRD: a blank line ends the header
            break
        name, sep, value = text.partition("=" if meta else ":")
        if sep and not (not meta and value.startswith("=")):  # NRRD "key:=value" lines are key/value pairs
            fields[name.strip().lower()] = value.strip()
        if meta and name.strip().lower() == "elementdatafile":  # MetaImage: the last header line
            break
    return fields, offset


def _itk_information(p: Path):
    """A SimpleITK reader that has read the header of the MHA/MHD or NRRD/NHDR file ``p`` (size, pixel type, fields),
    after refusing a MetaImage header whose NDims is not a dimension count: ITK's MetaImage reader crashes the process
    on a negative or huge one (seen with SimpleITK 2.5: NDims = -1 a segmentation fault, 65 an abort)."""
    import SimpleITK as sitk

    if p.suffix.lower() in (".mha", ".mhd"):
        fields = _itk_header(p)[0]
        ndims = fields.get("ndims")
        if ndims is not None and not (ndims.isdigit() and 1 <= int(ndims) <= _MAX_META_DIMS):
            raise UserError(f"{p}: header's NDims = {ndims[:20]!r} is not a dimension count from 1 to "
                            f"{_MAX_META_DIMS}; the file is damaged, re-export the volume")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    return reader


_MAX_META_DIMS = 10  # MetaImage's NDims above this is damage (ITK reads up to 10-D here, crashes on 65)


def _check_itk_size(p: Path) -> None:
    """Refuse an MHA/MHD or NRRD/NHDR file whose header claims more voxels than this machine's memory holds, or
    whose voxels are cut short (an interrupted copy), before ITK reads it (ITK then prints MetaImage's complaint
    to the terminal and names no cause). Measured: raw voxels, and MetaImage's compressed ones (whose header gives
    their length); NRRD's gzip-compressed voxels are left to ITK."""
    import SimpleITK as sitk

    if p.suffix.lower() not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return
    reader = _itk_information(p)  # the header only
    shape = tuple(int(n) for n in reader.GetSize())
    one = sitk.Image([1] * len(shape), reader.GetPixelID(), reader.GetNumberOfComponents())
    claimed = (int(np.prod(shape, dtype=np.float64)) * reader.GetNumberOfComponents()
               * sitk.GetArrayViewFromImage(one).dtype.itemsize)
    if claimed > host_memory():
        raise UserError(
            f"{p}: header claims a {' x '.join(map(str, shape[::-1]))} volume ({claimed / 2**30:.0f} GiB), more than "
            "this machine's memory; the file is damaged or needs a bigger machine"
        )
    fields, offset = _itk_header(p)
    if p.suffix.lower() in (".mha", ".mhd"):
        raw = (fields.get("compresseddata", "false").lower() != "true"  # binary voxels (BinaryData = False: text)
               and fields.get("binarydata", "true").lower() != "false")
        data_file, skip = fields.get("elementdatafile", ""), fields.get("headersize", "0")
        if not raw and fields.get("compresseddatasize", "").isdigit():  # zlib-compressed, its length given
            raw, claimed = True, int(fields["compresseddatasize"])
    else:
        raw = fields.get("encoding", "").lower() == "raw"
        data_file = fields.get("data file", fields.get("datafile", "LOCAL"))
        skip = fields.get("byte skip", fields.get("byteskip", "0"))
        if fields.get("line skip", fields.get("lineskip", "0")) != "0":
            return  # lines of text to skip before the voxels: their length is not known here
    if not raw or not skip.lstrip("-").isdigit() or int(skip) < 0:  # -1: the voxels are the file's last bytes
        return
    if data_file.upper() == "LOCAL" or not data_file:
        holds, needs, what = p.stat().st_size, offset + int(skip) + claimed, "file"
    elif data_file.upper() == "LIST" or "%" in data_file or " " in data_file:
        return  # voxels spread over several files
    else:
        data = Path(data_file) if Path(data_file).is_absolute() else p.parent / data_file
        holds, needs, what = data.stat().st_size, int(skip) + claimed, f"voxel file {data_file}"
    if holds < needs:
        where = "file is" if what == "file" else f"its {what} is"
        raise UserError(f"{p}: {where} truncated (holds {holds} of {needs} bytes); re-export the volume")


def _as_zyx_3d(array: np.ndarray, p: Path) -> np.ndarray:
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise UserError(
            f"{p}: is a 4-D series with {array.shape[3]} frames; save the frame you want as a 3-D file (coral "
            "segment takes every frame, coral finetune every frame its 4-D labels annotate, and coral pretrain and "
            "coral embed every frame with --all-frames)"
        )
    if array.ndim != 3:
        raise UserError(f"{p}: has {array.ndim} dimensions; give a 3-D volume")
    if 0 in array.shape:
        raise UserError(f"{p}: holds no voxels (shape {array.shape})")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UserError(f"{p}: voxel type {array.dtype} is not numeric")
    if np.iscomplexobj(array):
        raise UserError(f"{p}: voxels are complex numbers; save their magnitude as a real-valued volume")
    # slice by slice, so that a usable scan costs one slice's test, not a mask of the whole volume
    if array.dtype.kind == "f" and not any(np.isfinite(s).any() for s in array):
        raise UserError(f"{p}: every voxel is NaN or infinite; re-export the volume")
    return np.ascontiguousarray(array)


_ITK_PREFIX = re.compile(r"^(?:sitk::ERROR|ITK ERROR):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?")


def _short(exc: BaseException) -> str:
    """The first line of an error that says what went wrong, for a one-sentence message: SimpleITK's
    "Exception thrown in SimpleITK ...: /path/of/its/source.cxx:99:" line is left out, and ITK's
    "sitk::ERROR:" / "ITK ERROR: MetaImageIO(0x...):" prefixes dropped; of NRRD's reader, the cause it names last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    lines = [_ITK_PREFIX.sub("", line) for line in lines if not line.startswith("Exception thrown in SimpleITK")]
    if lines and lines[0].startswith("Unable to determine ImageIO reader"):
        return "no image format that SimpleITK reads recognises its content"
    teem = [line for line in lines if line.startswith("[nrrd]") and not line.rstrip().endswith((":", "trouble"))]
    if teem:  # NRRD's reader (teem) stacks its callers' "trouble" lines above the cause: the last line
        return re.sub(r"^\[nrrd\]\s*\w+:\s*", "", teem[-1])[:120]
    return lines[0][:120] if lines else type(exc).__name__


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray,
                class_names: list[str] | None = None) -> Path:
    """Write a (z, y, x) array with ``affine`` (file voxel (i, j, k) -> RAS), atomically; or a
    (t, z, y, x) series of such frames (frames on the file's fourth axis, as cine files hold them).

    The format follows the suffix (.nii, .nii.gz, .mha, .nrrd). The file appears complete or
    not at all: it is written to a temporary name in the same folder, then renamed. ``class_names``
    (a label map's, background first: label value i is named ``class_names[i]``) go into the header.
    """
    names = None if class_names is None else [str(n) for n in class_names]
    affine = np.asarray(affine, dtype=np.float64)  # np.diag([1, 1, 3, 1]) is integers
    p = Path(path)
    lower = p.name.lower()
    if not lower.endswith(VOLUME_SUFFIXES) or lower.endswith((".mhd", ".nhdr")):
        raise UserError(f"{p}: unknown output format; end the name with .nii.gz, .nii, .mha or .nrrd")
    if array.ndim not in (3, 4):
        raise ValueError(f"save_volume needs a (z, y, x) or (t, z, y, x) array, got shape {array.shape}")
    suffix = next(s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True) if lower.endswith(s))
    if suffix in NIFTI_SUFFIXES and max(array.shape) > 32767:  # its header's sizes are 16-bit
        raise UserError(f"{p}: a NIfTI file holds at most 32767 voxels along an axis, and this volume is "
                        f"{' x '.join(map(str, array.shape))}; end the name with .mha or .nrrd")
    with atomic_target(p, suffix=suffix) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(tmp, array, affine, names)
        else:
            _write_itk(tmp, array, affine, names)
    return p


def save_like(path: str | os.PathLike, array: np.ndarray, like: Volume, class_names: list[str] | None = None) -> Path:
    """Write ``array`` (same shape as ``like``, or a (t, z, y, x) series of frames of its shape) with
    ``like``'s geometry (and a label map's ``class_names``, as :func:`save_volume`)."""
    if array.shape[-3:] != like.array.shape or array.ndim not in (3, 4):
        raise ValueError(f"array shape {array.shape} differs from the reference volume's {like.shape}")
    return save_volume(path, array, like.affine, class_names)


def read_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names (background first) that :func:`save_volume` wrote into a label file's header, from
    the header alone; None for a file without them (any other program's), a folder or an unreadable file."""
    p = Path(path)
    names = None
    try:
        if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            for ext in nib.load(str(p)).header.extensions:
                if ext.get_code() == 6 and ext.get_content().startswith(b'{"napari_coral"'):  # a comment: ours
                    names = json.loads(ext.get_content())["napari_coral"]["class_names"]
        elif p.is_file() and p.name.lower().endswith(ITK_SUFFIXES):
            reader = _itk_information(p)
            if reader.HasMetaDataKey(_CLASS_NAMES_KEY):
                names = json.loads(reader.GetMetaData(_CLASS_NAMES_KEY))
        elif is_dicom_seg(p):  # its segments' labels, when they are numbered 1, 2, ...
            import pydicom

            segments = {int(s.SegmentNumber): str(s.SegmentLabel)  # a LABELMAP's segment 0 is its background
                        for s in pydicom.dcmread(str(p), stop_before_pixels=True).SegmentSequence if int(s.SegmentNumber)}
            if sorted(segments) == list(range(1, len(segments) + 1)):
                names = ["background", *(segments[n] for n in sorted(segments))]
        elif is_rt_structure_set(p):  # its contoured ROIs' names, in the order they are labelled
            from coral_core.dicomlabels import structure_names

            names = ["background", *structure_names(p)]
    except Exception:  # noqa: BLE001 - a damaged header is the readers' to report; here it names nothing
        return None
    if isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names):
        return names
    return None


def _write_nifti(p: Path, array: np.ndarray, affine: np.ndarray, class_names: list[str] | None = None) -> None:
    import nibabel as nib

    # (z, y, x) -> (i, j, k); a series (t, z, y, x) -> (i, j, k, t)
    data = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if array.ndim == 3 else array.transpose(3, 2, 1, 0)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_qform(_unsheared(affine), code=1)  # a qform holds no shear; ITK reads it when the sform has one
    img.set_sform(affine, code=1)
    if class_names is not None:
        content = json.dumps({"napari_coral": {"class_names": class_names}}).encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", content))
    nib.save(img, str(p))


def _unsheared(affine: np.ndarray) -> np.ndarray:
    """``affine`` with its slice axis along the normal of its first two (as ITK reads a tilted DICOM stack: the
    distance between slice positions along the normal), when that axis is sheared; else ``affine``."""
    columns = affine[:3, :3]
    normal = np.cross(columns[:, 0], columns[:, 1])
    normal /= np.linalg.norm(normal)
    length = float(np.linalg.norm(columns[:, 2]))
    if np.allclose(columns[:, 2], normal * length, atol=1e-6 * length) or np.allclose(
            columns[:, 2], -normal * length, atol=1e-6 * length):
        return affine
    out = affine.copy()
    out[:3, 2] = np.sign(columns[:, 2] @ normal) * normal * length
    return out


def _write_itk(p: Path, array: np.ndarray, affine: np.ndarray, class_names: list[str] | None = None) -> None:
    import SimpleITK as sitk

    lps = np.linalg.inv(_LPS_TO_RAS) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = np.eye(array.ndim)  # a series' frames: a fourth axis of unit spacing, as ITK reads cine files
    direction[:3, :3] = lps[:3, :3] / spacing[None, :]
    img = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)  # (t,) z, y, x -> x, y, z(, t)
    img.SetSpacing(tuple(float(s) for s in spacing) + (1.0,) * (array.ndim - 3))
    img.SetOrigin(tuple(float(o) for o in lps[:3, 3]) + (0.0,) * (array.ndim - 3))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    if class_names is not None:
        img.SetMetaData(_CLASS_NAMES_KEY, json.dumps(class_names))
    sitk.WriteImage(img, str(p), useCompression=True)


_FLOAT32_ROOM = float(np.finfo(np.float32).max) / 4  # room left for differences and interpolation


def float32_scale(array: np.ndarray, chunk: int = 8) -> float:
    """The power of two that brings the finite values of a float64 (or wider) array within float32's range:
    1.0 unless some exceed a quarter of it (3.4e38), where casting would make them infinite and the image blank.
    Scaling by a power of two is exact, and every use here (percentile scaling, resampling) is unchanged by it."""
    a = np.asarray(array)
    if a.dtype.kind != "f" or a.dtype.itemsize <= 4 or a.size == 0:
        return 1.0
    largest = 0.0
    for start in range(0, a.shape[0] if a.ndim else 1, chunk):
        part = a[start : start + chunk] if a.ndim else a
        largest = max(largest, float(np.max(np.abs(part), initial=0.0, where=np.isfinite(part))))
    if largest <= _FLOAT32_ROOM:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(largest / _FLOAT32_ROOM))


def as_float32(array: np.ndarray, scale: float | None = None) -> np.ndarray:
    """``array`` as float32, multiplied by ``scale`` (by default :func:`float32_scale`: 1.0 but for values
    float32 cannot hold)."""
    a = np.asarray(array)
    scale = float32_scale(a) if scale is None else scale
    if scale == 1.0:
        return np.asarray(a, dtype=np.float32)
    with np.errstate(over="ignore", under="ignore"):
        return (a * scale).astype(np.float32)


def intensity_bounds(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float] | None:
    """The robust (lo, hi) that :func:`normalise_intensity` maps to 0 and 1: the ``low`` and ``high``
    percentiles of the finite voxels (their minimum and maximum if those percentiles are equal); None for
    a constant or all non-finite image. In the array's own units, also for values beyond float32's range."""
    scale = float32_scale(array)
    a = as_float32(array, scale)
    finite = np.isfinite(a)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        return None
    values = a.ravel().copy() if all_finite else a[finite]  # a copy of its own, partitioned in place below
    lo, hi = np.percentile(values, [low, high], overwrite_input=True)
    if not hi > lo:
        lo, hi = values.min(), values.max()
    return (float(lo) / scale, float(hi) / scale) if hi > lo else None


def _too_wide(lo: float, hi: float) -> bool:
    """Whether ``x - lo`` for x up to ``hi`` may overflow float32 (to infinity, and the scaled image to NaN)."""
    return hi - lo >= float(np.finfo(np.float32).max) / 2


def normalise_intensity(array: np.ndarray, low: float = 0.5, high: float = 99.5, chunk: int = 8,
                        bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Scale intensities to about [0, 1] by robust percentiles, as float32.

    NaN and infinite voxels become the lowest finite value; a constant (or all non-finite)
    image becomes zeros instead of dividing by zero. ``bounds``: (lo, hi) to scale by instead of the
    image's own percentiles (:func:`intensity_bounds` of another part of it). The scaling runs ``chunk``
    slices at a time, in float32, so a large scan needs about three float32 copies of itself at the peak
    rather than ten; a range wider than float32 holds (-3e38 to 3e38) is scaled from halves of its values, and
    float64 values beyond it from the values times a power of two (:func:`float32_scale`).
    """
    scale = float32_scale(array)
    a = as_float32(array, scale)
    if bounds is None:
        bounds = intensity_bounds(a, low, high)
    elif scale != 1.0:
        bounds = (bounds[0] * scale, bounds[1] * scale)
    if bounds is None:
        return np.zeros_like(a)
    lo, hi = bounds
    finite = np.isfinite(a)
    all_finite = bool(finite.all())
    out = np.empty(a.shape, dtype=np.float32)
    wide = _too_wide(lo, hi)
    for start in range(0, max(a.shape[0], 1) if a.ndim else 1, chunk):
        part = np.s_[start : start + chunk] if a.ndim else ()
        values = np.clip(a[part] if all_finite else np.where(finite[part], a[part], lo), lo, hi)
        out[part] = (values / 2 - lo / 2) / ((hi - lo) / 2) if wide else (values - lo) / (hi - lo)
    return out


def _percentiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """NumPy's default (linear) percentiles of a 1-D tensor, by one sort on its device."""
    ordered = torch.sort(values).values
    n = ordered.numel()
    out = []
    for q in qs:
        pos = q / 100 * (n - 1)
        k = int(pos)
        frac = pos - k
        a, b = ordered[k], ordered[min(k + 1, n - 1)]
        out.append(a + (b - a) * frac)
    return out


def normalise_intensity_tensor(x: torch.Tensor, low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """:func:`normalise_intensity` computed by torch on the tensor's own device (float32 out).

    Used by inference on a GPU, where the NumPy version on the host would take longer than
    the segmentation itself (a 200-slice 512 x 512 volume: about a second of one CPU core).
    """
    x = x.float()
    finite = torch.isfinite(x)
    all_finite = bool(finite.all())
    values = x.flatten() if all_finite else x[finite]
    if values.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = _percentiles(values, (low, high))
    if not bool(hi > lo):
        lo, hi = values.min(), values.max()
    if not bool(hi > lo):
        return torch.zeros_like(x)
    out = (x if all_finite else torch.where(finite, x, lo)).clamp(lo, hi)
    if _too_wide(float(lo), float(hi)):  # scaled from halves, as on the host
        return (out / 2 - lo / 2) / (hi / 2 - lo / 2)
    return (out - lo) / (hi - lo)
