"""DICOM label objects: a DICOM SEG read onto an image's voxel grid (:func:`seg_on_grid`), an RT structure set's
contours filled on it (:func:`contours_on_grid`; :func:`coral_core.volume.load_labels_like` uses both), and a label
volume written as a DICOM SEG (:func:`save_dicom_seg`), a segmentation object that PACS, OHIF, 3D Slicer and other
DICOM tools show on the image series it was drawn on, or as an RT structure set (:func:`save_rt_structure_set`),
the closed contours that radiotherapy planning systems import.

Both refer to the DICOM images they label, so they can be written only for an image read from DICOM (a series
folder, or a multi-frame file). A SEG frame is one segment on one source image (or one frame of a multi-frame
source), in that image's own rows and columns, with the image's position, orientation and pixel spacing; frames
that label nothing are left out. Label value n becomes segment n (ROI n of a structure set), named by
``class_names[n]``. The patient, study and frame of reference are the source's; the series is new.

A cine's labels (t, z, y, x) go frame by frame onto the images of each phase, and are read back onto a cine by the
image each SEG frame or contour names (:func:`coral_core.volume.dicom_phases` says which phase an image is).
"""

from __future__ import annotations

import datetime
import functools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from coral_core.errors import MissingStructureError, OffGridError, UserError
from coral_core.fileio import atomic_target, check_output_path
from coral_core.volume import _NOT_IMAGES as _NOT_IMAGE_MODALITIES
from coral_core.volume import (_LPS_TO_RAS, Volume, _functional_value, _looks_like_dicom, _short, is_dicom_file,
                               is_dicom_labels, is_volume_path, main_orientation)

__all__ = ["save_dicom_seg", "save_rt_structure_set", "seg_on_grid", "contours_on_grid", "structure_names",
           "referenced_series", "check_dicom_seg_source", "is_dicom_seg_name", "dicom_lab", "SEG_ALGORITHMS",
           "pick_structures", "segment_codes", "roi_type"]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage SOP class
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_ALGORITHMS = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")  # how the segments (ROIs) were made (DICOM's words)

# Attributes copied from the source image: patient, study, frame of reference (type 2: present, maybe empty).
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
           "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
           "FrameOfReferenceUID")
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
           "ReferringPhysicianName", "StudyID", "AccessionNumber")
_NOT_IMAGES = {*_NOT_IMAGE_MODALITIES, "KO"}  # objects in a series folder that are no source image
_POINT_TYPES = {"MARKER", "REGISTRATION", "ISOCENTER"}  # RT ROI interpreted types of points, not regions
# Contour geometric types of closed outlines: both read even-odd (CLOSEDPLANAR_XOR says so; for CLOSED_PLANAR, a
# contour inside another of its ROI on a slice is its hole, as planning systems mostly read it)
_CLOSED = {"CLOSED_PLANAR", "CLOSEDPLANAR_XOR"}


def is_dicom_seg_name(path: str | os.PathLike) -> bool:
    """True for an output name that asks for DICOM labels, a SEG or an RT structure set (ends with .dcm)."""
    return Path(path).name.lower().endswith(".dcm")


@dataclass(frozen=True)
class _Plane:
    """One source image (or one frame of a multi-frame source) that a SEG frame can label."""

    sop_class: str
    sop_instance: str
    frame: int | None  # its number in a multi-frame file (from 1); None for a file of one image
    position: np.ndarray  # LPS of its first pixel's centre, mm
    orientation: np.ndarray  # direction cosines of a row, then of a column
    spacing: tuple[float, float]  # mm between rows, between columns
    rows: int
    columns: int
    series: str = ""  # its Series Instance UID
    phase: int = 0  # the frame of a cine it belongs to, as the image reader orders them (0 in a 3-D series)


def check_dicom_seg_source(source: str | os.PathLike | None, out: str | os.PathLike, what: str = "DICOM SEG") -> Path:
    """The DICOM source (a series folder or a multi-frame file) a SEG (or another DICOM label object, ``what``) named
    ``out`` would refer to; raises :class:`UserError` with one sentence when ``source`` is not DICOM (call before any
    work is done)."""
    p = Path(source) if source is not None else None
    if p is None or not (p.is_dir() and is_volume_path(p) or is_dicom_file(p) and not is_dicom_labels(p)):
        raise UserError(f"{out}: a {what} refers to the DICOM images it labels, but "
                        f"{p if p is not None else 'this image'} is not a DICOM image series; end the output's name "
                        "with .nii.gz, .mha or .nrrd")
    return p


def save_dicom_seg(path: str | os.PathLike, labels: np.ndarray, like: Volume, class_names: list[str] | None = None,
                   *, series_uid: str | list[str] | None = None, algorithm: str = "AUTOMATIC",
                   description: str = "napari-coral segmentation") -> Path:
    """Write ``labels`` ((z, y, x), the shape of ``like``, which was read from a DICOM series folder or multi-frame
    file; of a cine, (t, z, y, x): every frame, each image's labels on it) as a BINARY DICOM SEG referring to
    ``like``'s source images, atomically; a cine's frames also carry their temporal position index (t + 1), a
    dimension of the SEG. ``series_uid`` picks the series of a folder that holds several (napari's
    ``dicom_series``: a UID, or the UIDs of a cine stack exported one series per slice position);
    ``algorithm`` is one of :data:`SEG_ALGORITHMS`. Raises :class:`UserError` with one sentence for an image not
    read from DICOM, labels of another count of frames, or labels whose grid is not the source images'."""
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    p, header, planes, sampled, places = _labels_on_sources(path, labels, like, series_uid, algorithm, "DICOM SEG")
    names = [str(n) for n in (class_names or ["background"])]
    count = max(len(names) - 1, int(labels.max(initial=0)))
    held = [np.unique(plane_labels) for plane_labels in sampled]  # the values on each plane
    frames = sorted((int(n), index) for index, values in enumerate(held) for n in values if n > 0)  # (segment, plane)
    if not frames:  # nothing labelled: one empty frame, as a SEG holds at least one
        frames = [(1, 0)]
    count = max(count, 1)

    ds = _new_object(header, SEG_STORAGE, "SEG", description, names)
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel, ds.ContentDescription, ds.ContentCreatorName = "SEGMENTATION", description[:64], ""
    ds.SegmentationType = "BINARY"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = planes[0].rows, planes[0].columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    ds.SegmentSequence = Sequence([_segment(n, names[n] if n < len(names) else f"class {n}", algorithm)
                                   for n in range(1, count + 1)])

    organisation = generate_uid()
    ds.DimensionOrganizationType = "3D"
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organisation)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=0x0062000B,
              FunctionalGroupPointer=0x0062000A, DimensionDescriptionLabel="ReferencedSegmentNumber"),
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=0x00200032,
              FunctionalGroupPointer=0x00209113, DimensionDescriptionLabel="ImagePositionPatient")])
    cine = np.ndim(labels) == 4
    if cine:  # frames at one position told apart by their phase
        ds.DimensionIndexSequence.append(_item(
            DimensionOrganizationUID=organisation, DimensionIndexPointer=0x00209128, FunctionalGroupPointer=0x00209111,
            DimensionDescriptionLabel="TemporalPositionIndex"))
    position_index = {k: i + 1 for i, k in enumerate(sorted({k for _, k in places}))}  # of the positions, from 1
    first = planes[0]
    columns = like.affine[:3, :3]
    normal = np.cross(columns[:, 0], columns[:, 1])
    between = abs(float(columns[:, 2] @ normal)) / float(np.linalg.norm(normal))  # along the normal (a tilt: shorter)
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=_ds(first.orientation, 8))]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=_ds(first.spacing, 8),
                                              SliceThickness=_ds([header.get("SliceThickness") or between], 8)[0],
                                              SpacingBetweenSlices=_ds([between], 8)[0])]))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for n, index in frames:
        plane = planes[index]
        image = _image_reference(plane)
        image.SpatialLocationsPreserved = "YES"  # the frame is the source image's own pixel grid
        image.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "DCM", "Source image for image processing "
                                                                                "operation")])
        t, k = places[index]
        content = _item(DimensionIndexValues=[n, position_index[k], *([t + 1] if cine else [])])
        if cine:
            content.TemporalPositionIndex = t + 1
        per_frame.append(_item(
            DerivationImageSequence=Sequence([_item(SourceImageSequence=Sequence([image]),
                                                    DerivationCodeSequence=Sequence([_code("113076", "DCM",
                                                                                           "Segmentation")]))]),
            FrameContentSequence=Sequence([content]),
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=_ds(plane.position, 6))]),
            SegmentIdentificationSequence=Sequence([_item(ReferencedSegmentNumber=n)])))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.ReferencedSeriesSequence = Sequence([_item(
        SeriesInstanceUID=series,
        ReferencedInstanceSequence=Sequence([_item(ReferencedSOPClassUID=c, ReferencedSOPInstanceUID=i)
                                             for c, i in instances]))
        for series, instances in _by_series(planes).items()])
    masks = np.stack([sampled[index] == n for n, index in frames]).astype(np.uint8)
    ds.PixelData = pack_bits(masks)  # frames packed one after another, padded to an even length
    with atomic_target(p, suffix=".dcm") as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    return p


def save_rt_structure_set(path: str | os.PathLike, labels: np.ndarray, like: Volume,
                          class_names: list[str] | None = None, *, series_uid: str | list[str] | None = None,
                          algorithm: str = "AUTOMATIC", description: str = "napari-coral segmentation") -> Path:
    """Write ``labels`` ((z, y, x), the shape of ``like``, which was read from a DICOM series folder or multi-frame
    file; of a cine, (t, z, y, x)) as a DICOM RT structure set on ``like``'s source images, atomically (a cine's
    contours each on the image of its frame): label n is ROI n, named
    ``class_names[n]``, with napari's colour for n; each of its pieces on a source image is a CLOSED_PLANAR contour
    referring to that image, and a hole in a piece is a contour inside it (read even-odd, as
    :func:`contours_on_grid` and planning systems read them). A contour runs through the midpoints between the
    voxel centres inside and outside, so the voxels whose centres it holds are exactly the labelled ones; corners
    only (points along a straight run are left out). A class no voxel holds is an ROI without contours.
    ``series_uid`` and ``algorithm`` (the ROIs' generation algorithm) as for :func:`save_dicom_seg`; raises
    :class:`UserError` in the same cases."""
    from pydicom.sequence import Sequence

    from coral_core.plotting import LABEL_COLOURS

    p, header, planes, sampled, _ = _labels_on_sources(path, labels, like, series_uid, algorithm,
                                                       "DICOM RT structure set")
    names = [str(n) for n in (class_names or ["background"])]
    count = max(len(names) - 1, int(labels.max(initial=0)), 1)
    ds = _new_object(header, RT_STRUCTURE_SET_STORAGE, "RTSTRUCT", description, names)
    frame_of_reference = ds.FrameOfReferenceUID  # named where the structure set refers to it, not as an image's
    for name in ("FrameOfReferenceUID", "PositionReferenceIndicator", "ContentDate", "ContentTime"):
        del ds[name]
    ds.OperatorsName = ""
    ds.StructureSetLabel = "napari-coral"
    ds.StructureSetName = description[:64]
    ds.StructureSetDate, ds.StructureSetTime = ds.SeriesDate, ds.SeriesTime
    images = [_image_reference(plane) for plane in planes]
    ds.ReferencedFrameOfReferenceSequence = Sequence([_item(
        FrameOfReferenceUID=frame_of_reference,
        RTReferencedStudySequence=Sequence([_item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",  # the study, as structure sets name it
            ReferencedSOPInstanceUID=ds.get("StudyInstanceUID", ""),
            RTReferencedSeriesSequence=Sequence([_item(SeriesInstanceUID=series, ContourImageSequence=Sequence(
                [image for plane, image in zip(planes, images) if plane.series == series]))
                for series in _by_series(planes)]))]))])
    pieces = [_pieces(plane_labels, count) for plane_labels in sampled]  # {n: (box, mask)} of each plane
    rois, outlines, observations = [], [], []
    for n in range(1, count + 1):
        name = (names[n] if n < len(names) else f"class {n}")[:64]
        rois.append(_item(ROINumber=n, ReferencedFrameOfReferenceUID=frame_of_reference, ROIName=name,
                          ROIGenerationAlgorithm=algorithm))
        colour = LABEL_COLOURS[n] if n < len(LABEL_COLOURS) else "#ffffff"
        outline = _item(ReferencedROINumber=n, ROIDisplayColor=[int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        contours = []
        for plane, image, held in zip(planes, images, pieces):
            if n not in held:
                continue
            (top, left), mask = held[n]
            for corners in _outlines(mask):
                contour = _item(ContourImageSequence=Sequence([image]), ContourGeometricType="CLOSED_PLANAR",
                                NumberOfContourPoints=len(corners))
                _set_decimals(contour, 0x30060050, _patient_points(plane, corners + (top, left)).ravel())
                contours.append(contour)
        if contours:  # none: an ROI no voxel holds
            outline.ContourSequence = Sequence(contours)
        outlines.append(outline)
        observation = _item(ObservationNumber=n, ReferencedROINumber=n, RTROIInterpretedType=roi_type(name),
                            ROIInterpreter="")
        kind = segment_codes(name)[1]
        if kind[0] != _TISSUE[0]:  # a structure DICOM names: its code, as the SEG's segment carries it
            observation.RTROIIdentificationCodeSequence = Sequence([_code(*kind)])
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(outlines)
    ds.RTROIObservationsSequence = Sequence(observations)
    with atomic_target(p, suffix=".dcm") as tmp:
        ds.save_as(str(tmp), enforce_file_format=True)
    return p


def roi_type(name: str) -> str:
    """The RT ROI interpreted type a structure set gives an ROI of this name: EXTERNAL for the body outline ("External",
    "Body", as radiotherapy names it), GTV, CTV or PTV for a target volume whose name starts so ("PTV_70", "GTVp",
    "ctv"), ORGAN otherwise. Planning systems take the EXTERNAL ROI as the patient's outline, and
    :func:`contours_on_grid` fills it first, under the others."""
    key = name.strip().upper()
    if key in ("EXTERNAL", "BODY"):
        return "EXTERNAL"
    return next((kind for kind in ("GTV", "CTV", "PTV") if key.startswith(kind)), "ORGAN")


def _labels_on_sources(path, labels: np.ndarray, like: Volume, series_uid, algorithm: str,
                       what: str) -> tuple:
    """The checks both writers make, then (output path, first source header, the source planes in slice order (a
    cine's frame by frame), the labels on each in its own rows and columns, the (frame, slice) of each)."""
    p = check_output_path(path)
    source = check_dicom_seg_source(like.path, p, what)
    if algorithm not in SEG_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {SEG_ALGORITHMS}, not {algorithm!r}")
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4):
        raise UserError(f"{p}: a {what} is written for a 3-D image or a cine's frames, and these labels have "
                        f"{labels.ndim} dimensions; end the output's name with .nii.gz, .mha or .nrrd")
    if labels.shape[-3:] != like.shape[-3:]:
        raise ValueError(f"labels shape {labels.shape} differs from the image's {like.shape}")
    if labels.min(initial=0) < 0:
        raise UserError(f"{p}: labels hold negative values, which no {what} can hold; clear them first")
    header, planes = _source_planes(source, series_uid, p)
    placed = _on_planes(labels, like, planes, p, source)  # each plane's slice, and labels in its rows and columns
    order = sorted(range(len(planes)), key=lambda index: placed[index][0])  # in slice order, a cine's frame by frame
    return (p, header, [planes[index] for index in order], [placed[index][1] for index in order],
            [placed[index][0] for index in order])


def _by_series(planes: list[_Plane]) -> dict[str, dict[tuple, None]]:
    """The planes' images (SOP class, instance), each once, by series in the order the planes name them (a cine
    stack exported one series per slice position spans several)."""
    found: dict[str, dict[tuple, None]] = {}
    for plane in planes:
        found.setdefault(plane.series, {})[(plane.sop_class, plane.sop_instance)] = None
    return found


def _new_object(header, sop_class: str, modality: str, description: str, names=()):
    """A new DICOM object of a new series in the source's patient, study and frame of reference, made by us now. Its
    text is UTF-8 (ISO_IR 192) when the source declares a character set (its patient's name may need one) or the
    description or ``names`` (of segments, ROIs) are not ASCII; plain ASCII otherwise."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import coral_core

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    if header.get("SpecificCharacterSet") or not all(str(text).isascii() for text in (description, *names)):
        ds.SpecificCharacterSet = "ISO_IR 192"  # every value read from the source is text by now: UTF-8 holds it
    for name in _COPIED:
        if name in header:
            setattr(ds, name, header[name].value)
        elif name in _TYPE_2:
            setattr(ds, name, "")
    if "FrameOfReferenceUID" not in ds:  # a source without one: the labels still need one
        ds.FrameOfReferenceUID = generate_uid()
    now = datetime.datetime.now()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = modality, generate_uid(), 300, 1
    ds.SeriesDescription = description[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = ds.ManufacturerModelName = "napari-coral"
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = coral_core.__version__
    return ds


def _image_reference(plane: _Plane):
    """A reference to a source image (and its frame, in a multi-frame file)."""
    reference = _item(ReferencedSOPClassUID=plane.sop_class, ReferencedSOPInstanceUID=plane.sop_instance)
    if plane.frame is not None:
        reference.ReferencedFrameNumber = plane.frame
    return reference


def _set_decimals(item, tag: int, values: np.ndarray) -> None:
    """Set a decimal string (DS) element of a new dataset ``item`` to ``values``, 10 significant digits each (at most
    16 characters: valid), held as the bytes to write. Set as numbers, pydicom made and checked an object for each
    one, which took most of the time of writing a structure set of many contours. The item is marked as encoded as
    the file will be (explicit VR little endian, the default character set), so that pydicom writes the bytes as
    they are."""
    from pydicom.charset import default_encoding
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.10g}" for v in values.tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "  # DICOM values have even lengths
    item[tag] = RawDataElement(Tag(tag), "DS", len(text), text, 0, False, True)
    item.set_original_encoding(False, True, default_encoding)  # a new item: pydicom's default character set


def _pieces(plane_labels: np.ndarray, count: int) -> dict[int, tuple]:
    """Each label (1 to ``count``) on a plane: {n: ((first row, first column) of its bounding box, its mask there)}."""
    from scipy import ndimage

    boxes = ndimage.find_objects(plane_labels, max_label=count)
    return {n: ((box[0].start, box[1].start), plane_labels[box] == n) for n, box in enumerate(boxes, 1)
            if box is not None}


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """The closed outlines of a (rows, columns) mask's pieces and of their holes, each (n, 2) corners as (row, column):
    the 0.5 level line between the mask's pixel centres (through the midpoints of the steps between a pixel inside
    and one outside), so the pixel centres inside an odd number of outlines are the mask's; points where the line goes
    straight on are left out."""
    if not mask.any():
        return []
    import contourpy

    padded = np.pad(mask, 1).astype(np.float32)  # every line closes inside the padding
    lines = contourpy.contour_generator(z=padded, name="serial", line_type="Separate", corner_mask=False).lines(0.5)
    outlines = []
    for line in lines:
        corners = np.round(line[:-1, ::-1] * 2).astype(np.int64)  # (row, column) in half pixels, exact; the last
        before, after = corners - np.roll(corners, 1, 0), np.roll(corners, -1, 0) - corners  # repeats the first
        turns = before[:, 0] * after[:, 1] != before[:, 1] * after[:, 0]
        outlines.append(corners[turns] / 2 - 1)  # the padding's pixel taken off
    return outlines


def _patient_points(plane: _Plane, corners: np.ndarray) -> np.ndarray:
    """(row, column) positions on a source image plane in LPS mm, (n, 3)."""
    row_step = plane.orientation[3:] * plane.spacing[0]  # one row down
    column_step = plane.orientation[:3] * plane.spacing[1]  # one column to the right
    return plane.position + corners[:, :1] * row_step + corners[:, 1:] * column_step


def alternatives(name: str) -> list[str]:
    """The names a wanted structure may have: ``Heart|Cor`` is Heart or else Cor (a structure named differently
    from file to file); a plain name is itself."""
    return [one.strip() for one in name.split("|") if one.strip()]


def find_structures(available: list[str], wanted: list[str]) -> list[int | None]:
    """The position in ``available`` (names) of each ``wanted`` name, matched without regard to case, an entry ``A|B``
    by the first of its names that is there (:func:`alternatives`); None for one that is not there."""
    index: dict[str, int] = {}
    for i, name in enumerate(available):
        index.setdefault(name.strip().casefold(), i)
    return [next((index[one.casefold()] for one in alternatives(name) if one.casefold() in index), None)
            for name in wanted]


def pick_structures(available: list[str], wanted: list[str], p) -> list[int]:
    """The positions in ``available`` (a label file's classes, a SEG's segments or a structure set's ROIs, by name)
    of the ``wanted`` names, in their order, matched without regard to case, an entry ``A|B`` by the first of its
    names that is there (:func:`alternatives`); one sentence naming the file and what it holds when a name is not
    there, or when two entries would take one structure."""
    found = find_structures(available, wanted)
    missing = [" or ".join(map(repr, alternatives(name))) for name, i in zip(wanted, found) if i is None]
    if missing:
        held = ", ".join(available) if available else "no named structures"
        raise MissingStructureError(f"{p}: holds no structure named {', '.join(missing)}; it holds {held} (names "
                                    "are matched without regard to case)")
    for k, i in enumerate(found):
        if i in found[:k]:
            raise UserError(f"{p}: {wanted[found.index(i)]!r} and {wanted[k]!r} both name its structure "
                            f"{available[i]!r}; give each structure once")
    return found


def seg_on_grid(p: Path, like: Volume, structures: list[str] | None = None, *, quiet: bool = False) -> np.ndarray:
    """A DICOM SEG file's segments on the voxel grid of the image ``like`` (segment n: label n; drawn over one
    another, the highest number's, with a warning); :class:`OffGridError` when a frame does not lie on it. On a cine
    (``like`` of shape (t, z, y, x), read from DICOM), each frame is placed in the cine's frame of the source image
    it names (:class:`OffGridError` when it names none of them).
    ``structures``: only the segments of these labels, in this order (label 1, 2, ...; :func:`pick_structures`).
    ``quiet``: no warning for segments drawn over one another."""
    to_voxel = np.linalg.inv(_LPS_TO_RAS @ like.affine)  # LPS (DICOM's) -> the image's voxel (i, j, k)
    frames = []
    seg_frames, segments = _seg_frames(str(p), os.stat(p).st_mtime_ns, len(like.shape) == 4)
    if structures is not None:  # renumbered: the picked segments 1, 2, ... in the order asked, the others left out
        numbers = sorted(segments)
        picked = pick_structures([segments[n] for n in numbers], structures, p)
        renumber = {numbers[i]: n for n, i in enumerate(picked, 1)}
        seg_frames = [(renumber[number], *rest) for number, *rest in seg_frames if number in renumber]
    top = max((number for number, *_ in seg_frames), default=0)
    labels = np.zeros(like.shape, np.uint8 if top < 256 else np.uint16)
    phase = _phase_finder(p, like, [frame[4] for frame in seg_frames], "DICOM SEG frames")
    for number, position, axes, mask, source in seg_frames:
        start = (to_voxel @ np.array([*position, 1.0]))[:3]
        steps = to_voxel[:3, :3] @ axes  # one column, one row: in voxels
        frames.append((number, _plane_on_grid(start, steps[:, 0], steps[:, 1], *mask.shape, like.shape[-3:]), mask,
                       phase(source)))
    for number, place, mask, t in sorted(frames, key=lambda f: f[0]):
        if place is None:
            raise OffGridError(f"{p}: DICOM SEG frames do not lie on the voxel grid of {like.path} (orientation, "
                               "spacing or position differ); give the segmentation drawn on this image")
        k, view = place
        drawn = view((labels[t] if labels.ndim == 4 else labels)[k])  # a view: writing to it writes the labels
        over = int(np.count_nonzero(mask & (drawn != 0) & (drawn != number)))
        if over and not quiet:
            import warnings

            of_frame = f" of frame {t}" if labels.ndim == 4 else ""
            warnings.warn(f"{p}: {over} voxels of slice {k}{of_frame} belong to more than one segment; each takes the "
                          "highest segment number", stacklevel=3)
        drawn[mask] = number
    return labels


def _phase_finder(p: Path, like: Volume, references: list, what: str):
    """For DICOM labels on ``like``: a function from a source image reference (:func:`_reference_key`) to the frame
    of ``like`` it lies in: 0 for a 3-D image; for a cine (t, z, y, x), the frame of the image it names, read from
    ``like``'s DICOM source; :class:`OffGridError` (``what``: the labels' parts, as the sentence names them) when
    they name no image of it."""
    if len(like.shape) != 4:
        return lambda reference: 0
    named = [reference for reference in references if reference is not None]
    source = Path(like.path) if like.path is not None else None
    phases = _reference_phases(source, named) if named and source is not None and source.exists() else {}

    def phase(reference) -> int:
        t = phases.get(reference, phases.get((reference[0], None))) if reference is not None else None
        if t is None:
            raise OffGridError(f"{p}: {what} name no image of the cine series {like.path} (each must name the image "
                               "it was drawn on), so their frames cannot be told; give the labels drawn on this series")
        return t

    return phase


def _plane_on_grid(start, column, row, rows: int, columns: int, shape) -> tuple | None:
    """Where an image plane lies on a (z, y, x) voxel grid: (its slice k, a function giving the view of a (y, x) slice
    array that holds the plane's pixels in its own (rows, columns) order), from its first pixel's voxel coordinates
    ``start`` (i, j, k) and the voxel steps of one column and of one row (the plane's rows and columns may run along
    the grid's in either direction, or swapped); None when its pixels are not the voxels of one slice (another
    orientation, spacing or position, or partly outside)."""
    origin = np.round(start).astype(int)
    exact = np.stack([column, row])
    steps = np.round(exact).astype(int)
    units = np.abs(steps[:, :2])
    if not (np.allclose(start, origin, atol=0.05) and np.allclose(exact, steps, atol=0.01) and not steps[:, 2].any()
            and (units.sum(0) == 1).all() and (units.sum(1) == 1).all() and 0 <= origin[2] < shape[0]):
        return None
    column_axis = 0 if steps[0, 0] else 1  # the voxel axis (0: i, 1: j) one column to the right moves along
    spans = {column_axis: (int(steps[0, column_axis]), columns),
             1 - column_axis: (int(steps[1, 1 - column_axis]), rows)}
    cut = []
    for axis, size in ((1, shape[1]), (0, shape[2])):  # j (the array's y), then i (its x)
        step, count = spans[axis]
        first, last = int(origin[axis]), int(origin[axis]) + step * (count - 1)
        if min(first, last) < 0 or max(first, last) >= size:
            return None
        stop = last + step
        cut.append(slice(first, stop if stop >= 0 else None, step))
    rows_along_j = column_axis == 0
    return int(origin[2]), (lambda image: image[cut[0], cut[1]] if rows_along_j else image[cut[0], cut[1]].T)


@functools.lru_cache(maxsize=4)
def _seg_frames(name: str, mtime: int, sources: bool = False) -> tuple[list[tuple], dict[int, str]]:
    """A DICOM SEG file's frames, each (segment number, position in LPS, the LPS steps of one column and one row as a
    (3, 2) array, mask as bool, with ``sources`` the source image it names as (SOP instance UID, frame number or
    None), else None: looking them up took a third of the read of a 340-frame SEG), and its segments' labels by
    number, read once while the file stays the same (napari
    tries it on each open image). A LABELMAP SEG (each frame's pixels the numbers of their segments, 0 none) gives a
    frame for each segment a frame holds; a BINARY or FRACTIONAL one names each frame's segment."""
    import pydicom

    p = Path(name)
    try:
        return _read_seg_frames(pydicom.dcmread(name), p, sources)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's and NumPy's many errors for a damaged file
        raise UserError(f"{p}: DICOM SEG is not readable ({_short(exc)}); re-export it") from None


def _read_seg_frames(ds, p: Path, sources: bool) -> tuple[list[tuple], dict[int, str]]:
    masks = ds.pixel_array
    per = ds.PerFrameFunctionalGroupsSequence
    masks = masks.reshape(-1, *masks.shape[-2:])
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    if kind == "FRACTIONAL":  # a probability or occupancy per pixel
        masks = masks >= float(ds.get("MaximumFractionalValue", 255)) / 2
    shared = (getattr(ds, "SharedFunctionalGroupsSequence", None) or [None])[0]
    frames = []
    for frame_index, (frame, mask) in enumerate(zip(per, masks)):
        position = _functional_value(frame, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional_value(frame, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        pixel = _functional_value(frame, shared, "PixelMeasuresSequence", "PixelSpacing")
        number = _functional_value(frame, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        if position is None or orientation is None or pixel is None or (number is None and kind != "LABELMAP"):
            raise UserError(f"{p}: DICOM SEG frame {frame_index + 1} gives no position, orientation, "
                            "pixel spacing or segment number; re-export it")
        o, (row, column) = _floats(orientation, 6), _floats(pixel, 2)
        axes = np.stack([o[:3] * column, o[3:] * row], 1)
        where = _floats(position, 3)
        source = _source_image(frame) if sources else None
        if kind == "LABELMAP":  # the segments' numbers in the pixels
            frames.extend((int(n), where, axes, mask == n, source) for n in np.unique(mask) if n > 0)
        else:
            frames.append((int(number), where, axes, mask.astype(bool), source))
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment {s.SegmentNumber}")
                for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) > 0}  # a LABELMAP's 0: background
    return frames, segments


def _source_image(frame) -> tuple | None:
    """The source image a SEG frame's functional groups name (its derivation's first source image): (SOP instance
    UID, frame number in a multi-frame source or None); None when it names none."""
    try:
        image = frame.DerivationImageSequence[0].SourceImageSequence[0]
    except (AttributeError, IndexError):
        return None
    return _reference_key(image)


def _contour_image(contour) -> tuple | None:
    """The image an RT contour names (its contour image sequence's first), as :func:`_reference_key` gives it."""
    images = contour.get("ContourImageSequence") or []
    return _reference_key(images[0]) if len(images) else None


def _reference_key(image) -> tuple | None:
    """(SOP instance UID, frame number or None) of a DICOM image reference item; None without an instance."""
    uid = str(image.get("ReferencedSOPInstanceUID", "") or "")
    if not uid:
        return None
    number = image.get("ReferencedFrameNumber")
    if number is not None and not isinstance(number, (int, float, str)):  # several values: the first
        number = number[0] if len(number) else None
    try:
        return uid, int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        return uid, None


def referenced_series(path: str | os.PathLike) -> str:
    """The Series Instance UID of the images a DICOM SEG (its referenced series) or RT structure set (the series of
    its referenced frame of reference) was drawn on, from its header; "" when it names none or is not readable."""
    import pydicom

    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=[
            "ReferencedSeriesSequence", "ReferencedFrameOfReferenceSequence"])
        if "ReferencedSeriesSequence" in header:
            return str(header.ReferencedSeriesSequence[0].SeriesInstanceUID)
        frame = header.ReferencedFrameOfReferenceSequence[0]
        return str(frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except Exception:  # noqa: BLE001 - names no series
        return ""


def structure_names(p: Path) -> list[str]:
    """The names of an RT structure set's region ROIs (those with closed contours, or none), in the order
    :func:`contours_on_grid` labels them (label n: the n-th)."""
    return [name for _, name, _, _ in _structures(str(p), os.stat(p).st_mtime_ns, False)]  # as a 3-D read asks


def contours_on_grid(p: Path, like: Volume, structures: list[str] | None = None, *,
                     quiet: bool = False) -> tuple[np.ndarray, list[str]]:
    """A DICOM RT structure set's closed planar contours filled on the voxel grid of the image ``like``: (labels,
    the ROIs' names); on a cine (``like`` (t, z, y, x), read from DICOM), each contour in the frame of the image it
    names. Its regions, in ROI number order, are labels 1, 2, ...: the ROIs with closed contours, and those
    with no contours at all (a structure drawn nowhere: a label no voxel has, so that the labels of a structure set
    keep their numbers whichever of its ROIs are empty); an ROI of points or open lines only, or an empty one of a
    point's type (a marker, an isocentre), is none. A voxel is inside a contour
    when its centre is; contours of one ROI on one slice combine even-odd (a contour inside another is a hole).
    EXTERNAL ROIs (the body outline) are filled first, the others over them in order; other overlaps warn in one
    sentence (the later ROI takes the voxel). Raises :class:`OffGridError` for a contour that does not lie in one of
    the image's slices. ``structures``: only the ROIs of these names, in this order (labels 1, 2, ...;
    :func:`pick_structures`), the others not filled at all. ``quiet``: no warning for overlaps."""
    rois = _structures(str(p), os.stat(p).st_mtime_ns, len(like.shape) == 4)
    if structures is not None:
        rois = [rois[i] for i in pick_structures([name for _, name, _, _ in rois], structures, p)]
    if not any(contours for *_, contours in rois):
        raise UserError(f"{p}: DICOM RT structure set holds no closed contours, so it labels nothing; give one that "
                        "outlines the structures")
    to_voxel = np.linalg.inv(_LPS_TO_RAS @ like.affine)  # LPS -> the image's voxel (i, j, k)
    labels = np.zeros(like.shape, np.uint8 if len(rois) < 256 else np.uint16)
    depth, rows, columns = like.shape[-3:]
    phase = _phase_finder(p, like, [reference for *_, contours in rois for _, reference in contours], "its contours")
    over = 0
    for value in sorted(range(1, len(rois) + 1), key=lambda n: rois[n - 1][2] != "EXTERNAL"):  # stable: ROI order
        number, name, kind, contours = rois[value - 1]
        filled: dict[tuple, np.ndarray] = {}  # (frame, slice) -> inside
        for points, reference in contours:
            voxels = (to_voxel @ np.c_[points, np.ones(len(points))].T).T[:, :3]  # (n, 3): i, j, k
            k = int(np.round(voxels[:, 2].mean()))
            if not (np.allclose(voxels[:, 2], k, atol=0.1) and 0 <= k < depth):
                raise OffGridError(f"{p}: contours of ROI {name!r} do not lie in the slices of {like.path} (another "
                                   "orientation or slice position); give the structure set drawn on this image")
            t = phase(reference)
            drawn = _polygon_centres(voxels[:, :2], rows, columns)
            if drawn is None:
                continue  # around no voxel centre of the slice
            box, inside = drawn
            mask = filled.setdefault((t, k), np.zeros((rows, columns), bool))
            mask[box] ^= inside
        for (t, k), mask in filled.items():
            grid = labels[t] if labels.ndim == 4 else labels
            if kind != "EXTERNAL":
                held = grid[k][mask]
                over += int(np.count_nonzero((held != 0) & ~np.isin(held, _external_values(rois))))
            grid[k][mask] = value
    if over and not quiet:
        import warnings

        warnings.warn(f"{p}: {over} voxels lie inside the contours of more than one ROI; each takes the later ROI's "
                      "label", stacklevel=3)
    return labels, [name for _, name, _, _ in rois]


def _polygon_centres(points: np.ndarray, rows: int, columns: int) -> tuple | None:
    """Which voxel centres of a (rows, columns) slice a closed polygon (its corners as (i, j) voxel coordinates)
    holds, by the even-odd rule along each row: ((the rows and columns it spans, as slices), their inside mask); None
    when it holds none. A centre is inside when an odd number of the polygon's edges cross its row to its left
    (an edge crosses a row when one end lies at or above it and the other below)."""
    i, j = points[:, 0], points[:, 1]
    j0, j1 = max(int(np.ceil(j.min())), 0), min(int(np.floor(j.max())), rows - 1)
    i0, i1 = max(int(np.ceil(i.min())), 0), min(int(np.floor(i.max())), columns - 1)
    if j1 < j0 or i1 < i0:
        return None
    start, end = points, np.roll(points, -1, axis=0)  # each edge, from start to end
    row = np.arange(j0, j1 + 1)[:, None]
    crosses = (start[None, :, 1] <= row) != (end[None, :, 1] <= row)  # (rows, edges)
    rise = np.where(crosses, end[None, :, 1] - start[None, :, 1], 1.0)
    x = np.where(crosses, start[None, :, 0] + (row - start[None, :, 1]) * (end - start)[None, :, 0] / rise, 0.0)
    width = i1 - i0 + 1
    counts = np.zeros((len(row), width + 1), np.int32)  # crossings by the first centre right of them
    r, e = np.nonzero(crosses)
    np.add.at(counts, (r, np.clip(np.floor(x[r, e]).astype(int) + 1 - i0, 0, width)), 1)
    inside = np.cumsum(counts, axis=1)[:, :width] % 2 == 1
    return (slice(j0, j1 + 1), slice(i0, i1 + 1)), inside


def _contour_points(contour) -> np.ndarray:
    """A contour's points, (n, 3) in LPS mm: its decimal strings parsed at once as read (pydicom's own conversion,
    number by number, took most of the time of a structure set of many contours)."""
    value = contour.get_item("ContourData").value
    if isinstance(value, bytes):
        numbers = np.array(value.strip(b" \0").split(b"\\"), dtype=float)
    else:  # converted already (or made in memory)
        numbers = np.array([float(v) for v in value], dtype=float)
    return numbers[:len(numbers) // 3 * 3].reshape(-1, 3)


def _external_values(rois: list) -> list[int]:
    return [n for n, roi in enumerate(rois, 1) if roi[2] == "EXTERNAL"]


@functools.lru_cache(maxsize=4)
def _structures(name: str, mtime: int, images: bool = False) -> list[tuple]:
    """(ROI number, name, interpreted type in upper case, closed planar contours as ((n, 3) LPS array, with
    ``images`` the image it names as :func:`_reference_key` gives it, else None)) of each region
    ROI of an RT structure set (with such contours, or with none at all), by ROI number; read once while the file
    stays the same."""
    import pydicom

    p = Path(name)
    try:
        ds = pydicom.dcmread(name)
        names = {int(r.ROINumber): str(r.get("ROIName", "") or f"ROI {r.ROINumber}")
                 for r in ds.get("StructureSetROISequence", [])}
        kinds = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").upper()
                 for o in ds.get("RTROIObservationsSequence", [])}
        rois = []
        for item in ds.get("ROIContourSequence", []):
            number = int(item.ReferencedROINumber)
            drawn = item.get("ContourSequence", []) or []
            contours = [(points, _contour_image(c) if images else None) for c in drawn
                        if str(c.get("ContourGeometricType", "")).upper() in _CLOSED
                        and len(points := _contour_points(c)) >= 3]
            if contours or not drawn and kinds.get(number, "") not in _POINT_TYPES:  # a region, drawn or empty
                rois.append((number, names.get(number, f"ROI {number}"), kinds.get(number, ""), contours))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{p}: DICOM RT structure set is not readable ({_short(exc)}); re-export it") from None
    return sorted(rois, key=lambda roi: roi[0])


def _source_planes(source: Path, series_uid, out: Path) -> tuple:
    """(the first source header, the source's image planes, each with its series and its frame of a cine as the
    image reader orders them) of a DICOM series folder (the files of ``series_uid``, a Series Instance UID or the
    UIDs of a cine stack exported one series per slice position; else of the one image series or stack it holds)
    or of a multi-frame file."""
    from coral_core.volume import dicom_cine_stack, dicom_phases

    wanted = {series_uid} if isinstance(series_uid, str) else set(series_uid) if series_uid else None
    found = [(f, ds) for f, ds in _image_headers(source) if wanted is None or ds.SeriesInstanceUID in wanted]
    series = sorted({str(ds.SeriesInstanceUID) for _, ds in found})
    if not found or len(series) > 1 and not (source.is_dir() and dicom_cine_stack(source, series) == series):
        raise UserError(f"{out}: {source} holds {'no DICOM image' if not found else f'{len(series)} DICOM series'} "
                        "to refer the labels to; give the folder of one image series")
    planes = []
    try:
        for f, ds in found:
            planes.extend((f, replace(plane, series=str(ds.SeriesInstanceUID))) for plane in _planes(ds))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(f"{out}: the DICOM images in {source} give no position, orientation or pixel spacing "
                        f"({_short(exc)}); DICOM labels cannot be placed on them, write .nii.gz instead") from None
    if len({tuple(np.round(plane.position, 2)) for _, plane in planes}) < len(planes):  # positions repeat: a cine
        phases = dicom_phases(source, series if len(series) > 1 else series[0])
        planes = [(f, replace(plane, phase=phases.get(plane.frame if plane.frame is not None else str(f.resolve()), 0)))
                  for f, plane in planes]
    planes = [plane for _, plane in planes]
    keep = main_orientation([plane.orientation for plane in planes])  # no localizer: the image leaves them out too
    return found[0][1], [plane for plane, kept in zip(planes, keep) if kept]


def _image_headers(source: Path) -> list[tuple]:
    """(file, header without pixels) of each DICOM image of a folder (SEGs, structure sets and other objects that
    are no image left out), or of a multi-frame file."""
    import pydicom

    files = sorted(f for f in source.iterdir() if f.is_file() and _looks_like_dicom(f)) if source.is_dir() else [source]
    found = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM after all (a stray file named .dcm): not a source image
            continue
        if str(ds.get("Modality", "")).upper() in _NOT_IMAGES or "SOPInstanceUID" not in ds:
            continue
        ds.SeriesInstanceUID = str(ds.get("SeriesInstanceUID", ""))
        found.append((f, ds))
    return found


def _reference_phases(source: Path, references) -> dict:
    """{(SOP instance UID, frame number or None): the frame of the cine read from ``source`` that image is} for the
    images of the series that ``references`` (such pairs, from DICOM labels) name; {} when they name none of it."""
    from coral_core.volume import dicom_phases

    uids = {uid for uid, _ in references}
    headers = _image_headers(source)
    series = sorted({ds.SeriesInstanceUID for _, ds in headers if str(ds.SOPInstanceUID) in uids})
    if not series:
        return {}
    phases = dicom_phases(source, series if len(series) > 1 else series[0])
    if not source.is_dir():
        return {(str(ds.SOPInstanceUID), frame): t for _, ds in headers for frame, t in phases.items()}
    return {(str(ds.SOPInstanceUID), None): phases[str(f.resolve())] for f, ds in headers
            if str(f.resolve()) in phases}


def _planes(ds) -> list[_Plane]:
    """The image planes of one source file: one for a file of one image, one per frame for a multi-frame file."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rows, columns = int(ds.Rows), int(ds.Columns)
    if frames == 1 and "ImagePositionPatient" in ds:
        return [_Plane(str(ds.SOPClassUID), str(ds.SOPInstanceUID), None, _floats(ds.ImagePositionPatient, 3),
                       _floats(ds.ImageOrientationPatient, 6), tuple(_floats(ds.PixelSpacing, 2)), rows, columns)]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per = ds.PerFrameFunctionalGroupsSequence
    planes = []
    for number, frame in enumerate(per, 1):
        values = [_functional_value(frame, shared, sequence, name) for sequence, name in (
            ("PlanePositionSequence", "ImagePositionPatient"), ("PlaneOrientationSequence", "ImageOrientationPatient"),
            ("PixelMeasuresSequence", "PixelSpacing"))]
        if any(v is None for v in values):
            raise ValueError(f"frame {number} has none")
        planes.append(_Plane(str(ds.SOPClassUID), str(ds.SOPInstanceUID), number, _floats(values[0], 3),
                             _floats(values[1], 6), tuple(_floats(values[2], 2)), rows, columns))
    return planes


def _on_planes(labels: np.ndarray, like: Volume, planes: list[_Plane], out: Path, source: Path) -> list[tuple]:
    """((frame t, slice k), the labels there in the plane's own rows and columns) of each source plane (the image
    reader may have flipped or swapped the stored axes), for labels (z, y, x) of a 3-D image or (t, z, y, x) of a
    cine's frames; raises :class:`UserError` when a plane does not lie on ``like``'s voxel grid, two lie on one slice
    of a frame, or the labels have another count of frames than the source."""
    frames = max((plane.phase for plane in planes), default=0) + 1
    if (labels.shape[0] if labels.ndim == 4 else 1) != frames:
        held = f"have {labels.shape[0]} frames" if labels.ndim == 4 else "are one volume"
        are = "are one volume" if frames == 1 else f"are a cine of {frames} frames"
        raise UserError(f"{out}: these labels {held} and the DICOM images in {source} {are}; give labels of each of "
                        "its frames, or end the output's name with .nii.gz, .mha or .nrrd")
    to_voxel = np.linalg.inv(_LPS_TO_RAS @ like.affine)  # LPS -> the image's voxel (i, j, k)
    seen: set[tuple] = set()
    sampled = []
    for plane in planes:
        start = (to_voxel @ np.array([*plane.position, 1.0]))[:3]
        column = to_voxel[:3, :3] @ (plane.orientation[:3] * plane.spacing[1])  # one column to the right
        row = to_voxel[:3, :3] @ (plane.orientation[3:] * plane.spacing[0])  # one row down
        place = _plane_on_grid(start, column, row, plane.rows, plane.columns, like.shape[-3:])
        if place is None or (plane.phase, place[0]) in seen:
            what = ("a grid other than the image's" if place is None else
                    "two images at one slice position, a cine whose frames cannot be told apart" if frames == 1 else
                    f"two images at one slice position of one of its {frames} frames")
            raise UserError(f"{out}: the DICOM images in {source} lie on {what}, so the labels cannot be placed on "
                            "them; write .nii.gz instead")
        k, view = place
        seen.add((plane.phase, k))
        sampled.append(((plane.phase, k), np.ascontiguousarray(view((labels[plane.phase] if labels.ndim == 4
                                                                    else labels)[k]))))
    return sampled


@functools.lru_cache(maxsize=None)
def _property_types() -> dict[str, tuple]:
    """DICOM's segmentation property types of anatomical structures (CID 7151) and of tissues (CID 7166), as pydicom
    carries them: {name in lower case without spaces: (category code, type code)}, each code (value, scheme,
    meaning); a tissue's entry (category Tissue) wins where both list a name (adipose tissue, blood)."""
    from pydicom.sr.codedict import codes

    found = {}
    for group, category in ((codes.cid7151, codes.cid7150.AnatomicalStructure), (codes.cid7166, codes.cid7150.Tissue)):
        for key in group.dir():
            code = getattr(group, key)
            found[key.lower()] = tuple((c.value, c.scheme_designator, c.meaning) for c in (category, code))
    return found


def segment_codes(name: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(category, type) codes, each (value, scheme, meaning), of a segment named ``name``: the anatomical structure
    or tissue of that name in DICOM's segmentation property types (CID 7151, 7166; "Liver", "left ventricle",
    "Spinal_Cord", "adipose tissue": case, spaces, hyphens and underscores aside), so that viewers that go by the codes
    (3D Slicer's terminologies, OHIF) know it; else the generic Tissue, Tissue (abbreviations such as "LV" included:
    in ACDC's labels it is the cavity, not the whole ventricle)."""
    key = "".join(part for part in re.split(r"[\s_\-]+", name.strip().lower()) if part)
    return _property_types().get(key, (_TISSUE, _TISSUE))


_TISSUE = ("85756007", "SCT", "Tissue")  # the generic code of a segment named otherwise


def _segment(number: int, name: str, algorithm: str):
    from pydicom.sequence import Sequence

    from coral_core.plotting import LABEL_COLOURS

    colour = LABEL_COLOURS[number] if number < len(LABEL_COLOURS) else "#ffffff"  # napari's and the figures'
    category, kind = segment_codes(name)
    segment = _item(SegmentNumber=number, SegmentLabel=name[:64], SegmentAlgorithmType=algorithm,
                    SegmentedPropertyCategoryCodeSequence=Sequence([_code(*category)]),
                    SegmentedPropertyTypeCodeSequence=Sequence([_code(*kind)]),
                    RecommendedDisplayCIELabValue=dicom_lab(colour))
    if algorithm != "MANUAL":
        segment.SegmentAlgorithmName = "napari-coral"
    return segment


def dicom_lab(colour: str) -> list[int]:
    """An sRGB colour (``#rrggbb``) as DICOM's recommended display value: CIE L*a*b* (D65 white), scaled to 0-65535
    (L* from 0-100, a* and b* from -128-127)."""
    rgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])
    scaled = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return [int(np.clip(round(v), 0, 65535)) for v in scaled]


def _code(value: str, scheme: str, meaning: str):
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _item(**values):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for name, value in values.items():
        setattr(ds, name, value)
    return ds


def _floats(values, n: int) -> np.ndarray:
    """The first ``n`` numbers of a DICOM multi-valued field (pydicom gives one value alone, not in a list)."""
    items = [values] if isinstance(values, (int, float, str, bytes)) else list(values)
    out = np.array([float(v) for v in items[:n]])
    if len(out) != n:
        raise ValueError(f"{n} numbers expected, {len(out)} given")
    return out


def _ds(values, digits: int) -> list[str]:
    """Numbers as DICOM decimal strings (at most 16 characters)."""
    out = []
    for v in values:
        text = f"{float(v):.{digits}g}"
        while len(text) > 16:
            digits -= 1
            text = f"{float(v):.{digits}g}"
        out.append(text)
    return out
