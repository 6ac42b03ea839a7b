"""Labels written as a DICOM SEG, checked with an independent reader (highdicom) as well as our own: each frame on
the right source image, in that image's rows and columns, with the source's patient, study and frame of reference.
Labels written as an RT structure set, checked against the source images' own headers and matplotlib's point test
as well as our reader; RT structure sets and SEG files read onto an image's grid."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coral_core.dicomlabels import save_dicom_seg, save_rt_structure_set
from coral_core.plotting import LABEL_COLOURS
from coral_core.errors import UserError
from coral_core.volume import Volume, load_frames, load_labels_like, load_volume, read_class_names, save_like
from helpers import oblique_affine, write_dicom_series, write_enhanced_dicom, write_nifti_ijk, write_rt_structure_set

hd = pytest.importorskip("highdicom")

SERIES = "1.2.826.0.1.3680043.2.1125.1.12345"  # write_dicom_series's; file n holds SOP instance SERIES.(n + 1)
NAMES = ["background", "RV", "myocardium", "LV"]


def _labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.integers(1, 4, shape) * (rng.random(shape) > 0.6)).astype(np.uint8)
    labels[3] = 0  # a slice with nothing on it: no frame
    labels[4][labels[4] == 2] = 0  # a slice without segment 2
    return labels


def test_a_series_labels_written_as_a_dicom_seg_lie_on_its_images(tmp_path):
    """Every (segment, slice) that holds voxels is one frame on the slice's source image; an independent reader gets
    each source image's labels back, our reader the whole volume and the class names."""
    volume = np.random.default_rng(1).integers(0, 900, (6, 10, 12)).astype(np.int16)
    extra = {"0010|0010": "Doe^Jane", "0010|0020": "P-007", "0020|0052": "1.2.826.0.1.3680043.2.1125.1.77"}
    image = load_volume(write_dicom_series(tmp_path / "ct", volume, spacing_zyx=(3.0, 0.7, 0.9), extra=extra))
    labels = _labels(image.shape)
    out = save_dicom_seg(tmp_path / "pred.dcm", labels, image, NAMES)

    seg = hd.seg.segread(out)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == NAMES[1:]
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"AUTOMATIC"}
    assert (str(seg.PatientName), seg.PatientID, seg.FrameOfReferenceUID) == ("Doe^Jane", "P-007", extra["0020|0052"])
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.1.1" and seg.SeriesInstanceUID != SERIES
    held = sum(int((labels[k] == n).any()) for n in (1, 2, 3) for k in range(6))
    assert int(seg.NumberOfFrames) == held == 14  # 6 slices x 3 segments, less slice 3's three and slice 4's segment 2
    sources = [f"{SERIES}.{k + 1}" for k in range(6)]
    assert sorted(uid for _, _, uid in seg.get_source_image_uids()) == sorted(sources)
    by_source = seg.get_pixels_by_source_instance(sources, combine_segments=True)
    np.testing.assert_array_equal(by_source, labels)

    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)
    assert read_class_names(out) == NAMES


@pytest.mark.parametrize("sequence, field, value", [
    ("PlaneOrientationSequence", "ImageOrientationPatient", "1\\0\\0"),  # three numbers of six
    ("PlanePositionSequence", "ImagePositionPatient", "0\\0"),
    ("PixelMeasuresSequence", "PixelSpacing", "0.8"),
])
def test_a_seg_frame_of_too_few_numbers_is_one_sentence(tmp_path, sequence, field, value):
    """A SEG whose frame gives its plane in too few numbers (a damaged or careless writer's; found by
    benchmarks/fuzz_readers.py, which also put a letter in a position) is refused in one sentence, not a NumPy error."""
    image = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12), np.int16)))
    out = save_dicom_seg(tmp_path / "pred.dcm", _labels(image.shape), image, NAMES)
    ds = pydicom.dcmread(out)
    groups = ds.PerFrameFunctionalGroupsSequence[0]
    item = (groups if sequence in groups else ds.SharedFunctionalGroupsSequence[0])[sequence][0]
    setattr(item, field, value)
    ds.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(UserError, match=r"damaged.dcm: DICOM SEG is not readable \(\d numbers expected, \d given\); "
                                        r"re-export it"):
        load_labels_like(tmp_path / "damaged.dcm", image)


def test_segments_carry_the_colours_napari_shows_them_in(tmp_path):
    """Each segment's recommended display colour is its napari (and figures') colour in DICOM's scaled CIE L*a*b*,
    as scikit-image converts sRGB (D65), to within rounding."""
    skimage_color = pytest.importorskip("skimage.color")
    from coral_core.dicomlabels import dicom_lab

    image = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12))))
    seg = hd.seg.segread(save_dicom_seg(tmp_path / "pred.dcm", _labels(image.shape), image, NAMES))
    assert [list(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence] == [dicom_lab(c) for c in
                                                                                     LABEL_COLOURS[1:4]]
    for colour in [*LABEL_COLOURS[1:], "#ffffff", "#000000"]:
        rgb = np.array([[[int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]]])
        lightness, a, b = skimage_color.rgb2lab(rgb)[0, 0]
        reference = [lightness * 65535 / 100, (a + 128) * 65535 / 255, (b + 128) * 65535 / 255]
        np.testing.assert_allclose(dicom_lab(colour), reference, atol=2, err_msg=colour)


def test_segments_named_after_an_anatomical_structure_or_tissue_carry_its_dicom_codes(tmp_path):
    """A segment named as DICOM's segmentation property types name an anatomical structure (CID 7151) or a tissue
    (CID 7166), whatever the case, spaces, hyphens or underscores, is coded as that structure (SNOMED CT) in that
    category, as highdicom reads it; any other name (an abbreviation such as RV) keeps the generic Tissue."""
    image = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12))))
    names = ["background", "Liver", "left_ventricle", "Spinal cord", "adipose tissue", "RV", "blob"]
    labels = np.zeros(image.shape, np.uint8)
    for n in range(1, 7):
        labels[n - 1, n, n] = n
    seg = hd.seg.segread(save_dicom_seg(tmp_path / "coded.dcm", labels, image, names))
    coded = [(d.segmented_property_category.value, d.segmented_property_category.scheme_designator,
              d.segmented_property_type.value, d.segmented_property_type.meaning)
             for d in (seg.get_segment_description(n) for n in range(1, 7))]
    anatomy, tissue = "91723000", "85756007"
    assert coded == [(anatomy, "SCT", "10200004", "Liver"), (anatomy, "SCT", "87878005", "Left ventricle"),
                     (anatomy, "SCT", "2748008", "Spinal cord"), (tissue, "SCT", "55603005", "Fat"),
                     (tissue, "SCT", tissue, "Tissue"), (tissue, "SCT", tissue, "Tissue")]
    assert [seg.get_segment_description(n).segment_label for n in range(1, 7)] == names[1:]  # the names as given
    assert read_class_names(tmp_path / "coded.dcm") == names


def _held_other_ways(image, labels) -> dict:
    """{how: (the affine of ``image`` held that way, ``labels`` held that way)}: i and k reversed, i and j exchanged."""
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = image.shape[2] - 1, image.shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    return {"flipped": (image.affine @ flip, labels[::-1, :, ::-1]),
            "transposed": (image.affine @ swap, labels.transpose(0, 2, 1))}


def test_labels_of_an_image_held_flipped_or_transposed_go_to_the_right_pixels(tmp_path):
    """The frames follow the source images' stored rows and columns, whatever axes the image was held in."""
    image = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12)), spacing_zyx=(3.0, 0.7, 0.9)))
    labels = _labels(image.shape, seed=2)
    held = _held_other_ways(image, labels)
    sources = [f"{SERIES}.{k + 1}" for k in range(6)]
    for name, (affine, array) in held.items():
        like = Volume(np.ascontiguousarray(array), affine, image.path)
        out = save_dicom_seg(tmp_path / f"{name}.dcm", array, like, NAMES)
        by_source = hd.seg.segread(out).get_pixels_by_source_instance(sources, combine_segments=True)
        np.testing.assert_array_equal(by_source, labels, err_msg=name)
        np.testing.assert_array_equal(load_labels_like(out, like).array, array, err_msg=name)
        np.testing.assert_array_equal(load_labels_like(out, image).array, labels, err_msg=name)


def test_labels_of_a_multiframe_image_refer_to_its_frames(tmp_path):
    """A multi-frame (enhanced) source: each SEG frame names the source frame it lies on, stored in any order."""
    affine = oblique_affine((0.8, 0.9, 4.0))
    order = [3, 0, 4, 1, 5, 2]
    path = write_enhanced_dicom(tmp_path / "mr.dcm", np.zeros((6, 10, 12), np.int16), affine, frame_order=order)
    image = load_volume(path)
    labels = _labels(image.shape, seed=3)
    out = save_dicom_seg(tmp_path / "seg.dcm", labels, image, NAMES[:2], algorithm="MANUAL")
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["RV", "class 2", "class 3"]  # unnamed labels
    assert "SegmentAlgorithmName" not in seg.SegmentSequence[0]  # drawn by hand: no algorithm
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    by_frame = seg.get_pixels_by_source_frame(uid, source_frame_numbers=[order.index(k) + 1 for k in range(6)],
                                              combine_segments=True)
    np.testing.assert_array_equal(by_frame, labels)
    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)


def test_nothing_labelled_is_one_empty_frame_and_a_series_is_picked_by_uid(tmp_path):
    """Empty labels still make a valid SEG (one empty frame); a folder of two series: the one named, else refused."""
    folder = write_dicom_series(tmp_path / "study", np.zeros((4, 8, 8)))
    write_dicom_series(folder, np.zeros((5, 8, 8)), spacing_zyx=(2.0, 0.8, 0.8), series_uid="1.2.826.0.1.3680043.9.2",
                       prefix="mr")
    like = Volume(np.zeros((4, 8, 8)), load_volume(write_dicom_series(tmp_path / "one", np.zeros((4, 8, 8)))).affine,
                  folder)
    out = save_dicom_seg(tmp_path / "empty.dcm", np.zeros((4, 8, 8), np.uint8), like, NAMES, series_uid=SERIES)
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == 1 and not seg.pixel_array.any()
    assert {uid for _, _, uid in seg.get_source_image_uids()} == {f"{SERIES}.{k + 1}" for k in range(4)}
    assert not load_labels_like(out, like).array.any()
    with pytest.raises(UserError, match=r"study holds 2 DICOM series to refer the labels to; give the folder of one"):
        save_dicom_seg(tmp_path / "two.dcm", np.zeros((4, 8, 8), np.uint8), like, NAMES)


def test_what_cannot_be_written_as_a_dicom_seg_is_one_sentence_and_no_file(tmp_path):
    """An image not read from DICOM, labels of another count of frames than the source images (a cine's, or a
    volume's), or labels on another grid than theirs: one sentence each, and nothing written."""
    write_nifti_ijk(tmp_path / "img.nii.gz", np.zeros((8, 8, 4), np.float32), np.eye(4))
    nifti = load_volume(tmp_path / "img.nii.gz")
    cine = write_dicom_series(tmp_path / "cine", np.zeros((3, 4, 8, 8)))
    series = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((4, 8, 8))))
    shifted = Volume(series.array, series.affine.copy(), series.path)
    shifted.affine[0, 3] += 0.4  # half a voxel aside: not the source images' grid
    cases = [(nifti, np.zeros((4, 8, 8), np.uint8),
              "img.nii.gz is not a DICOM image series; end the output's name with .nii.gz, .mha or .nrrd"),
             (load_frames(cine)[0], np.zeros((2, 4, 8, 8), np.uint8),
              "these labels have 2 frames and the DICOM images in"),
             (Volume(np.zeros((4, 8, 8)), load_frames(cine)[0].affine, cine), np.zeros((4, 8, 8), np.uint8),
              "cine are a cine of 3 frames; give labels of each of its frames"),
             (series, np.zeros((2, 4, 8, 8), np.uint8), "ct are one volume; give labels of each of its frames"),
             (shifted, np.zeros((4, 8, 8), np.uint8), "lie on a grid other than the image's")]
    for like, labels, words in cases:
        with pytest.raises(UserError) as info:
            save_dicom_seg(tmp_path / "out.dcm", labels, like, NAMES)
        assert words in str(info.value) and "\n" not in str(info.value)
        assert not list(tmp_path.glob("*out.dcm*"))


# --------------------------------------------------------------------------- RT structure sets


def _box(i0, i1, j0, j1):
    """The outline of voxels i0..i1, j0..j1 (through the corners between voxels: every centre clearly in or out)."""
    return [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]


def _in_triangle(corners, i, j):
    """Whether (i, j) lies inside a triangle, by the signs of three cross products (the plain definition)."""
    (a, b), (c, d), (e, f) = corners
    signs = [(c - a) * (j - b) - (d - b) * (i - a), (e - c) * (j - d) - (f - d) * (i - c),
             (a - e) * (j - f) - (b - f) * (i - e)]
    return all(s > 0 for s in signs) or all(s < 0 for s in signs)


def test_an_rt_structure_sets_contours_are_filled_on_the_images_grid(tmp_path):
    """Closed contours become labels on the image's (oblique, anisotropic) grid: a voxel is inside when its centre is
    (a triangle checked against the plain definition), a contour inside another of the same ROI on one slice is a
    hole, the EXTERNAL body outline is filled first and the organs over it without a warning, the ROIs with contours
    are labels 1, 2, ... named by their names."""
    import warnings

    from coral_core.volume import is_dicom_labels, is_rt_structure_set

    shape = (5, 20, 24)
    image = Volume(np.zeros(shape), oblique_affine((0.8, 0.9, 4.0)), tmp_path / "img.nii.gz")
    triangle = [(2.3, 1.7), (15.2, 3.1), (6.4, 16.8)]
    rois = (("Heart", "ORGAN", [(1, _box(3, 10, 4, 12)), (1, _box(5, 7, 6, 9)), (3, triangle)]),
            ("Seeds", "MARKER", []),  # points' type, no contour: no label
            ("Body", "EXTERNAL", [(k, _box(0, 23, 0, 19)) for k in range(5)]),
            ("Spleen", "ORGAN", []))  # a region drawn nowhere: its label, on no voxel
    rs = write_rt_structure_set(tmp_path / "RS.dcm", image.affine, rois)
    expected = np.full(shape, 2, np.uint8)
    expected[1, 4:13, 3:11] = 1
    expected[1, 6:10, 5:8] = 2  # the hole: the body shows through
    for j in range(shape[1]):
        for i in range(shape[2]):
            if _in_triangle(triangle, i, j):
                expected[3, j, i] = 1
    assert 20 < np.count_nonzero(expected[3] == 1) < 120
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = load_labels_like(rs, image)
    np.testing.assert_array_equal(labels.array, expected)
    assert read_class_names(rs) == ["background", "Heart", "Body", "Spleen"]
    assert is_rt_structure_set(rs) and is_dicom_labels(rs) and not is_rt_structure_set(tmp_path)


def test_what_an_rt_structure_set_cannot_label_is_one_sentence(tmp_path):
    """Organs drawn over one another warn (the later ROI takes the voxels); contours between the image's slices, or
    a structure set without contours, are refused in one sentence."""
    from coral_core.errors import OffGridError

    image = Volume(np.zeros((4, 10, 10)), np.diag([1.0, 1.0, 3.0, 1.0]), tmp_path / "img.nii.gz")
    rs = write_rt_structure_set(tmp_path / "over.dcm", image.affine,
                                (("LV", "ORGAN", [(2, _box(1, 5, 1, 5))]), ("RV", "ORGAN", [(2, _box(4, 8, 4, 8))])))
    with pytest.warns(UserWarning, match=r"over.dcm: 4 voxels lie inside the contours of more than one ROI; each takes "
                                         r"the later ROI's label"):
        labels = load_labels_like(rs, image).array
    assert labels[2, 4, 4] == 2 and labels[2, 1, 1] == 1 and labels[2, 8, 8] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet: the same labels, no warning
        np.testing.assert_array_equal(load_labels_like(rs, image, quiet=True).array, labels)
    between = write_rt_structure_set(tmp_path / "between.dcm", image.affine,
                                     (("LV", "ORGAN", [(1.5, _box(1, 5, 1, 5))]),))
    with pytest.raises(OffGridError,
                       match=r"between.dcm: contours of ROI 'LV' do not lie in the slices of .*img.nii.gz"):
        load_labels_like(between, image)
    with pytest.raises(UserError, match=r"bare.dcm: DICOM RT structure set holds no closed contours, so it labels "
                                        r"nothing; give one that outlines the structures"):
        load_labels_like(write_rt_structure_set(tmp_path / "bare.dcm"), image)


# a multi-frame image of any orientation (oblique, mirrored) and size, and random labels of it
_ORIENTED = dict(shape=st.tuples(st.integers(2, 5), st.integers(3, 9), st.integers(3, 9)),
                 spacing=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0), st.floats(1.0, 8.0)),
                 origin=st.tuples(*[st.floats(-200, 200) for _ in range(3)]), seed=st.integers(0, 2**16))


def _oriented_image(tmp_path, shape, spacing, origin, seed) -> tuple:
    """(its file, the image read, random labels 0-3 of it) for one draw of ``_ORIENTED``."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # orthogonal: oblique, and mirrored when its determinant is -1
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation * np.array(spacing), origin
    path = write_enhanced_dicom(tmp_path / f"mr{seed}.dcm", np.zeros(shape, np.int16), affine)
    image = load_volume(path)
    return path, image, (rng.integers(1, 4, image.shape) * (rng.random(image.shape) > 0.5)).astype(np.uint8)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_ORIENTED)
def test_a_seg_lies_where_its_labels_do_in_any_orientation(tmp_path, shape, spacing, origin, seed):
    """Labels of a multi-frame image of any orientation (oblique, mirrored) written as a SEG: our reader gets them
    back, and highdicom's own volume of the SEG holds each label at the same place in the patient (every voxel mapped
    through both geometries)."""
    path, image, labels = _oriented_image(tmp_path, shape, spacing, origin, seed)
    labels[0, 0, 0] = 1
    out = save_dicom_seg(tmp_path / f"seg{seed}.dcm", labels, image, NAMES)
    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)

    volume = hd.seg.segread(out).get_volume(combine_segments=True)  # (slice, row, column) -> LPS, highdicom's
    k, j, i = np.indices(labels.shape).reshape(3, -1)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine @ np.stack([i, j, k, np.ones_like(i)])
    where = np.round(np.linalg.inv(volume.affine) @ lps).astype(int)[:3]
    inside = ((where >= 0) & (where < np.array(volume.array.shape)[:, None])).all(0)
    assert not labels.ravel()[~inside].any()  # highdicom's volume spans the labelled slices
    np.testing.assert_array_equal(volume.array[tuple(where[:, inside])], labels.ravel()[inside])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(corners=st.integers(3, 40), seed=st.integers(0, 2**16))
def test_contours_are_filled_as_matplotlib_tests_points(corners, seed):
    """The row-by-row even-odd fill of a contour (non-convex, self-crossing, partly outside the slice) holds the voxel
    centres matplotlib's point-in-polygon test finds inside, wherever a centre is not on an edge."""
    from matplotlib.path import Path as Polygon

    from coral_core.dicomlabels import _polygon_centres

    rng = np.random.default_rng(seed)
    points = rng.uniform(-4, 24, (corners, 2))  # i, j on a slice of 16 rows and 20 columns
    filled = np.zeros((16, 20), bool)
    drawn = _polygon_centres(points, 16, 20)
    if drawn is not None:
        filled[drawn[0]] = drawn[1]
    j, i = np.mgrid[0:16, 0:20]
    centres = np.c_[i.ravel(), j.ravel()].astype(float)
    expected = Polygon(points).contains_points(centres).reshape(16, 20)
    start, end = points, np.roll(points, -1, axis=0)  # centres within 1e-6 of an edge: either answer is right
    t = np.clip(((centres[:, None] - start) * (end - start)).sum(-1) / ((end - start) ** 2).sum(-1), 0, 1)
    near = (np.linalg.norm(centres[:, None] - (start + t[..., None] * (end - start)), axis=-1) < 1e-6).any(1)
    np.testing.assert_array_equal(filled.ravel()[~near], expected.ravel()[~near])


def _source_headers(paths):
    """SOP instance UID -> (position, row and column directions, spacing between rows and columns) of each image of
    DICOM files, from their own headers (per frame for a multi-frame file: the key is (uid, frame number))."""
    planes = {}
    for path in paths:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" not in ds:
            o = np.array(ds.ImageOrientationPatient, float)
            planes[str(ds.SOPInstanceUID)] = (np.array(ds.ImagePositionPatient, float), o[:3], o[3:],
                                              np.array(ds.PixelSpacing, float))
            continue
        shared = ds.SharedFunctionalGroupsSequence[0]
        for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, 1):
            def value(group, name):
                return np.array((frame.get(group) or shared.get(group))[0].get(name), float)
            o = value("PlaneOrientationSequence", "ImageOrientationPatient")
            planes[(str(ds.SOPInstanceUID), number)] = (value("PlanePositionSequence", "ImagePositionPatient"), o[:3],
                                                        o[3:], value("PixelMeasuresSequence", "PixelSpacing"))
    return planes


def _outlined(rs_path, planes, rows, columns):
    """{(ROI number, source key): the (rows, columns) pixels of that source image whose centres lie inside an odd
    number of the ROI's contours on it}, by matplotlib's point test, in each source image's own rows and columns
    (from its header); every contour point checked to lie in its image's plane."""
    from matplotlib.path import Path as Polygon

    rs = pydicom.dcmread(str(rs_path))
    r, c = np.mgrid[0:rows, 0:columns]
    centres = np.c_[r.ravel(), c.ravel()].astype(float)
    filled = {}
    for roi in rs.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            (image,) = contour.ContourImageSequence
            key = str(image.ReferencedSOPInstanceUID)
            key = (key, int(image.ReferencedFrameNumber)) if "ReferencedFrameNumber" in image else key
            position, along_row, along_column, (row_mm, column_mm) = planes[key]
            points = np.array(contour.ContourData, float).reshape(-1, 3) - position
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert int(contour.NumberOfContourPoints) == len(points) >= 4
            assert np.abs(points @ np.cross(along_row, along_column)).max() < 1e-4  # in the image's plane
            on_image = np.c_[points @ along_column / row_mm, points @ along_row / column_mm]  # (row, column)
            inside = Polygon(on_image).contains_points(centres).reshape(rows, columns)
            mask = filled.setdefault((int(roi.ReferencedROINumber), key), np.zeros((rows, columns), bool))
            mask ^= inside
    return filled


def test_a_series_labels_written_as_an_rt_structure_set_outline_them_on_its_images(tmp_path):
    """Each label's pieces on each source image are closed contours referring to it, in its plane, that hold exactly
    the labelled pixel centres (holes as contours inside; checked with matplotlib in the image's own rows and columns
    from its header); an empty class is an ROI without contours that keeps the others' numbers; our reader gets the
    labels and names back; the patient, study and frame of reference are the source's."""
    volume = np.zeros((6, 16, 18), np.int16)
    extra = {"0010|0010": "Doe^Jane", "0010|0020": "P-007", "0020|0052": "1.2.826.0.1.3680043.2.1125.1.77"}
    folder = write_dicom_series(tmp_path / "ct", volume, spacing_zyx=(3.0, 0.7, 0.9), extra=extra)
    image = load_volume(folder)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 2:12, 3:15] = 3  # a ring around a hole, and two pieces on slice 2
    labels[:, 5:8, 6:10] = 0
    labels[1, 6, 7] = 3  # an island in the hole
    labels[2, 13:15, 1:4] = 3
    labels[2:5, 9:11, 4:6] = 1
    labels[4, 0, 0] = 1  # one pixel in the corner
    labels[5] = 0  # nothing on the last slice
    out = save_rt_structure_set(tmp_path / "RS.dcm", labels, image, ["background", "RV", "myocardium", "LV"])

    rs = pydicom.dcmread(out)
    assert rs.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rs.Modality == "RTSTRUCT"
    assert (str(rs.PatientName), rs.PatientID) == ("Doe^Jane", "P-007")
    assert rs.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.1.1" and rs.SeriesInstanceUID != SERIES
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == extra["0020|0052"]
    assert "FrameOfReferenceUID" not in rs  # an image's attribute, not in a structure set's modules
    required = {  # the type 1 and 2 attributes of the RT Structure Set IOD's modules (PS3.3 A.19)
        "patient": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex"],
        "general study": ["StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                          "AccessionNumber"],
        "RT series": ["Modality", "SeriesInstanceUID", "SeriesNumber", "OperatorsName"],
        "general equipment": ["Manufacturer"],
        "structure set": ["StructureSetLabel", "StructureSetDate", "StructureSetTime", "StructureSetROISequence"],
        "ROI contour": ["ROIContourSequence"], "RT ROI observations": ["RTROIObservationsSequence"],
        "SOP common": ["SOPClassUID", "SOPInstanceUID"]}
    assert not {m: [a for a in names if a not in rs] for m, names in required.items() if any(a not in rs for a in names)}
    for roi in rs.StructureSetROISequence:
        assert all(a in roi for a in ("ROINumber", "ReferencedFrameOfReferenceUID", "ROIName", "ROIGenerationAlgorithm"))
    for observation in rs.RTROIObservationsSequence:
        assert all(a in observation for a in ("ObservationNumber", "ReferencedROINumber", "RTROIInterpretedType",
                                              "ROIInterpreter"))
    assert [int(o.ReferencedROINumber) for o in rs.RTROIObservationsSequence] == [1, 2, 3]
    assert [int(c.ReferencedROINumber) for c in rs.ROIContourSequence] == [1, 2, 3]
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["RV", "myocardium", "LV"]
    assert [int(r.ROINumber) for r in rs.StructureSetROISequence] == [1, 2, 3]
    assert {r.ROIGenerationAlgorithm for r in rs.StructureSetROISequence} == {"AUTOMATIC"}
    assert {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence} == {extra["0020|0052"]}
    assert [list(map(int, r.ROIDisplayColor)) for r in rs.ROIContourSequence] == [
        [int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in LABEL_COLOURS[1:4]]
    assert "ContourSequence" not in rs.ROIContourSequence[1]  # myocardium: on no voxel
    (reference,) = rs.ReferencedFrameOfReferenceSequence
    series = reference.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == SERIES
    sources = [f"{SERIES}.{k + 1}" for k in range(6)]
    assert sorted(i.ReferencedSOPInstanceUID for i in series.ContourImageSequence) == sorted(sources)
    # LV, slice by slice: the ring's two outlines, + the island, + the piece and RV's hole, + RV's hole (twice)
    assert len(rs.ROIContourSequence[2].ContourSequence) == 2 + 3 + 4 + 3 + 3

    filled = _outlined(out, _source_headers(sorted(folder.iterdir())), 16, 18)
    for n in (1, 2, 3):
        for k, uid in enumerate(sources):
            np.testing.assert_array_equal(filled.get((n, uid), np.zeros((16, 18), bool)), labels[k] == n,
                                          err_msg=f"label {n}, slice {k}")
    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)
    assert read_class_names(out) == ["background", "RV", "myocardium", "LV"]


def test_rt_rois_are_typed_by_their_names_and_a_body_outline_comes_back_under_the_organs(tmp_path):
    """Written ROIs take the interpreted type their names give (the body outline EXTERNAL, target volumes GTV, CTV or
    PTV, the rest ORGAN); the body label, which surrounds the organs in a label map, is outlined with them as holes
    and, read back (EXTERNAL filled first), gives the same labels."""
    folder = write_dicom_series(tmp_path / "ct", np.zeros((3, 16, 16), np.int16), spacing_zyx=(3.0, 0.7, 0.9))
    image = load_volume(folder)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 1:15, 1:15] = 3  # the body
    labels[1, 4:8, 4:8] = 1  # the heart inside it
    labels[1, 9:12, 9:12] = 2  # a target inside it
    labels[2, 3:6, 8:12] = 4
    labels[0, 5:9, 5:9] = 5
    names = ["background", "Heart", "PTV_60", "BODY", "GTVp", "ctv"]
    out = save_rt_structure_set(tmp_path / "RS.dcm", labels, image, names)
    rs = pydicom.dcmread(out)
    assert [o.RTROIInterpretedType for o in rs.RTROIObservationsSequence] == ["ORGAN", "PTV", "EXTERNAL", "GTV", "CTV"]
    # an ROI named as DICOM names an anatomical structure carries its SNOMED CT code; the others none
    codes = [[(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in o.get("RTROIIdentificationCodeSequence", [])]
             for o in rs.RTROIObservationsSequence]
    assert codes == [[("80891009", "SCT", "Heart")], [], [], [], []]
    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)


def test_an_rt_structure_set_of_an_image_held_flipped_or_transposed_outlines_the_right_pixels(tmp_path):
    """The contours follow the source images' stored rows and columns, whatever axes the image was held in; drawn by
    hand: MANUAL."""
    folder = write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12)), spacing_zyx=(3.0, 0.7, 0.9))
    image = load_volume(folder)
    labels = _labels(image.shape, seed=2)
    held = _held_other_ways(image, labels)
    planes = _source_headers(sorted(folder.iterdir()))
    for name, (affine, array) in held.items():
        like = Volume(np.ascontiguousarray(array), affine, image.path)
        out = save_rt_structure_set(tmp_path / f"{name}.dcm", array, like, NAMES, algorithm="MANUAL")
        filled = _outlined(out, planes, 10, 12)
        for k in range(6):
            for n in (1, 2, 3):
                np.testing.assert_array_equal(filled.get((n, f"{SERIES}.{k + 1}"), np.zeros((10, 12), bool)),
                                              labels[k] == n, err_msg=f"{name}: label {n}, slice {k}")
        np.testing.assert_array_equal(load_labels_like(out, like).array, array, err_msg=name)
        np.testing.assert_array_equal(load_labels_like(out, image).array, labels, err_msg=name)
        assert {r.ROIGenerationAlgorithm for r in pydicom.dcmread(out).StructureSetROISequence} == {"MANUAL"}


def test_what_cannot_be_written_as_an_rt_structure_set_is_one_sentence_and_no_file(tmp_path):
    image = Volume(np.zeros((4, 8, 8)), np.eye(4), tmp_path / "img.nii.gz")
    with pytest.raises(UserError, match=r"rs.dcm: a DICOM RT structure set refers to the DICOM images it labels, but "
                                        r".*img.nii.gz is not a DICOM image series; end the output's name with .nii.gz"):
        save_rt_structure_set(tmp_path / "rs.dcm", np.zeros((4, 8, 8), np.uint8), image, NAMES)
    series = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((4, 8, 8))))
    with pytest.raises(UserError, match=r"rs.dcm: labels hold negative values, which no DICOM RT structure set can "
                                        r"hold; clear them first"):
        save_rt_structure_set(tmp_path / "rs.dcm", np.full((4, 8, 8), -1, np.int16), series, NAMES)
    assert not list(tmp_path.glob("*.dcm"))


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**_ORIENTED)
def test_an_rt_structure_set_outlines_its_labels_in_any_orientation(tmp_path, shape, spacing, origin, seed):
    """Random labels (many pieces, holes, pixels touching at corners) of a multi-frame image of any orientation
    written as an RT structure set: every source frame's contours hold exactly its labelled pixel centres
    (matplotlib, in the frame's own rows and columns from its header), and our reader gets the labels back."""
    path, image, labels = _oriented_image(tmp_path, shape, spacing, origin, seed)
    out = save_rt_structure_set(tmp_path / f"rs{seed}.dcm", labels, image, NAMES)
    np.testing.assert_array_equal(load_labels_like(out, image).array, labels)

    rows, columns = shape[1:]  # the stored frames' (write_enhanced_dicom's (z, y, x))
    filled = _outlined(out, _source_headers([path]), rows, columns)
    k, j, i = np.indices(labels.shape).reshape(3, -1)  # every voxel of the image as read, in LPS mm
    lps = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    outlined, found = np.zeros(labels.size, np.uint8), np.zeros(labels.size, bool)
    for key, (position, along_row, along_column, (row_mm, column_mm)) in _source_headers([path]).items():
        offset = lps - position
        # the voxels in this frame's plane (the frames' positions in the header and the grid read from it differ by
        # micrometres)
        on = np.abs(offset @ np.cross(along_row, along_column)) < 0.25 * spacing[2]
        r = np.round(offset[on] @ along_column / row_mm).astype(int)
        c = np.round(offset[on] @ along_row / column_mm).astype(int)
        value = np.zeros((rows, columns), np.uint8)
        for n in (1, 2, 3):
            mask = filled.get((n, key), np.zeros((rows, columns), bool))
            assert not (value[mask]).any()  # one label's contours per pixel
            value[mask] = n
        outlined[on], found[on] = value[r, c], True
    assert found.all()
    np.testing.assert_array_equal(outlined, labels.ravel())


def test_structures_are_picked_by_name_from_any_labels_that_name_them(tmp_path):
    """Picked structures are labels 1, 2, ... in the order asked, whatever their numbers in the file: ROIs of an RT
    structure set filled alone (a PTV drawn over the heart takes nothing from it when only the heart is asked for),
    segments of a SEG, classes of a label file that names them; names matched without regard to case; a name the
    file lacks, or a file that names nothing, is one sentence."""
    import warnings

    from coral_core.volume import pick_classes

    image = Volume(np.zeros((4, 12, 12)), np.diag([1.0, 1.0, 3.0, 1.0]), tmp_path / "img.nii.gz")
    rs = write_rt_structure_set(tmp_path / "rs.dcm", image.affine, (
        ("Heart", "ORGAN", [(1, _box(2, 7, 2, 7))]), ("PTV", "PTV", [(1, _box(5, 10, 5, 10))]),
        ("BODY", "EXTERNAL", [(k, _box(0, 11, 0, 11)) for k in range(4)])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the PTV is not filled, so nothing overlaps
        heart = load_labels_like(rs, image, ["heart"]).array
    assert np.count_nonzero(heart) == 36 and heart[1, 2:8, 2:8].all()
    with pytest.warns(UserWarning, match="more than one ROI"):
        both = load_labels_like(rs, image, ["PTV", "Heart"]).array  # the heart, second, drawn over the PTV
    assert both[1, 6, 6] == 2 and both[1, 9, 9] == 1 and both[1, 2, 2] == 2
    with pytest.raises(UserError, match=r"rs.dcm: holds no structure named 'Lung_L'; it holds Heart, PTV, BODY \(names "
                                        r"are matched without regard to case\)"):
        load_labels_like(rs, image, ["Heart", "Lung_L"])
    # a structure named differently from file to file: the first of its names the file holds
    np.testing.assert_array_equal(load_labels_like(rs, image, ["Cor|heart"]).array, heart)
    with pytest.raises(UserError, match=r"rs.dcm: holds no structure named 'Lung_L' or 'LungL'; it holds"):
        load_labels_like(rs, image, ["Heart", "Lung_L|LungL"])
    with pytest.raises(UserError, match=r"rs.dcm: 'Heart' and 'Cor\|HEART' both name its structure 'Heart'; give each "
                                        r"structure once"):
        load_labels_like(rs, image, ["Heart", "Cor|HEART"])

    series = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12))))
    labels = _labels(series.shape)
    seg = save_dicom_seg(tmp_path / "seg.dcm", labels, series, NAMES)
    picked = load_labels_like(seg, series, ["lv", "RV"]).array
    np.testing.assert_array_equal(picked, np.select([labels == 3, labels == 1], [1, 2], 0))
    nifti = save_like(tmp_path / "lab.nii.gz", labels, series, NAMES)
    np.testing.assert_array_equal(load_labels_like(nifti, series, ["LV", "RV"]).array, picked)
    plain = save_like(tmp_path / "plain.nii.gz", labels, series)
    with pytest.raises(UserError, match=r"plain.nii.gz: names none of its classes, so structures cannot be picked from "
                                        r"it by name; give its label values with --label-values instead"):
        pick_classes(labels, plain, ["LV"])


def test_names_in_any_script_survive_in_seg_and_rt_structure_set_files(tmp_path):
    """A patient's name in another script (the source in UTF-8) and class names beyond ASCII are written as UTF-8
    (ISO_IR 192) and read back as they were (they were written as question marks); a plain ASCII source with ASCII
    names declares no character set."""
    folder = write_dicom_series(tmp_path / "ct", np.zeros((3, 8, 8)))
    plain = load_volume(folder)
    assert "SpecificCharacterSet" not in pydicom.dcmread(save_dicom_seg(tmp_path / "plain.dcm", np.ones(plain.shape,
                                                                         np.uint8), plain, NAMES))
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 192", "山田^太郎"
        ds.save_as(f)
    image = load_volume(folder)
    labels = np.zeros(image.shape, np.uint8)
    labels[:, 2:5, 2:6], labels[:, 5:7, 1:3] = 1, 2
    names = ["background", "Herzmuskel (Myokard)", "血液"]
    for save in (save_dicom_seg, save_rt_structure_set):
        written = pydicom.dcmread(save(tmp_path / f"{save.__name__}.dcm", labels, image, names))
        assert written.SpecificCharacterSet == "ISO_IR 192" and str(written.PatientName) == "山田^太郎"
        assert read_class_names(tmp_path / f"{save.__name__}.dcm") == names
        np.testing.assert_array_equal(load_labels_like(tmp_path / f"{save.__name__}.dcm", image).array, labels)


def test_a_labelmap_seg_made_by_highdicom_is_read_onto_the_images_grid(tmp_path):
    """A LABELMAP SEG (DICOM's newer kind: each frame's pixels the numbers of their segments, as highdicom and other
    tools write many-class segmentations) is read as labels, its segments' names with them; it was refused as if
    damaged, its frames naming no segment."""
    from pydicom.sr.codedict import codes

    folder = write_dicom_series(tmp_path / "ct", np.zeros((6, 10, 12)), spacing_zyx=(3.0, 0.7, 0.9),
                                extra={"0020|0052": "1.2.826.0.1.3680043.2.1125.1.77"})
    sources = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
    labels = _labels((6, 10, 12), seed=5)  # slice 3 empty
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, name in enumerate(NAMES[1:], 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    seg.save_as(tmp_path / "labelmap.dcm")
    assert pydicom.dcmread(tmp_path / "labelmap.dcm").SegmentationType == "LABELMAP"
    image = load_volume(folder)
    np.testing.assert_array_equal(load_labels_like(tmp_path / "labelmap.dcm", image).array, labels)
    assert read_class_names(tmp_path / "labelmap.dcm") == NAMES
    picked = load_labels_like(tmp_path / "labelmap.dcm", image, ["LV"]).array
    np.testing.assert_array_equal(picked, (labels == 3).astype(np.uint8))


def test_closedplanar_xor_contours_are_filled_as_closed_planar_ones(tmp_path):
    """CLOSEDPLANAR_XOR (DICOM's explicit even-odd type) is read as the CLOSED_PLANAR contours are: the inner one a
    hole (it was left out, its ROI empty)."""
    image = Volume(np.zeros((3, 12, 12)), np.diag([1.0, 1.0, 3.0, 1.0]), tmp_path / "img.nii.gz")
    rs = write_rt_structure_set(tmp_path / "rs.dcm", image.affine,
                                (("Ring", "ORGAN", [(1, _box(1, 10, 1, 10)), (1, _box(4, 7, 4, 7))]),))
    ds = pydicom.dcmread(rs)
    for contour in ds.ROIContourSequence[0].ContourSequence:
        contour.ContourGeometricType = "CLOSEDPLANAR_XOR"
    ds.save_as(tmp_path / "xor.dcm")
    np.testing.assert_array_equal(load_labels_like(tmp_path / "xor.dcm", image).array, load_labels_like(rs, image).array)
    assert load_labels_like(rs, image).array[1, 2, 2] == 1 and load_labels_like(rs, image).array[1, 5, 5] == 0


# --------------------------------------------------------------------------- cine series


def _cine_labels(shape, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.integers(1, 4, shape) * (rng.random(shape) > 0.6)).astype(np.uint8)
    labels[1, 2] = 0  # a slice of a frame with nothing on it
    return labels


def test_a_cine_s_labels_lie_on_the_images_of_their_frames(tmp_path):
    """A cine's labels (t, z, y, x) as a DICOM SEG: each frame on the source image of its phase and slice (the images
    stored in a scrambled order), with its temporal position index; as an RT structure set, each contour on that
    image; both read back frame by frame, and on an image of one frame of the cine refused in one sentence."""
    from pydicom.sr.codedict import codes

    order = [int(n) for n in np.random.default_rng(5).permutation(12)]
    folder = write_dicom_series(tmp_path / "cine", np.zeros((3, 4, 8, 10)), spacing_zyx=(8.0, 0.8, 0.8),
                                file_order=order, extra={"0020|0052": "1.2.826.0.1.3680043.2.1125.1.77"})
    frame = load_frames(folder)[0]
    like = Volume(np.zeros((3, 4, 8, 10)), frame.affine, folder)
    labels = _cine_labels(like.shape)
    sources = {(t, k): f"{SERIES}.{order[t * 4 + k] + 1}" for t in range(3) for k in range(4)}  # file n: t-major

    out = save_dicom_seg(tmp_path / "seg.dcm", labels, frame, NAMES)  # a frame as the image: as coral segment gives it
    seg = hd.seg.segread(out)
    by_source = seg.get_pixels_by_source_instance(list(sources.values()), combine_segments=True)
    np.testing.assert_array_equal(by_source, labels.reshape(12, 8, 10))
    assert [d.DimensionDescriptionLabel for d in seg.DimensionIndexSequence][-1] == "TemporalPositionIndex"
    phase_of = {uid: t for (t, _), uid in sources.items()}
    for item in seg.PerFrameFunctionalGroupsSequence:
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert item.FrameContentSequence[0].TemporalPositionIndex == phase_of[uid] + 1
    np.testing.assert_array_equal(load_labels_like(out, like).array, labels)
    with pytest.raises(UserError, match=r"seg2.dcm: these labels are one volume and the DICOM images in .*cine are a "
                                        r"cine of 3 frames; give labels of each of its frames"):
        save_dicom_seg(tmp_path / "seg2.dcm", labels[0], frame, NAMES)

    rs = save_rt_structure_set(tmp_path / "RS.dcm", labels, like, NAMES)
    filled = _outlined(rs, _source_headers(sorted(folder.iterdir())), 8, 10)
    for (t, k), uid in sources.items():
        for n in (1, 2, 3):
            np.testing.assert_array_equal(filled.get((n, uid), np.zeros((8, 10), bool)), labels[t, k] == n,
                                          err_msg=f"label {n}, frame {t}, slice {k}")
    np.testing.assert_array_equal(load_labels_like(rs, like).array, labels)

    # a SEG made elsewhere (highdicom) on the images of frame 1 alone: read into frame 1 of the cine
    images = sorted((pydicom.dcmread(folder / f"slice{order[4 + k]:03d}.dcm") for k in range(4)),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="LV", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    other = hd.seg.Segmentation(
        source_images=images, pixel_array=(labels[1] == 3), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1")
    other.save_as(tmp_path / "frame1.dcm")
    expected = np.zeros_like(labels)
    expected[1] = labels[1] == 3
    np.testing.assert_array_equal(load_labels_like(tmp_path / "frame1.dcm", like).array, expected)
    from coral_core.errors import OffGridError

    elsewhere = Volume(like.array, like.affine, tmp_path / "cine.nii.gz")  # the grid, but not these DICOM images
    with pytest.raises(OffGridError, match=r"frame1.dcm: DICOM SEG frames name no image of the cine series .*cine.nii"
                                           r".gz \(each must name the image it was drawn on\), so their frames cannot"):
        load_labels_like(tmp_path / "frame1.dcm", elsewhere)


def test_labels_of_an_enhanced_cine_and_of_a_cine_stack_refer_to_their_frames(tmp_path):
    """An enhanced multi-frame cine (its frames stored in any order): each SEG frame names the source frame of its
    phase and slice. A cine stack exported one series per slice position: the SEG refers to every series, each
    frame to the image of its phase at its position; both read back frame by frame."""
    order = [int(n) for n in np.random.default_rng(6).permutation(12)]
    path = write_enhanced_dicom(tmp_path / "cine.dcm", np.zeros((3, 4, 8, 10), np.int16), oblique_affine((0.8, 0.9, 6.0)),
                                frame_order=order)
    like = Volume(np.zeros((3, 4, 8, 10)), load_frames(path)[0].affine, path)
    labels = _cine_labels(like.shape, seed=1)
    out = save_dicom_seg(tmp_path / "seg.dcm", labels, like, NAMES)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    by_frame = hd.seg.segread(out).get_pixels_by_source_frame(
        uid, source_frame_numbers=[order.index(t * 4 + k) + 1 for t in range(3) for k in range(4)], combine_segments=True)
    np.testing.assert_array_equal(by_frame, labels.reshape(12, 8, 10))
    np.testing.assert_array_equal(load_labels_like(out, like).array, labels)
    np.testing.assert_array_equal(load_labels_like(save_rt_structure_set(tmp_path / "RS.dcm", labels, like), like).array,
                                  labels)

    stack = tmp_path / "stack"
    for k in (2, 0, 3, 1):
        write_dicom_series(stack, np.zeros((3, 1, 8, 10)), spacing_zyx=(8.0, 0.8, 0.8), first_slice=k,
                           series_uid=f"1.2.3.{k}", prefix=f"s{k}_")
    like = Volume(np.zeros((3, 4, 8, 10)), load_frames(stack)[0].affine, stack)
    out = save_dicom_seg(tmp_path / "stack_seg.dcm", labels, like, NAMES)
    seg = hd.seg.segread(out)
    assert sorted(s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence) == [f"1.2.3.{k}" for k in range(4)]
    sources = [f"1.2.3.{k}.{t + 1}" for t in range(3) for k in range(4)]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(sources, combine_segments=True),
                                  labels.reshape(12, 8, 10))
    np.testing.assert_array_equal(load_labels_like(out, like).array, labels)
    rs = save_rt_structure_set(tmp_path / "stack_rs.dcm", labels, like, NAMES)
    np.testing.assert_array_equal(load_labels_like(rs, like).array, labels)
