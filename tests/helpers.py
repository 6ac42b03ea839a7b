"""Small files the tests write themselves: volumes with known geometry, DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def oblique_affine(spacing_xyz=(0.7, 0.9, 3.5), angle=0.3, origin=(-12.0, 30.5, 7.25)) -> np.ndarray:
    """An anisotropic, rotated voxel-to-RAS affine."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing_xyz)[None, :]
    a[:3, 3] = origin
    return a


def write_nifti_ijk(path: Path, data_ijk: np.ndarray, affine: np.ndarray) -> Path:
    """Write data indexed (i, j, k) exactly as a scanner file would hold it."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(data_ijk, affine), str(path))
    return path


def write_dicom_series(folder: Path, volume_zyx: np.ndarray, spacing_zyx=(4.0, 0.8, 0.8),
                       series_uid: str = "1.2.826.0.1.3680043.2.1125.1.12345", prefix: str = "slice",
                       extra: dict | None = None, skip: tuple = (), file_order=None, first_slice: int = 0) -> Path:
    """A minimal CT-like DICOM series (one file per slice, PREFIXnnn.dcm) that GDCM can sort by position; a
    (t, z, y, x) array writes a cine series, t images at each position (trigger times 0, 30, ... ms). ``extra`` adds
    header fields (such as the series description, 0008|103e) to every file; ``skip`` leaves out those slices (in
    (t, z) order for a cine); ``file_order`` numbers the files (and their instance numbers) in another order than
    the images': a permutation of range(images); ``first_slice`` places slice k at position first_slice + k."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    frames = volume_zyx if volume_zyx.ndim == 4 else volume_zyx[None]
    images = [(t, k) for t in range(frames.shape[0]) for k in range(frames.shape[1])]
    order = list(range(len(images))) if file_order is None else list(file_order)
    for (t, k), n in zip(images, order):
        if (t, k) in skip or (volume_zyx.ndim == 3 and k in skip):
            continue
        img = sitk.GetImageFromArray(frames[t, k].astype(np.int16))
        img.SetSpacing((spacing_zyx[2], spacing_zyx[1]))
        tags = {
            "0008|0060": "CT" if volume_zyx.ndim == 3 else "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|000e": series_uid,
            "0020|0013": str(n + 1),
            "0020|0032": f"0\\0\\{(first_slice + k) * spacing_zyx[0]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing_zyx[0]),
            "0008|0018": f"{series_uid}.{n + 1}",
            **({"0018|1060": str(30.0 * t)} if volume_zyx.ndim == 4 else {}),
            **(extra or {}),
        }
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{n:03d}.dcm"))
        writer.Execute(img)
    return folder
