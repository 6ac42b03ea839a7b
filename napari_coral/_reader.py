"""npe2 reader: NIfTI, MHA/MHD, NRRD and DICOM series folders."""

from __future__ import annotations

from coral_core.errors import UserError
from coral_core.volume import is_volume_path, load_volume
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
    """Layer data for one volume; a label map opens as Labels."""
    if isinstance(path, list):
        path = path[0]
    try:
        volume = load_volume(path)
    except UserError as exc:
        # napari shows reader exceptions as a notification; keep it to the one sentence.
        raise ValueError(str(exc)) from None
    return [volume_to_layer(volume)]
