"""The pretraining slice set on disk: ``coral pretrain --slice-cache FILE.npy``.

The first run writes the prepared slices (normalised, resampled to the model's size) into
``FILE.npy`` as it reads the volumes, and ``FILE.npy.json`` says what they were made from.
A later run with the same inputs and settings maps the file instead of reading and
resampling every volume again. Mapped, the slices live in the operating system's page
cache rather than in the process: the processes of a ``--ddp`` run on one machine share
one copy, and a slice set larger than the machine's memory still trains (pages are read
back from disk as the steps need them, at the disk's speed).

``FILE.npy`` is a plain NumPy array file ((slices, 1, size, size), float32 or float16),
read without unpickling. The description is removed before a new array is written and
written after it is complete, so a run stopped half-way leaves no description that could
pass an incomplete or foreign array for a valid one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from coral_core.errors import UserError
from coral_core.fileio import atomic_target, check_output_path

__all__ = ["cache_key", "open_cache", "write_cache", "description_path", "check_cache_path"]

FORMAT = 1


def check_cache_path(path: str | os.PathLike) -> Path:
    """Refuse a slice file name without ``.npy``, or in a folder that is missing or not
    writable, before any volume is read."""
    path = Path(path)
    if path.suffix != ".npy":
        raise UserError(f"--slice-cache {path}: give a file name ending in .npy")
    return check_output_path(path)


def description_path(path: str | os.PathLike) -> Path:
    """Where the description of the slice file ``path`` is kept (``FILE.npy.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _signature(path: Path) -> list:
    """What tells a changed input apart: size and modification time (for a folder, such as a
    DICOM series, the number of its files, their total size and the latest time)."""
    if path.is_dir():
        files = [f.stat() for f in sorted(path.rglob("*")) if f.is_file()]
        return [str(path.resolve()), len(files), sum(f.st_size for f in files), max((f.st_mtime_ns for f in files), default=0)]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(images: list[str | os.PathLike], phantom: int, seed: int, image_size: int | None, dtype: str) -> dict:
    """Everything the slices depend on: the input files as they are now, the phantom subjects,
    the requested model size (None: chosen from the data), the storage type and the version
    of this package (whose preparation of the slices may change)."""
    from coral_core import __version__

    return {"format": FORMAT, "version": __version__, "inputs": [_signature(Path(p)) for p in images],
            "phantom": int(phantom), "phantom_seed": int(seed) if phantom else None,
            "image_size": image_size, "dtype": dtype}


def open_cache(path: str | os.PathLike, key: dict):
    """The slice set stored at ``path`` for ``key``, memory-mapped, with its description
    (``names``, ``shapes``, ``image_size``); None when there is none, or it was made from
    other inputs or settings, or it does not hold what its description says."""
    from coral_core.data import PretrainSlices

    path = Path(path)
    try:
        description = json.loads(description_path(path).read_text())
        if description.get("key") != key:
            return None
        size, counts = int(description["image_size"]), [int(shape[0]) for shape in description["shapes"]]
        images = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None  # missing, unreadable or not what this module writes: rebuilt
    if images.shape != (sum(counts), 1, size, size) or images.dtype.name != key["dtype"]:
        return None
    return PretrainSlices.from_array(images, counts), description


def write_cache(path: str | os.PathLike, key: dict, volumes: list, image_size: int, names: list[str],
                shapes: list[tuple]) -> None:
    """Prepare ``volumes`` into the slice file ``path`` (emptying the list as each volume is
    written, as :class:`~coral_core.data.PretrainSlices` does with ``consume``), then describe it."""
    import torch

    from coral_core.data import PretrainSlices

    path = check_cache_path(path)
    description_path(path).unlink(missing_ok=True)  # from here until the end the old file is invalid
    with atomic_target(path, suffix=".npy") as tmp:
        data = PretrainSlices(volumes, image_size, consume=True, dtype=getattr(torch, key["dtype"]), storage=tmp)
        data.flush()
        del data  # unmapped before the file is renamed (Windows refuses to rename a mapped file)
    description = {"key": key, "names": list(names), "shapes": [list(s) for s in shapes], "image_size": int(image_size)}
    with atomic_target(description_path(path), suffix=".json") as tmp:
        tmp.write_text(json.dumps(description, indent=1))
