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
                       extra: dict | None = None, skip: tuple = (), file_order=None, first_slice: int = 0,
                       tilt_degrees: float = 0.0) -> Path:
    """A minimal CT-like DICOM series (one file per slice, PREFIXnnn.dcm) that GDCM can sort by position; a
    (t, z, y, x) array writes a cine series, t images at each position (trigger times 0, 30, ... ms). ``extra`` adds
    header fields (such as the series description, 0008|103e) to every file; ``skip`` leaves out those slices (in
    (t, z) order for a cine); ``file_order`` numbers the files (and their instance numbers) in another order than
    the images': a permutation of range(images); ``first_slice`` places slice k at position first_slice + k;
    ``tilt_degrees`` shifts each slice along y by its z times the tilt's tangent (a gantry tilt)."""
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
            "0020|0032": f"0\\{(first_slice + k) * spacing_zyx[0] * np.tan(np.radians(tilt_degrees)):.6f}\\"
                         f"{(first_slice + k) * spacing_zyx[0]}",
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


def write_enhanced_dicom(path: Path, volume_zyx: np.ndarray, affine: np.ndarray, frame_order=None,
                         drop: tuple = ()) -> Path:
    """An enhanced MR DICOM file (one file, every image a frame, each frame's position in its per-frame functional
    groups, as scanners export enhanced MR) of a (z, y, x) volume, or of a (t, z, y, x) cine: t frames at each
    position, temporal position index t + 1, trigger delay 30 t ms. ``affine``: voxel (i, j, k) -> RAS of each
    phase. ``frame_order``: the images (t, k), in t-major order, stored in that order instead (a permutation of
    their indices); ``drop`` leaves out those images' indices (a ragged cine)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    movie = volume_zyx if volume_zyx.ndim == 4 else volume_zyx[None]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    steps = np.linalg.norm(lps[:3, :3], axis=0)  # x, y, slice spacing
    images = [(t, k) for t in range(movie.shape[0]) for k in range(movie.shape[1])]
    images = [images[n] for n in (range(len(images)) if frame_order is None else frame_order) if n not in drop]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MR", generate_uid(), generate_uid()
    ds.Rows, ds.Columns = movie.shape[2], movie.shape[3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(images)
    measures, plane = Dataset(), Dataset()
    measures.PixelSpacing = [round(float(steps[1]), 6), round(float(steps[0]), 6)]  # between rows, then columns
    measures.SliceThickness = round(float(steps[2]), 6)
    plane.ImageOrientationPatient = [round(float(v), 6) for v in
                                     (*lps[:3, 0] / steps[0], *lps[:3, 1] / steps[1])]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    groups = []
    for t, k in images:
        position, content, cardiac, group = Dataset(), Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [round(float(v), 4) for v in lps[:3, 3] + k * lps[:3, 2]]
        content.TemporalPositionIndex, content.InStackPositionNumber = t + 1, k + 1
        cardiac.NominalCardiacTriggerDelayTime = 30.0 * t
        group.PlanePositionSequence, group.FrameContentSequence = Sequence([position]), Sequence([content])
        group.CardiacSynchronizationSequence = Sequence([cardiac])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.PixelData = np.stack([movie[t, k] for t, k in images]).astype("<i2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_rt_structure_set(path: Path, affine: np.ndarray | None = None, rois: tuple = (),
                           referenced_series: str | None = None) -> Path:
    """A DICOM RT structure set (contours, no image) for an image of geometry ``affine`` (voxel (i, j, k) -> RAS):
    ``rois``, each (name, interpreted type such as "ORGAN" or "EXTERNAL", [(slice k, [(i, j), ...] the polygon's
    corners in voxel coordinates), ...]), written as CLOSED_PLANAR contours in patient coordinates (LPS mm), ROI
    numbers 1, 2, ... (a polygon given as (k, corners, SOP instance UID) names that image as its contour image);
    ``referenced_series``: the image series it names. Without ``rois``: a bare header."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "RTSTRUCT", generate_uid(), generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ (np.eye(4) if affine is None else affine)
    structures, contours, observations = [], [], []
    for number, (name, kind, polygons) in enumerate(rois, 1):
        roi, outline, observation = Dataset(), Dataset(), Dataset()
        roi.ROINumber, roi.ROIName = number, name
        outline.ReferencedROINumber = observation.ReferencedROINumber = number
        observation.ObservationNumber, observation.RTROIInterpretedType = number, kind
        items = []
        for k, corners, *image in polygons:
            item = Dataset()
            if image:
                reference = Dataset()
                reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", image[0]
                item.ContourImageSequence = Sequence([reference])
            points = [(lps @ np.array([i, j, k, 1.0]))[:3] for i, j in corners]
            item.ContourGeometricType, item.NumberOfContourPoints = "CLOSED_PLANAR", len(points)
            item.ContourData = [f"{v:.6g}" for point in points for v in point]
            items.append(item)
        outline.ContourSequence = Sequence(items)
        structures.append(roi)
        contours.append(outline)
        observations.append(observation)
    if rois:
        ds.StructureSetROISequence = Sequence(structures)
        ds.ROIContourSequence = Sequence(contours)
        ds.RTROIObservationsSequence = Sequence(observations)
    if referenced_series:
        series, study, frame = Dataset(), Dataset(), Dataset()
        series.SeriesInstanceUID = referenced_series
        study.RTReferencedSeriesSequence = Sequence([series])
        frame.RTReferencedStudySequence = Sequence([study])
        ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_dicom_seg(path: Path, labels_zyx: np.ndarray, affine: np.ndarray, names: list[str],
                    fractional: bool = False, extra_masks: tuple = ()) -> Path:
    """A DICOM SEG file of a label volume drawn on an image of geometry ``affine`` (voxel (i, j, k) -> RAS): a frame for
    each segment (label n is segment n, labelled ``names[n - 1]``) at each slice that holds it, none for empty slices,
    as segmentation tools export them; BINARY (bits packed) or FRACTIONAL (0-255). ``extra_masks``: more frames,
    (segment number, slice, mask), drawn over the others."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    write_enhanced_dicom(path, np.zeros((2, 2, 2), np.int16), affine)  # the file meta, shared groups and UIDs
    ds = pydicom.dcmread(path)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    ds.Modality, ds.SOPClassUID = "SEG", "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SegmentationType = "FRACTIONAL" if fractional else "BINARY"
    if fractional:
        ds.SegmentationFractionalType, ds.MaximumFractionalValue = "PROBABILITY", 255
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8, 8, 7, 0) if fractional else (1, 1, 0, 0)
    ds.Rows, ds.Columns = labels_zyx.shape[1:]
    segments = []
    for n, name in enumerate(names, 1):
        segment = Dataset()
        segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = n, name, "MANUAL"
        segments.append(segment)
    ds.SegmentSequence = Sequence(segments)
    frames = [(n, k, labels_zyx[k] == n) for n in range(1, len(names) + 1) for k in range(len(labels_zyx))
              if (labels_zyx[k] == n).any()] + list(extra_masks)
    groups = []
    for n, k, _ in frames:
        position, segment, group = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [round(float(v), 4) for v in lps[:3, 3] + k * lps[:3, 2]]
        segment.ReferencedSegmentNumber = n
        group.PlanePositionSequence, group.SegmentIdentificationSequence = Sequence([position]), Sequence([segment])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.NumberOfFrames = len(frames)
    masks = np.stack([mask for _, _, mask in frames]).astype(np.uint8)
    data = (masks * 255).tobytes() if fractional else np.packbits(masks.ravel(), bitorder="little").tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds.save_as(str(path))
    return Path(path)
