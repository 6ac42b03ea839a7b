"""Volume loading and saving keep voxels, axis order and geometry; bad files give one sentence."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pydicom
import pytest

from coral_core.errors import UserError
from coral_core.volume import (
    dicom_cine_stack, dicom_series_title, dicom_slice_series, frame_count, load_dicom_series, load_frames, load_volume,
    intensity_bounds, normalise_intensity, normalise_intensity_tensor, read_class_names, save_like, save_volume,
)
from helpers import oblique_affine, write_dicom_series, write_nifti_ijk


def test_nifti_last_voxel_axis_becomes_axis_0_with_geometry(tmp_path):
    rng = np.random.default_rng(0)
    data_ijk = rng.normal(size=(20, 16, 7)).astype(np.float32)  # i, j, k: k is the slice axis
    affine = oblique_affine()
    vol = load_volume(write_nifti_ijk(tmp_path / "img.nii.gz", data_ijk, affine))
    assert vol.shape == (7, 16, 20)
    np.testing.assert_array_equal(vol.array[3], data_ijk[:, :, 3].T)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.spacing == pytest.approx((3.5, 0.9, 0.7), abs=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_segmentation_written_for_an_input_keeps_shape_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(1)
    affine = oblique_affine()
    src = load_volume(write_nifti_ijk(tmp_path / "in.nii.gz", rng.normal(size=(12, 10, 5)).astype(np.float32), affine))
    labels = rng.integers(0, 4, size=src.shape).astype(np.uint8)
    out = save_like(tmp_path / f"seg{suffix}", labels, src)
    back = load_volume(out)
    assert back.shape == src.shape
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert read_class_names(out) is None  # written without names: none read back
    names = ["background", "RV", "myocardium", "LV"]
    named = save_like(tmp_path / f"named{suffix}", labels, src, names)
    assert read_class_names(named) == names
    np.testing.assert_array_equal(load_volume(named).array, labels)  # the voxels and geometry as without
    np.testing.assert_allclose(load_volume(named).affine, affine, atol=1e-4)


def test_class_names_of_other_programs_files_are_none(tmp_path):
    """A comment extension that is not ours, a damaged file, a folder: no names, and no error (the readers
    report damage)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"acquired on scanner 2"))
    nib.save(img, str(tmp_path / "other.nii.gz"))
    (tmp_path / "damaged.nrrd").write_text("NRRD0004\nnot a header")
    save_volume(tmp_path / "one.mha", np.zeros((2, 4, 4), np.uint8), np.eye(4), ["background"])  # too few to name
    for path in ("other.nii.gz", "damaged.nrrd", "one.mha", ".", "missing.nii.gz"):
        assert read_class_names(tmp_path / path) is None, path
    series = save_volume(tmp_path / "cine.nii.gz", np.zeros((3, 2, 4, 4), np.uint8), np.eye(4), ["background", "LV"])
    assert read_class_names(series) == ["background", "LV"]


def test_dicom_series_folder_reads_with_slice_spacing(tmp_path):
    vol = (np.arange(5 * 6 * 8).reshape(5, 6, 8) % 300).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", vol, spacing_zyx=(4.0, 0.8, 0.8))
    loaded = load_volume(folder)
    assert loaded.shape == (5, 6, 8)
    np.testing.assert_array_equal(loaded.array, vol)
    assert loaded.spacing == pytest.approx((4.0, 0.8, 0.8), abs=1e-4)


def test_a_cine_dicom_series_reads_frame_by_frame(tmp_path, capfd):
    """A cine series holds several images at each slice position, one per cardiac phase: it is read as frames (in
    trigger-time order, each in slice order along the stack), as a 4-D file is, not as one stack of every image, and
    so is a folder of one series per slice position; a series with a different count of images at some positions is
    refused in one sentence; a plain series with a
    slice missing is read with a one-sentence warning, and ITK prints nothing."""
    cine = (np.arange(3 * 4 * 6 * 8).reshape(3, 4, 6, 8) % 500).astype(np.int16)  # 3 phases x 4 slices
    scrambled = list(np.random.default_rng(0).permutation(12))  # file names and instance numbers in no order
    folder = write_dicom_series(tmp_path / "cine", cine, spacing_zyx=(8.0, 0.8, 0.8), file_order=scrambled)
    assert frame_count(folder) == 3
    frames = load_frames(folder)
    assert len(frames) == 3
    for t, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.array, cine[t])
        assert frame.spacing == pytest.approx((8.0, 0.8, 0.8), abs=1e-4)
    one_file = folder / f"slice{scrambled[5]:03d}.dcm"  # the reader's way in: one slice file opens the series
    np.testing.assert_array_equal(np.stack([f.array for f in load_dicom_series(one_file)]), cine)
    with pytest.raises(UserError, match="is a 4-D series with 3 frames"):
        load_volume(folder)
    ragged = write_dicom_series(tmp_path / "ragged", cine, skip=((2, 1),))
    with pytest.raises(UserError, match=r"ragged: DICOM series holds 11 images at 4 slice positions, 2 to 3 at a "
                                        r"position, so its frames cannot be told apart; re-export it"):
        load_frames(ragged)
    # a cine stack exported one series per slice position (some scanners' short-axis cine): one 4-D series
    for k in (2, 0, 3, 1):
        write_dicom_series(tmp_path / "per_slice", cine[:, k:k + 1], spacing_zyx=(8.0, 0.8, 0.8), first_slice=k,
                           series_uid=f"1.2.3.{k}", prefix=f"s{k}_")
    assert frame_count(tmp_path / "per_slice") == 3
    np.testing.assert_array_equal(np.stack([f.array for f in load_frames(tmp_path / "per_slice")]), cine)
    stack_files = [tmp_path / "per_slice" / name for name in ("s2_001.dcm", "s0_000.dcm")]  # one file, or files of
    for given in (stack_files[:1], stack_files):  # two of its series: the whole stack, as the folder
        assert dicom_cine_stack(tmp_path / "per_slice", {dicom_slice_series(f) for f in given}) == [
            f"1.2.3.{k}" for k in range(4)]
        np.testing.assert_array_equal(np.stack([f.array for f in load_dicom_series(given)]), cine)
    write_dicom_series(tmp_path / "per_slice", cine[:, :1], first_slice=9, series_uid="1.2.3.9", prefix="lax",
                       extra={"0020|0037": "1\\0\\0\\0\\0\\1"})  # a series in another orientation: not one stack
    with pytest.raises(UserError, match="folder holds 5 DICOM series"):
        load_frames(tmp_path / "per_slice")
    assert dicom_cine_stack(tmp_path / "per_slice", {"1.2.3.2"}) is None  # no stack now: a file opens its series
    np.testing.assert_array_equal(np.stack([f.array for f in load_dicom_series(stack_files[0])]), cine[:, 2:3])
    assert frame_count(tmp_path / "per_slice") == 1
    gap = write_dicom_series(tmp_path / "gap", np.zeros((6, 6, 8)), skip=(2,))  # 5 of 6 slices 4 mm apart
    with pytest.warns(UserWarning, match=r"gap: DICOM slices slice001.dcm and slice003.dcm are 8.00 mm apart where "
                                         r"the others are 4.00 mm; a slice may be missing"):
        assert load_volume(gap).shape == (5, 6, 8)
    assert "WARNING" not in capfd.readouterr().err  # ITK's own, multi-line, is not shown


def test_an_enhanced_multiframe_dicom_cine_reads_phase_by_phase(tmp_path):
    """An enhanced (multi-frame) DICOM file of a cine holds every image of every phase as a frame, its position and
    phase in per-frame headers: it is read as its phases, each in slice order along the stack with the geometry of
    its headers (as ITK places a one-phase file), whatever order the frames are stored in; a plain enhanced volume
    stored from the last slice to the first reads in slice order; a ragged one is refused in one sentence."""
    import SimpleITK as sitk

    from coral_core.volume import _itk_arrays
    from helpers import write_enhanced_dicom

    cine = (np.arange(3 * 4 * 6 * 8).reshape(3, 4, 6, 8) % 500).astype(np.int16)  # 3 phases x 4 slices
    affine = oblique_affine(spacing_xyz=(0.8, 0.9, 8.0))
    slice_major = [t * 4 + k for k in reversed(range(4)) for t in range(3)]  # last slice first, its phases together
    path = write_enhanced_dicom(tmp_path / "IM0001", cine, affine, frame_order=slice_major)
    assert frame_count(path) == 3
    frames = load_frames(path)
    assert len(frames) == 3
    for t, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.array, cine[t])
        np.testing.assert_allclose(frame.affine, affine, atol=1e-3)
    with pytest.raises(UserError, match="IM0001: is a 4-D series with 3 frames"):
        load_volume(path)
    one_phase = write_enhanced_dicom(tmp_path / "one.dcm", cine[0], affine)  # ITK's reading of a plain one agrees
    np.testing.assert_allclose(_itk_arrays(sitk.ReadImage(str(one_phase)), one_phase)[1], affine, atol=1e-3)
    backwards = write_enhanced_dicom(tmp_path / "backwards.dcm", cine[0], affine, frame_order=[3, 2, 1, 0])
    assert frame_count(backwards) == 1
    np.testing.assert_array_equal(load_volume(backwards).array, cine[0])
    np.testing.assert_allclose(load_volume(backwards).affine, affine, atol=1e-3)
    ragged = write_enhanced_dicom(tmp_path / "ragged.dcm", cine, affine, drop=(5,))
    with pytest.raises(UserError, match=r"ragged.dcm: DICOM file holds 11 frames at 4 slice positions, 2 to 3 at a "
                                        r"position, so its phases cannot be told apart; re-export it"):
        load_frames(ragged)
    gap = write_enhanced_dicom(tmp_path / "gap.dcm", np.zeros((5, 6, 8)), affine, drop=(2,))
    with pytest.warns(UserWarning, match=r"gap.dcm: DICOM slices frame 2 and frame 3 are 16.00 mm apart where the "
                                         r"others are 8.00 mm; a slice may be missing"):
        assert load_volume(gap).shape == (4, 6, 8)


def test_dicom_objects_that_are_not_images_are_named(tmp_path, capfd):
    """A DICOM SEG file (a frame per segment at each slice it covers) or an RT structure set (contours, no voxels), as a
    file or as the only series of a folder, is named in one sentence saying how to use it as labels: a SEG was read
    as frames of a cine, and an RT structure set failed in ITK's words."""
    from helpers import write_dicom_seg, write_rt_structure_set

    labels = np.zeros((4, 8, 8), np.uint8)
    labels[1:3, 2:6, 2:6] = 1
    seg = write_dicom_seg(tmp_path / "seg.dcm", labels, np.diag([1.0, 1.0, 4.0, 1.0]), ["LV"])
    (tmp_path / "rt").mkdir()
    write_rt_structure_set(tmp_path / "rt" / "RS0001.dcm")
    with pytest.raises(UserError, match=r"seg.dcm: is a DICOM SEG segmentation, not an image; give it as the labels of "
                                        r"the image it was drawn on \(coral finetune IMAGE --labels SEG"):
        load_frames(seg)
    with pytest.raises(UserError, match=r"RS0001.dcm: is a DICOM RT structure set \(contours, not voxels\), not an "
                                        r"image; give it as the labels of the image it was drawn on \(coral finetune "
                                        r"IMAGE --labels RS.dcm"):
        load_volume(tmp_path / "rt" / "RS0001.dcm")
    with pytest.raises(UserError, match=r"rt holds a DICOM RT structure set \(contours, not voxels\), not an image"):
        load_volume(tmp_path / "rt")
    assert frame_count(tmp_path / "rt") == 1 and "WARNING" not in capfd.readouterr().err  # GDCM's "No Series" unshown


def test_a_dicom_seg_is_read_onto_its_images_grid(tmp_path):
    """A DICOM SEG file (a frame for each segment at each slice that holds it, bits packed across frames, or fractional)
    is read as a label map on the grid of the image it was drawn on, segment n as label n, its segments' labels as the
    class names; segments drawn over one another warn, the highest number taking the voxel; a SEG drawn on another
    grid is refused in one sentence."""
    from coral_core.volume import Volume, is_dicom_seg, load_labels_like
    from helpers import write_dicom_seg

    labels = np.zeros((5, 5, 7), np.uint8)  # 35 pixels a frame: frames share bytes once packed
    labels[1:4, 1:4, 2:6], labels[2, 2, 3], labels[3, 0, 0] = 1, 2, 3
    affine = oblique_affine(spacing_xyz=(0.8, 0.9, 4.0))
    image = Volume(np.zeros(labels.shape, np.float32), affine, tmp_path / "img.nii.gz")
    for fractional in (False, True):
        seg = write_dicom_seg(tmp_path / f"seg{int(fractional)}.dcm", labels, affine, ["LV", "RV", "myo"], fractional)
        assert is_dicom_seg(seg) and frame_count(seg) == 1
        np.testing.assert_array_equal(load_labels_like(seg, image).array, labels)
        assert read_class_names(seg) == ["background", "LV", "RV", "myo"]
    assert not is_dicom_seg(write_dicom_series(tmp_path / "ct", labels.astype(np.int16)) / "slice000.dcm")
    over = np.zeros((5, 7), bool)
    over[1, 2:4] = True  # segment 2 drawn over two of segment 1's voxels at slice 1
    seg = write_dicom_seg(tmp_path / "over.dcm", labels, affine, ["LV", "RV", "myo"], extra_masks=((2, 1, over),))
    with pytest.warns(UserWarning, match=r"over.dcm: 2 voxels of slice 1 belong to more than one segment; each takes "
                                         r"the highest segment number"):
        drawn = load_labels_like(seg, image).array
    assert (drawn[1][over] == 2).all() and (drawn == 1).sum() == (labels == 1).sum() - 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet: the same labels, no warning (the caller said so when it opened it)
        np.testing.assert_array_equal(load_labels_like(seg, image, quiet=True).array, drawn)
    moved = affine.copy()
    moved[:3, 3] += affine[:3, 0] * 0.5  # half a voxel along x: not this image's grid
    shifted = Volume(image.array, moved, image.path)
    with pytest.raises(UserError, match=r"seg0.dcm: DICOM SEG frames do not lie on the voxel grid of .*img.nii.gz "
                                        r"\(orientation, spacing or position differ\); give the segmentation drawn"):
        load_labels_like(tmp_path / "seg0.dcm", shifted)
    np.testing.assert_array_equal(load_labels_like(tmp_path / "ct", image).array, labels)  # anything else: as read


def test_dicom_headers_read_again_when_a_file_changes(tmp_path):
    """The headers a DICOM folder is ordered by are read once while its files stay the same (counting a cine's frames
    and then reading it, or a napari open, would read each several times), and again when a file is rewritten."""
    cine = (np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) % 50).astype(np.int16)
    folder = write_dicom_series(tmp_path / "s", cine)
    assert frame_count(folder) == 2
    write_dicom_series(folder, cine.reshape(6, 4, 4))  # the same file names, now a plain series of 6 slices
    assert frame_count(folder) == 1 and load_frames(folder)[0].shape == (6, 4, 4)


def test_itk_and_nifti_agree_on_world_geometry(tmp_path):
    affine = oblique_affine()
    src = load_volume(write_nifti_ijk(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.float32), affine))
    save_volume(tmp_path / "a.mha", src.array, src.affine)
    np.testing.assert_allclose(load_volume(tmp_path / "a.mha").affine, affine, atol=1e-4)


def test_2d_image_becomes_one_slice_and_4d_is_refused(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((9, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    assert load_volume(tmp_path / "flat.nii.gz").shape == (1, 8, 9)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3, 5), np.float32), np.eye(4)), str(tmp_path / "cine.nii.gz"))
    with pytest.raises(UserError, match="4-D series with 5 frames"):
        load_volume(tmp_path / "cine.nii.gz")


def test_every_frame_of_a_cine_file_reads_as_a_volume(tmp_path):
    from coral_core.volume import load_frames

    rng = np.random.default_rng(0)
    frames_zyx = [rng.random((3, 5, 4)).astype(np.float32) for _ in range(4)]
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    write_nifti_ijk(tmp_path / "cine.nii.gz", np.stack([f.transpose(2, 1, 0) for f in frames_zyx], -1), affine)
    frames = load_frames(tmp_path / "cine.nii.gz")
    assert len(frames) == 4
    for frame, truth in zip(frames, frames_zyx):
        np.testing.assert_array_equal(frame.array, truth)
        assert frame.spacing == (8.0, 1.5, 1.5) and frame.array.flags.c_contiguous
    write_nifti_ijk(tmp_path / "one.nii.gz", frames_zyx[0].transpose(2, 1, 0), affine)
    assert [f.shape for f in load_frames(tmp_path / "one.nii.gz")] == [(3, 5, 4)]
    # the header alone says whether a file is a series: NIfTI and ITK formats; anything else counts as one frame
    import SimpleITK as sitk

    from coral_core.volume import frame_count

    sitk.WriteImage(sitk.GetImageFromArray(np.stack(frames_zyx), isVector=False), str(tmp_path / "cine.mha"))
    assert [frame_count(tmp_path / n) for n in ("cine.nii.gz", "one.nii.gz", "cine.mha", "missing.nii.gz")] == [4, 1, 4, 1]
    from_mha = load_frames(tmp_path / "cine.mha")
    assert len(from_mha) == 4 and all(np.array_equal(f.array, t) for f, t in zip(from_mha, frames_zyx))


def test_unreadable_files_give_one_sentence(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_volume(tmp_path / "empty.nii.gz")
    (tmp_path / "text.nii.gz").write_text("this is not an image\n")
    with pytest.raises(UserError, match="not a readable NIfTI"):
        load_volume(tmp_path / "text.nii.gz")
    good = write_nifti_ijk(tmp_path / "good.nii.gz", np.ones((30, 30, 30), np.float32), np.eye(4)).read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="trunc.nii.gz"):
        load_volume(tmp_path / "trunc.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match="unknown volume format"):
        load_volume(tmp_path / "x.png")
    series = write_dicom_series(tmp_path / "series", np.zeros((3, 8, 8), np.int16))
    one = sorted(series.iterdir())[0]
    with pytest.raises(UserError, match=r"one DICOM file, a single slice of a series; give the folder that holds"):
        load_volume(one)
    assert load_volume(series).shape == (3, 8, 8)
    assert dicom_series_title(series, dicom_slice_series(one)) == "series"  # the folder's only series: its name
    write_dicom_series(series, np.zeros((2, 8, 8), np.int16), series_uid="1.2.3.4", prefix="mr")
    assert dicom_series_title(series, "1.2.3.4") == "series mr000.dcm"  # neither description nor number: first file
    with pytest.raises(UserError) as info:  # two series in one folder: each named by its count and first file
        load_volume(series)
    assert "folder holds 2 DICOM series (" in str(info.value) and "2 files CT from mr000.dcm" in str(info.value)
    assert "3 files CT from slice000.dcm" in str(info.value) and "open one of its files in napari" in str(info.value)
    import SimpleITK as sitk  # a multi-frame DICOM file holds a whole volume: read as one

    frames = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    sitk.WriteImage(sitk.GetImageFromArray(frames), str(tmp_path / "multiframe.dcm"))
    np.testing.assert_array_equal(load_volume(tmp_path / "multiframe.dcm").array, frames)
    # A header whose voxel file is elsewhere: named, and ITK's message (a line of its source) is not shown.
    import SimpleITK as sitk

    for suffix, data in ((".mhd", ".raw"), (".nhdr", ".raw")):
        path = tmp_path / f"detached{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32)), str(path))
        assert load_volume(path).shape == (3, 4, 5)
        (tmp_path / f"detached{data}").rename(tmp_path / "moved.raw")
        with pytest.raises(UserError, match=rf"detached\{suffix}: its voxel file detached\.raw is missing; keep it"):
            load_volume(path)
    # Voxels no model can read: complex numbers (raw MRI) and a scan with no finite value at all.
    write_nifti_ijk(tmp_path / "complex.nii.gz", np.ones((4, 4, 3), np.complex64), np.eye(4))
    with pytest.raises(UserError, match="complex.nii.gz: voxels are complex numbers; save their magnitude"):
        load_volume(tmp_path / "complex.nii.gz")
    blank = np.full((4, 4, 3), np.nan, np.float32)
    blank[0, 0, 0] = np.inf
    write_nifti_ijk(tmp_path / "nan.nii.gz", blank, np.eye(4))
    with pytest.raises(UserError, match="nan.nii.gz: every voxel is NaN or infinite"):
        load_volume(tmp_path / "nan.nii.gz")
    blank[1, 1, 2] = 7.0  # one finite voxel, in the last slice: a scan with gaps still opens
    write_nifti_ijk(tmp_path / "gaps.nii.gz", blank, np.eye(4))
    gaps = load_volume(tmp_path / "gaps.nii.gz").array
    assert gaps[np.isfinite(gaps)].tolist() == [7.0]


def test_save_refuses_missing_folder_without_leaving_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        save_volume(tmp_path / "nope" / "seg.nii.gz", np.zeros((2, 3, 4), np.uint8), np.eye(4))
    # NIfTI's header holds 16-bit sizes: nibabel's HeaderDataError became one sentence pointing to MHA and NRRD
    with pytest.raises(UserError, match=r"seg.nii.gz: a NIfTI file holds at most 32767 voxels along an axis, and this "
                                        r"volume is 1 x 2 x 40000; end the name with .mha or .nrrd"):
        save_volume(tmp_path / "seg.nii.gz", np.zeros((1, 2, 40000), np.uint8), np.eye(4))
    assert save_volume(tmp_path / "seg.mha", np.zeros((1, 2, 40000), np.uint8), np.eye(4)).is_file()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["seg.mha"]


def test_an_enhanced_dicom_file_whose_frames_cannot_be_placed_is_read_in_file_order_with_a_warning(tmp_path):
    """An enhanced cine whose per-frame headers lack a frame's position, or put frames in two orientations, cannot be
    laid out phase by phase: it is read as ITK reads it, every frame in the order stored, as one volume. That used to
    happen without a word, the phases mixed in one stack; now a warning says so and why."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from helpers import write_enhanced_dicom

    cine = (np.arange(2 * 3 * 6 * 8).reshape(2, 3, 6, 8) % 300).astype(np.int16)  # 2 phases x 3 slices
    affine = oblique_affine(spacing_xyz=(0.8, 0.9, 8.0))
    path = write_enhanced_dicom(tmp_path / "cine.dcm", cine, affine)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file that can be laid out: no warning
        assert len(load_frames(path)) == 2
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(tmp_path / "no_position.dcm")
    ds = pydicom.dcmread(path)
    tilted = Dataset()
    tilted.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.PerFrameFunctionalGroupsSequence[4].PlaneOrientationSequence = Sequence([tilted])
    ds.save_as(tmp_path / "two_orientations.dcm")
    for name, why in (("no_position", "its frame 3 has no position in its per-frame headers"),
                      ("two_orientations", "its frames lie in 2 orientations")):
        with pytest.warns(UserWarning, match=rf"{name}.dcm: {why}; its 6 frames are read in the order it stores them, "
                                             r"as one volume \(a cine's phases would be mixed in it\)"):
            frames = load_frames(tmp_path / f"{name}.dcm")
        assert len(frames) == 1 and frames[0].shape == (6, 6, 8)
        np.testing.assert_array_equal(frames[0].array, cine.reshape(6, 6, 8))  # as stored: phase by phase here


def test_a_multiframe_dicom_file_smaller_than_its_header_says_is_one_sentence(tmp_path):
    """Rows or Columns of a multi-frame file damaged to 65535 (found by benchmarks/fuzz_readers.py): ITK read past the
    file's end into an image of 65535 columns, which then could not even be saved as NIfTI; refused from the header."""
    from helpers import write_enhanced_dicom

    good = write_enhanced_dicom(tmp_path / "good.dcm", np.zeros((2, 4, 24, 20), np.int16), np.diag([0.8, 0.9, 3, 1.0]))
    assert [f.shape for f in load_frames(good)] == [(4, 24, 20)] * 2
    for field, value in (("Columns", 65535), ("Rows", [65535, 65535])):  # a value repeated: ITK takes the first
        ds = pydicom.dcmread(good)
        setattr(ds, field, value)
        ds.save_as(tmp_path / f"{field}.dcm")
        size = (tmp_path / f"{field}.dcm").stat().st_size
        shape = "24 x 65535" if field == "Columns" else "65535 x 20"
        with pytest.raises(UserError, match=rf"{field}.dcm: DICOM header gives 8 frames of {shape} pixels "
                                            rf"\(\d+ bytes\), more than the file's {size} bytes; the file is damaged"):
            load_frames(tmp_path / f"{field}.dcm")


def test_normalisation_survives_nan_inf_and_constant_images():
    a = np.array([[[np.nan, 1.0, 2.0], [np.inf, -np.inf, 3.0]]], np.float32)
    out = normalise_intensity(a)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert np.array_equal(normalise_intensity(np.full((2, 3, 3), 7.0)), np.zeros((2, 3, 3), np.float32))
    assert np.array_equal(normalise_intensity(np.full((1, 2, 2), np.nan)), np.zeros((1, 2, 2), np.float32))
    ramp = normalise_intensity(np.arange(1000, dtype=np.float32).reshape(10, 10, 10))
    assert ramp.min() == 0.0 and ramp.max() == 1.0


def test_normalisation_of_a_range_wider_than_float32_holds_is_finite_and_exact():
    """Intensities from -3e38 to 3e38 (a float32 scan of noise at the type's limits): ``x - lo`` overflowed to
    infinity in float32 and the scaled image held infinities and NaN, whose features stopped the Embedding panel
    with "SVD did not converge" (benchmarks/fuzz_layers.py). The scaling, done in float64 here, is what it gives."""
    import warnings

    a = (np.random.default_rng(0).random((4, 20, 20)).astype(np.float32) * 2 - 1) * np.finfo(np.float32).max
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way either
        out = normalise_intensity(a)
    lo, hi = intensity_bounds(a)
    direct = (np.clip(a.astype(np.float64), lo, hi) - lo) / (hi - lo)
    assert np.isfinite(out).all() and out.min() == 0.0 and 1 - 1e-6 <= out.max() <= 1.0
    np.testing.assert_allclose(out, direct, rtol=0, atol=1e-6)


def test_float64_values_beyond_float32_are_scaled_by_a_power_of_two_not_made_infinite():
    """A float64 scan with values near 1e300: cast to float32 they became infinite, and the image was segmented
    as blank without a word (benchmarks/fuzz_layers.py). Scaled by a power of two first, every step that does not
    depend on units (percentile scaling, resampling to a pixel spacing) gives what the same scan in small units does."""
    from coral_core.data import at_pixel_spacing
    from coral_core.volume import as_float32, float32_scale

    small = np.random.default_rng(1).random((5, 24, 20)) * 2 - 1
    big = small * 1e300
    assert float32_scale(small) == 1.0 and float32_scale(big.astype(np.float32)) == 1.0
    scale = float32_scale(big)
    assert np.log2(scale).is_integer() and np.isfinite(as_float32(big)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalise_intensity(big)
    np.testing.assert_allclose(out, normalise_intensity(small), rtol=0, atol=1e-6)
    np.testing.assert_allclose(intensity_bounds(big), np.multiply(intensity_bounds(small), 1e300), rtol=1e-6)
    # bounds from a part of the scan (a model's central window), in the scan's own units
    part = np.s_[:, 6:18, 5:15]
    np.testing.assert_allclose(normalise_intensity(big, bounds=intensity_bounds(big[part])),
                               normalise_intensity(small, bounds=intensity_bounds(small[part])), rtol=0, atol=1e-6)
    resampled, _, _, _ = at_pixel_spacing(big, (2.0, 0.5, 0.5), 1.0, 16)
    assert np.isfinite(resampled).all()
    np.testing.assert_allclose(normalise_intensity(resampled),
                               normalise_intensity(at_pixel_spacing(small, (2.0, 0.5, 0.5), 1.0, 16)[0]), atol=1e-5)
    edges = np.array([[[np.inf, -np.inf, np.nan, 1e300, -1e300, 0.0]]])  # non-finite voxels as before
    assert np.isfinite(normalise_intensity(edges)).all() and normalise_intensity(edges)[0, 0, 3] == 1.0


@pytest.mark.parametrize("pixel_spacing", [None, 0.5])
@pytest.mark.parametrize("on_device", [False, True])
def test_a_float64_scan_beyond_float32_segments_and_embeds_as_in_small_units(pixel_spacing, on_device):
    """The segmentation and the slice features of that scan: the host path, the on-device (tensor) path, and a
    model with a physical scale segmenting in windows, each equal to the same scan's in units float32 holds."""
    import torch

    from coral_core.infer import embed_volume, segment_volume
    from coral_core.model import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(UNetConfig(n_classes=3, class_names=["background", "a", "b"], base_filters=4, depth=2,
                            image_size=16, pixel_spacing=pixel_spacing)).eval()
    with torch.no_grad():  # an untrained head says background everywhere; this one says each class somewhere
        model.decoder.head.weight.mul_(50)
        model.decoder.head.bias.zero_()
    small = np.random.default_rng(2).random((4, 24, 24)).astype(np.float64)
    spacing = (1.0, 0.5, 0.5) if pixel_spacing else None
    expected = segment_volume(model, small, on_device=on_device, spacing=spacing)
    got = segment_volume(model, small * 1e300, on_device=on_device, spacing=spacing)
    assert np.array_equal(got, expected) and len(np.unique(expected)) > 1
    np.testing.assert_allclose(embed_volume(model, small * 1e300, spacing=spacing),
                               embed_volume(model, small, spacing=spacing), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["normal", "nan_inf", "constant", "all_nan", "ramp", "int16", "two_values",
                                  "float32_limits"])
def test_normalisation_on_a_tensor_equals_the_numpy_one(case):
    """The GPU inference path normalises with torch; it must match the host's NumPy version."""
    import torch

    rng = np.random.default_rng(3)
    a = {
        "normal": rng.normal(size=(5, 17, 13)).astype(np.float32) * 100 + 40,
        "nan_inf": np.array([[[np.nan, 1.0, 2.0], [np.inf, -np.inf, 3.0]]], np.float32),
        "constant": np.full((2, 3, 3), 7.0),
        "all_nan": np.full((1, 2, 2), np.nan, np.float32),
        "ramp": np.arange(1000, dtype=np.float32).reshape(10, 10, 10),
        "int16": rng.integers(-1024, 3000, (4, 30, 30)).astype(np.int16),
        "two_values": np.where(rng.random((3, 9, 9)) < 0.999, 0, 5).astype(np.uint8),
        "float32_limits": (rng.random((3, 9, 9)).astype(np.float32) * 2 - 1) * np.finfo(np.float32).max,
    }[case]
    expected = normalise_intensity(a)
    got = normalise_intensity_tensor(torch.from_numpy(np.ascontiguousarray(a))).numpy()
    assert got.dtype == np.float32 and got.shape == a.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_headers_claiming_more_than_the_file_or_the_machine_are_refused_before_reading(tmp_path):
    import gzip

    import nibabel as nib

    good = write_nifti_ijk(tmp_path / "good.nii", np.ones((30, 30, 30), np.float32), np.eye(4)).read_bytes()
    (tmp_path / "cut.nii").write_bytes(good[: len(good) // 3])
    with pytest.raises(UserError, match=r"cut.nii: file is truncated \(holds \d+ of \d+ bytes\)"):
        load_volume(tmp_path / "cut.nii")
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:
        fh.write(header.binaryblock + b"\x00" * 4)
    with pytest.raises(UserError, match="header claims a 30000 x 30000 x 30000 volume .* more than this machine's memory"):
        load_volume(tmp_path / "huge.nii.gz")
    # MHA/MHD and NRRD/NHDR: voxels in the file or beside it cut short, or a header claiming too much, are refused
    # from the header, before ITK reads (and prints MetaImage's complaint to the terminal)
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(np.random.rand(6, 20, 30).astype(np.float32))
    for name, data in (("v.mha", "v.mha"), ("v.nrrd", "v.nrrd"), ("v.mhd", "v.raw"), ("v.nhdr", "v.raw")):
        sitk.WriteImage(volume, str(tmp_path / name))
        assert load_volume(tmp_path / name).shape == (6, 20, 30)
        whole = (tmp_path / data).read_bytes()
        (tmp_path / data).write_bytes(whole[:-1])
        where = "file is" if data == name else f"its voxel file {data} is"
        with pytest.raises(UserError, match=rf"{name}: {where} truncated \(holds \d+ of \d+ bytes\); re-export"):
            load_volume(tmp_path / name)
    for name in ("z.mha", "z.nrrd"):  # compressed: MetaImage gives their length, NRRD leaves it to ITK's reader
        sitk.WriteImage(volume, str(tmp_path / name), useCompression=True)
        np.testing.assert_array_equal(load_volume(tmp_path / name).array, sitk.GetArrayFromImage(volume))
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) - 100])
        cause = "file is truncated" if name == "z.mha" else r"not a readable volume \(expected 14400 bytes but received"
        with pytest.raises(UserError, match=rf"{name}: {cause}"):
            load_volume(tmp_path / name)
    # voxels written as text (BinaryData = False) take other lengths than binary ones: not measured, read
    (tmp_path / "text.mha").write_text("ObjectType = Image\nNDims = 3\nBinaryData = False\nDimSize = 3 2 2\n"
                                       "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n0 1 2 3 4 5 6 7 8 9 10 11\n")
    np.testing.assert_array_equal(load_volume(tmp_path / "text.mha").array.ravel(), np.arange(12))
    (tmp_path / "huge.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\n"
                                       "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(UserError, match="huge.mha: header claims a 30000 x 30000 x 30000 volume .* more than this"):
        load_volume(tmp_path / "huge.mha")


def test_voxel_geometry_no_slice_can_be_placed_by_is_one_sentence(tmp_path):
    """A NIfTI whose sform holds a NaN, a zero-length axis or two axes along one another (found by
    benchmarks/fuzz_readers.py: it read, segmented, then nibabel failed to write its labels) is refused as read."""
    import struct

    good = write_nifti_ijk(tmp_path / "good.nii", np.ones((6, 5, 4), np.float32), np.diag([0.8, 0.9, 3.0, 1.0]))
    raw = good.read_bytes()
    assert struct.unpack_from("<h", raw, 254)[0] > 0  # sform_code: the sform (srow_x, _y, _z at 280, 296, 312) rules
    for name, offset, values in (("nan", 304, (float("nan"),)), ("flat", 280, (0.0, 0.0, 0.0)),
                                 ("along", 296, (0.9, 0.0, 0.0))):  # srow_y[2]; column i; column j along column i
        damaged = bytearray(raw)
        struct.pack_into(f"<{len(values)}f", damaged, offset, *values)
        if name == "along":
            struct.pack_into("<3f", damaged, 280, 0.0, 0.0, 0.0)  # x: nothing; y: i and j both
            struct.pack_into("<2f", damaged, 296, 0.8, 0.9)
        (tmp_path / f"{name}.nii").write_bytes(bytes(damaged))
        with pytest.raises(UserError, match=rf"{name}.nii: its header's voxel geometry is not usable \(a spacing or "
                                            r"orientation that is NaN, infinite, zero or flat\)"):
            load_volume(tmp_path / f"{name}.nii")
    assert load_volume(good).spacing == pytest.approx((3.0, 0.9, 0.8))


def test_a_cine_series_with_a_file_without_instance_number_reads_without_gdcm_sorting_it(tmp_path):
    """SimpleITK's GetGDCMSeriesFileNames crashed the process in about half of the tries on a cine series (several
    images at a position) one of whose files gives no instance number (found by benchmarks/fuzz_readers.py): such a
    series is ordered by its positions and times here, as the intact one reads. A plain series with such a file
    reads too. Each read runs 5 times, in a child process, so that a crash fails this test and not the run."""
    import subprocess
    import sys

    movie = np.arange(3 * 4 * 12 * 10, dtype=np.int16).reshape(3, 4, 12, 10)
    cine = write_dicom_series(tmp_path / "cine", movie)
    plain = write_dicom_series(tmp_path / "plain", movie[0])
    for folder in (cine, plain):
        f = sorted(folder.iterdir())[2]
        ds = pydicom.dcmread(f)
        del ds[0x00200013]  # Instance Number
        ds.save_as(f)
    code = (
        "import sys\n"
        "from coral_core.errors import UserError\n"
        "from coral_core.volume import frame_count, load_frames\n"
        "import numpy as np\n"
        "from coral_core.volume import frame_count, load_frames\n"
        "print(frame_count(sys.argv[1]))\n"
        "np.save(sys.argv[2], np.stack([f.array for f in load_frames(sys.argv[1])]))\n"
    )
    for _ in range(5):
        done = [subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / f"{folder.name}.npy")],
                               capture_output=True, text=True, timeout=120) for folder in (cine, plain)]
        assert [d.returncode for d in done] == [0, 0], [d.stderr[-500:] for d in done]
        assert [d.stdout.split() for d in done] == [["3"], ["1"]]
        np.testing.assert_array_equal(np.load(tmp_path / "cine.npy"), movie)
        np.testing.assert_array_equal(np.load(tmp_path / "plain.npy"), movie[:1])


def test_a_metaimage_whose_ndims_crashes_itk_is_refused_and_the_header_looks_say_nothing(tmp_path):
    """ITK's MetaImage reader crashes the process (a segmentation fault, an abort) on a negative or huge NDims, as a
    damaged file holds it (found by benchmarks/fuzz_readers.py): refused from our own reading of the header, by the
    reader and by the header looks napari's reader and the CLI make first. Run in a child process, so that a crash
    fails this test, not the whole run."""
    import subprocess
    import sys

    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.float32)), str(tmp_path / "good.mha"))
    good = (tmp_path / "good.mha").read_bytes()
    assert b"NDims = 3\n" in good
    for value in ("-1", "65", "99999999999", "abc"):
        (tmp_path / f"n{value}.mha").write_bytes(good.replace(b"NDims = 3\n", f"NDims = {value}\n".encode()))
    code = (
        "import sys\n"
        "from coral_core.errors import UserError\n"
        "from coral_core.volume import frame_count, load_volume, read_class_names\n"
        "for path in sys.argv[1:]:\n"
        "    print(frame_count(path), read_class_names(path))\n"
        "    try:\n"
        "        load_volume(path)\n"
        "    except UserError as exc:\n"
        "        print(exc)\n"
        "print(load_volume(sys.argv[1].replace('n-1', 'good')).shape)\n"
    )
    paths = [str(tmp_path / f"n{value}.mha") for value in ("-1", "65", "99999999999", "abc")]
    done = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "(3, 4, 5)"  # the intact file still reads
    for i, value in enumerate(("-1", "65", "99999999999", "abc")):
        assert lines[2 * i] == "1 None"  # unreadable: one frame, no class names, no exception
        assert lines[2 * i + 1] == (f"{tmp_path / f'n{value}.mha'}: header's NDims = {value!r} is not a dimension "
                                    "count from 1 to 10; the file is damaged, re-export the volume")


@pytest.mark.parametrize("kind", ["series", "multiframe"])
def test_a_gantry_tilted_dicom_stack_keeps_each_slice_where_it_was(tmp_path, kind):
    """CT slices acquired with a tilted gantry step along a direction that is not their normal. Each slice is kept
    as acquired, the geometry sheared so that its first pixel lies where its header says (one sentence says so);
    labels saved for it keep that in NIfTI's sform (nibabel, and we, read it back) and the untilted stack in the
    qform, which ITK reads as it reads the series itself; DICOM SEG and RT structure sets are written on its images
    and read back onto it."""
    import SimpleITK as sitk

    from coral_core.dicomlabels import save_dicom_seg, save_rt_structure_set
    from coral_core.volume import load_labels_like
    from helpers import write_enhanced_dicom

    tilt = np.radians(15.0)
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 900, (6, 12, 14)).astype(np.int16)
    if kind == "series":
        source = write_dicom_series(tmp_path / "ct", volume, spacing_zyx=(3.0, 0.7, 0.8), tilt_degrees=15.0)
        headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in source.iterdir()),
                         key=lambda ds: float(ds.ImagePositionPatient[2]))
        positions = [np.array(ds.ImagePositionPatient, float) for ds in headers]
    else:
        affine = np.diag([0.8, 0.7, 3.0, 1.0])
        affine[1, 2] = -3.0 * np.tan(tilt)  # RAS: posterior as z grows, as the series above (LPS y grows)
        source = write_enhanced_dicom(tmp_path / "ct.dcm", volume, affine)
        frames = pydicom.dcmread(source, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
        positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float) for f in frames]
    with pytest.warns(UserWarning, match=r"its slices are tilted 15.0 degrees from the stack's normal \(a gantry tilt\); "
                                         r"each is kept as acquired, in a sheared geometry"):
        image = load_volume(source)
    np.testing.assert_array_equal(image.array, volume)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    for k, position in enumerate(positions):
        np.testing.assert_allclose(lps[:3, 3] + k * lps[:3, 2], position, atol=1e-3)

    labels = (rng.random(volume.shape) > 0.7).astype(np.uint8) * rng.integers(1, 4, volume.shape).astype(np.uint8)
    nifti = save_like(tmp_path / "labels.nii.gz", labels, image)
    back = load_volume(nifti)
    np.testing.assert_allclose(back.affine, image.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, labels)
    itk = sitk.ReadImage(str(nifti))  # refuses a sheared sform without a qform to fall back on
    np.testing.assert_allclose(itk.GetSpacing()[2], 3.0 / np.cos(tilt), atol=1e-3)  # the distance between positions
    if kind == "series":  # ITK's reading of the series itself
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source)))
        untilted = reader.Execute()
        np.testing.assert_allclose(itk.GetDirection(), untilted.GetDirection(), atol=1e-5)
        np.testing.assert_allclose(itk.GetOrigin(), untilted.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(itk.GetSpacing(), untilted.GetSpacing(), atol=1e-4)
    mha = save_like(tmp_path / "labels.mha", labels, image)
    np.testing.assert_allclose(load_volume(mha).affine, image.affine, atol=1e-5)

    for save in (save_dicom_seg, save_rt_structure_set):
        out = save(tmp_path / f"{save.__name__}.dcm", labels, image, ["background", "a", "b", "c"])
        np.testing.assert_array_equal(load_labels_like(out, image).array, labels, err_msg=save.__name__)
    measures = pydicom.dcmread(tmp_path / "save_dicom_seg.dcm").SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(3.0)  # along the normal, not between positions


def test_a_stack_along_its_normal_keeps_its_geometry_without_a_word(tmp_path):
    """No tilt: no warning, the affine's slice axis along the normal, its length the distance between slices (for a
    multi-frame file from the positions themselves, not rounded)."""
    import warnings

    from helpers import write_enhanced_dicom

    affine = oblique_affine((0.8, 0.9, 1.875))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        series = load_volume(write_dicom_series(tmp_path / "ct", np.zeros((5, 6, 8)), spacing_zyx=(3.3, 0.8, 0.8)))
        frames = load_volume(write_enhanced_dicom(tmp_path / "mr.dcm", np.zeros((40, 6, 8), np.int16), affine))
    np.testing.assert_allclose(series.affine, np.diag([-0.8, -0.8, 3.3, 1.0]), atol=1e-6)
    np.testing.assert_allclose(frames.affine[:3, 2], affine[:3, 2], atol=1e-4)  # was off by 0.005 mm a slice
    from coral_core.dicomlabels import save_dicom_seg

    save_dicom_seg(tmp_path / "seg.dcm", np.ones(frames.shape, np.uint8), frames)  # its far frames were off the grid


def test_slice_files_cut_short_are_named_as_left_out(tmp_path):
    """A slice file cut short (an interrupted copy) is left out of the series by GDCM: one sentence names it, from
    the folder and from a slice file of a folder that holds another series too (whose files, and a notes file, are
    not named); the volume holds the other slices."""
    folder = write_dicom_series(tmp_path / "ct", np.random.rand(6, 16, 16) * 1000, spacing_zyx=(3.0, 0.7, 0.7))
    write_dicom_series(folder, np.random.rand(3, 16, 16) * 1000, series_uid="1.2.3.4.5", prefix="other")
    (folder / "notes.txt").write_text("exported on Monday")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole: nothing said
        assert load_dicom_series(folder / "slice000.dcm")[0].shape == (6, 16, 16)
    cut = (folder / "slice003.dcm").read_bytes()
    (folder / "slice003.dcm").write_bytes(cut[: len(cut) - 200])
    with pytest.warns(UserWarning) as caught:
        assert load_dicom_series(folder / "slice000.dcm")[0].shape == (5, 16, 16)
    said = [str(w.message) for w in caught]
    assert said[0] == (f"{folder}: left out 1 file(s) of the series that could not be read, cut short or damaged "
                       "(slice003.dcm); the volume lacks their slices: copy or export them again")
    assert "a slice may be missing" in said[1] and len(said) == 2
    for f in folder.glob("other*.dcm"):
        f.unlink()
    with pytest.warns(UserWarning) as caught:
        assert load_volume(folder).shape == (5, 16, 16)
    said = [str(w.message) for w in caught]
    assert re.search(r"ct: left out 1 file\(s\) of the series .* \(slice003.dcm\)", said[0])
    assert "a slice may be missing" in said[1] and len(said) == 2


def test_a_localizer_among_a_series_slices_is_left_out_in_one_sentence(tmp_path):
    """A localizer (scout) image exported with a series' slices, in another orientation, is not a slice: the volume
    holds the others, its geometry theirs (it was read as a seventh slice, spacing and tilt made up from it), one
    sentence names the file left out, and DICOM labels written for the volume refer to its slices alone."""
    from coral_core.dicomlabels import save_dicom_seg

    volume = np.arange(6 * 10 * 12).reshape(6, 10, 12).astype(np.int16)
    folder = write_dicom_series(tmp_path / "ct", volume, spacing_zyx=(3.0, 0.7, 0.7))
    scout = pydicom.dcmread(folder / "slice000.dcm")
    scout.ImageOrientationPatient, scout.ImagePositionPatient = [1, 0, 0, 0, 0, -1], [0, 10, 50]
    scout.SOPInstanceUID, scout.InstanceNumber = scout.SOPInstanceUID + ".99", 99
    scout.save_as(folder / "scout.dcm")
    with pytest.warns(UserWarning) as caught:
        image = load_volume(folder)
    assert [str(w.message) for w in caught] == [
        f"{folder}: left out 1 image(s) in another orientation than the series' other 6, localizer or scout images "
        "(scout.dcm)"]
    np.testing.assert_array_equal(image.array, volume)
    np.testing.assert_allclose(image.affine, np.diag([-0.7, -0.7, 3.0, 1.0]), atol=1e-6)
    assert frame_count(folder) == 1
    seg = pydicom.dcmread(save_dicom_seg(tmp_path / "seg.dcm", np.ones(image.shape, np.uint8), image))
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert len(referenced) == 6 and scout.SOPInstanceUID not in referenced


def test_orientations_that_differ_by_float_noise_are_one_stack():
    """Orientations within 0.001 are one (noise across a stack's headers, even either side of a rounding edge);
    a localizer's is not; numbers and DICOM text alike; images without one are kept."""
    from coral_core.volume import main_orientation

    oblique = [0.8660254, 0.5, 0.0, -0.12345, 0.2138, 0.9690]
    noisy = [oblique, [v + 1e-8 for v in oblique], [v - 1e-8 for v in oblique],
             "\\".join(f"{v:.7f}" for v in oblique), [0.8660254, 0.5, 0.0, -0.1235001, 0.2138, 0.9690]]
    assert main_orientation([*noisy, [1, 0, 0, 0, 0, -1], None]) == [True] * 5 + [False, True]
