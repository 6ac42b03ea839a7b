"""Slice datasets and dataset-folder discovery, on files the tests write."""

import re

import numpy as np
import pytest

from coral_core.data import (
    LabelledSlices,
    PretrainSlices,
    discover_acdc,
    discover_pairs,
    discover_volumes,
    evaluation_pairs,
    parse_slices,
    output_name,
    slice_positions,
)
from coral_core.errors import UserError
from helpers import write_nifti_ijk


def test_slice_positions_follow_the_paper():
    assert slice_positions(4).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_pretrain_slices_carry_position_partition_and_volume():
    vols = [np.random.rand(8, 20, 30).astype(np.float32), np.random.rand(4, 32, 32).astype(np.float32)]
    ds = PretrainSlices(vols, image_size=16)
    assert len(ds) == 12 and ds.images.shape == (12, 1, 16, 16)
    assert ds.partitions[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds.volume_ids.tolist() == [0] * 8 + [1] * 4
    image, position, partition, vid = ds[9]
    assert position.item() == pytest.approx(0.5) and partition.item() == 1 and vid.item() == 1
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0 + 1e-6


def test_pretrain_slices_take_volumes_prepared_as_they_were_read():
    """A volume normalised and resampled when it was read (``resize_slices``) gives the slices
    the raw volume gives; one prepared at another size is resampled to the model's."""
    import torch

    from coral_core.data import resize_slices

    vols = [np.random.rand(8, 20, 30).astype(np.float32), np.random.rand(4, 40, 40).astype(np.float32)]
    raw = PretrainSlices(vols, image_size=16)
    prepared = PretrainSlices([resize_slices(vols[0], 16), resize_slices(vols[1], 24)], image_size=16)
    assert torch.equal(prepared.images[:8], raw.images[:8])
    assert prepared.images.shape == raw.images.shape
    torch.testing.assert_close(prepared.images[8:], raw.images[8:], atol=0.1, rtol=0)  # resampled twice
    assert torch.equal(prepared.positions, raw.positions) and torch.equal(prepared.volume_ids, raw.volume_ids)
    given = [resize_slices(v, 16) for v in vols]
    consumed = PretrainSlices(given, image_size=16, consume=True)  # frees each volume once copied in
    assert given == [] and torch.equal(consumed.images, raw.images)


def test_labelled_slices_hold_only_the_annotated_slices():
    vol = np.random.rand(6, 16, 16).astype(np.float32)
    lab = np.zeros((6, 16, 16), np.int64)
    lab[2, 4:8, 4:8] = 1
    lab[5, :, :] = 2
    ds = LabelledSlices([vol], [lab], [[2, 5]], image_size=16)
    assert len(ds) == 2
    assert ds.labels[0].unique().tolist() == [0, 1] and ds.labels[1].unique().tolist() == [2]
    with pytest.raises(UserError, match="outside"):
        LabelledSlices([vol], [lab], [[7]], image_size=16)
    with pytest.raises(UserError, match="do not match"):
        LabelledSlices([vol], [lab[:3]], [[1]], image_size=16)



def test_labelled_slices_take_pairs_prepared_as_they_were_read():
    """An image and labels prepared at the model's size when read (``prepare_labelled``, as
    `coral finetune` does for large scans) give exactly the slices and labels the raw pair gives."""
    import torch

    from coral_core.data import prepare_labelled

    rng = np.random.default_rng(3)
    vol = rng.random((7, 45, 37)).astype(np.float32)
    lab = rng.integers(0, 4, (7, 45, 37)).astype(np.uint8)
    raw = LabelledSlices([vol], [lab], [[0, 3, 6]], image_size=32)
    images, labels = prepare_labelled(vol, lab, 32, chunk=3)  # chunks that do not divide the 7 slices
    assert images.shape == (7, 1, 32, 32) and labels.shape == (7, 32, 32) and labels.dtype == torch.uint8
    prepared = LabelledSlices([images], [labels], [[0, 3, 6]], image_size=32)
    assert torch.equal(prepared.images, raw.images) and torch.equal(prepared.labels, raw.labels)
    assert torch.equal(PretrainSlices([images], 32).images, PretrainSlices([vol], 32).images)
    with pytest.raises(UserError, match="do not match"):
        LabelledSlices([images], [labels[:, :16]], [[1]], image_size=32)

def _write(path, shape=(10, 12, 4)):
    write_nifti_ijk(path, np.random.rand(*shape).astype(np.float32), np.eye(4))
    return path


def test_discover_acdc_layout(tmp_path):
    for pid in ("patient001", "patient002"):
        d = tmp_path / pid
        d.mkdir()
        _write(d / f"{pid}_4d.nii.gz", (10, 12, 4, 3))
        for frame in ("01", "12"):
            _write(d / f"{pid}_frame{frame}.nii.gz")
            if pid == "patient001":
                _write(d / f"{pid}_frame{frame}_gt.nii.gz")
        (d / "Info.cfg").write_text("ED: 1\nES: 12\n")
    cases = discover_acdc(tmp_path)
    assert [(c.subject, c.image.name, c.label.name if c.label else None) for c in cases] == [
        ("patient001", "patient001_frame01.nii.gz", "patient001_frame01_gt.nii.gz"),
        ("patient001", "patient001_frame12.nii.gz", "patient001_frame12_gt.nii.gz"),
        ("patient002", "patient002_frame01.nii.gz", None),
        ("patient002", "patient002_frame12.nii.gz", None),
    ]
    assert len(discover_volumes([tmp_path])) == 4


def test_discover_image_label_folder_pairs(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for name in ("case_a", "case_b"):
        _write(tmp_path / "imagesTr" / f"{name}_0000.nii.gz")
    _write(tmp_path / "labelsTr" / "case_a.nii.gz")
    cases = discover_pairs(tmp_path / "imagesTr", tmp_path / "labelsTr")
    assert [(c.subject, c.label is not None) for c in cases] == [("case_a", True), ("case_b", False)]
    assert [c.subject for c in discover_volumes([tmp_path])] == ["case_a", "case_b"]


def test_discover_rejects_empty_folder(tmp_path):
    with pytest.raises(UserError, match="holds no volumes"):
        discover_volumes([tmp_path])


def test_discover_pairs_side_by_side_in_one_folder(tmp_path):
    # CHD and MM-WHS keep ct_1001_image beside ct_1001_label; others case beside case_gt or case_seg
    for name in ("ct_1001_image", "ct_1001_label", "ct_1002_image", "ct_1003_image", "ct_1003_label",
                 "scan.nii", "scan_gt", "other_seg"):
        _write(tmp_path / (name if name.endswith(".nii") else f"{name}.nii.gz"))
    cases = discover_volumes([tmp_path])
    assert [(c.image.name, c.label.name if c.label else None, c.subject) for c in cases] == [
        ("ct_1001_image.nii.gz", "ct_1001_label.nii.gz", "ct_1001"),
        ("ct_1002_image.nii.gz", None, "ct_1002_image"),
        ("ct_1003_image.nii.gz", "ct_1003_label.nii.gz", "ct_1003"),
        ("scan.nii", "scan_gt.nii.gz", "scan"),
    ]


def test_discover_a_folder_per_case(tmp_path):
    # KiTS: case_00000/imaging.nii.gz with a bare segmentation.nii.gz; BraTS: one folder of modalities per
    # case, whose X_seg names no image there (left out, as every label file is: never read as a scan)
    for case in ("case_00000", "case_00001"):
        (tmp_path / "kits" / case).mkdir(parents=True)
        _write(tmp_path / "kits" / case / "imaging.nii.gz")
        if case == "case_00000":
            _write(tmp_path / "kits" / case / "segmentation.nii.gz")
    cases = discover_volumes([tmp_path / "kits"])
    assert [(c.image.parent.name, c.image.name, c.label.name if c.label else None, c.subject) for c in cases] == [
        ("case_00000", "imaging.nii.gz", "segmentation.nii.gz", "case_00000"),
        ("case_00001", "imaging.nii.gz", None, "case_00001"),
    ]
    brats = tmp_path / "brats" / "BraTS_001"
    brats.mkdir(parents=True)
    for name in ("BraTS_001_t1", "BraTS_001_flair", "BraTS_001_seg"):
        _write(brats / f"{name}.nii.gz")
    assert [(c.image.name, c.label, c.subject) for c in discover_volumes([brats.parent])] == [
        ("BraTS_001_flair.nii.gz", None, "BraTS_001"), ("BraTS_001_t1.nii.gz", None, "BraTS_001")]
    only = tmp_path / "only_labels"
    only.mkdir()
    _write(only / "a_seg.nii.gz")
    with pytest.raises(UserError, match=r"holds no volumes .* \(only label files: a_seg.nii.gz\)"):
        discover_volumes([only])


def test_discover_dicom_series_with_their_dicom_seg_labels(tmp_path):
    """DICOM series folders beside DICOM SEG and RT structure set files: each labels the series it refers to (a file,
    or a folder holding one as TCIA exports a SEG or RTSTRUCT series, whatever their names), or else the image it is
    named after; such a folder is never taken for an image, and the labelled cases load through lowlabel's reader."""
    from coral_core.dicomlabels import save_dicom_seg
    from coral_core.lowlabel import load_labelled_cases
    from coral_core.volume import load_volume
    from helpers import write_dicom_series, write_rt_structure_set

    study = tmp_path / "study"
    labels = {}
    for n, name in enumerate(("ct_a", "ct_b", "ct_c", "ct_d")):
        image = load_volume(write_dicom_series(study / name, np.zeros((4, 8, 8)),
                                               series_uid=f"1.2.826.0.1.3680043.9.7.{n}"))
        labels[name] = np.zeros((4, 8, 8), np.uint8)
        labels[name][1:3, 2:6, 2:5] = n + 1
        if name == "ct_a":  # a SEG series' folder, named as TCIA names them
            (study / "300.000000-Segmentation").mkdir()
            save_dicom_seg(study / "300.000000-Segmentation" / "1-1.dcm", labels[name], image, ["bg", "x", "y", "z"])
        elif name == "ct_b":  # a SEG file whose name says nothing
            save_dicom_seg(study / "annotation.dcm", labels[name], image, ["bg", "x", "y", "z"])
        elif name == "ct_d":  # contours, in an RTSTRUCT series' folder
            (study / "RTSTRUCT").mkdir()
            write_rt_structure_set(study / "RTSTRUCT" / "RS1.dcm", image.affine,
                                   (("GTV", "GTV", [(1, [(1.5, 1.5), (4.5, 1.5), (4.5, 5.5), (1.5, 5.5)])]),),
                                   referenced_series=f"1.2.826.0.1.3680043.9.7.{n}")
    cases = discover_volumes([study])
    assert [(c.image.name, c.label and c.label.name) for c in cases] == [
        ("ct_a", "1-1.dcm"), ("ct_b", "annotation.dcm"), ("ct_c", None), ("ct_d", "RS1.dcm")]
    loaded = load_labelled_cases(str(study), 0)
    assert [(c.name, c.labels.max()) for c in loaded] == [("ct_a", 1), ("ct_b", 2), ("ct_d", 1)]
    np.testing.assert_array_equal(loaded[1].labels, labels["ct_b"])
    assert loaded[2].labels.sum() == 12 and loaded[2].labels[1, 2:6, 2:5].all()  # voxels i 2..4, j 2..5
    with pytest.warns(UserWarning, match=r"RS1.dcm: holds no structure named 'y'; it holds GTV .*; the case is left "
                                         "out"):  # picked by name: ct_a and ct_b hold segments x, y and z
        picked = load_labelled_cases(str(study), 0, structures=["y"])
    assert [c.name for c in picked] == ["ct_a", "ct_b"]

    tcia = tmp_path / "tcia"  # patient / study / series, as TCIA exports a collection: each patient a subject
    for n, patient in enumerate(("LUNG1-001", "LUNG1-002")):
        study = tcia / patient / "01-01-2000-StudyID-1"
        image = load_volume(write_dicom_series(study / "1.000000-CT", np.zeros((4, 8, 8)),
                                               series_uid=f"1.2.826.0.1.3680043.9.6.{n}"))
        (study / "300.000000-Segmentation").mkdir()
        save_dicom_seg(study / "300.000000-Segmentation" / "1-1.dcm", labels["ct_a"], image, ["bg", "x"])
    cases = discover_volumes([tcia])
    assert [(c.subject, c.image.name, c.label.name) for c in cases] == [("LUNG1-001", "1.000000-CT", "1-1.dcm"),
                                                                         ("LUNG1-002", "1.000000-CT", "1-1.dcm")]
    assert [output_name(c) for c in cases] == ["LUNG1-001_1.000000-CT", "LUNG1-002_1.000000-CT"]  # folder names whole

    plain = tmp_path / "plain"  # no reference to go by: the name pairs them
    image = load_volume(write_dicom_series(plain / "case1", np.zeros((4, 8, 8))))
    save_dicom_seg(tmp_path / "elsewhere.dcm", labels["ct_a"], image, ["bg", "x"])
    import pydicom

    seg = pydicom.dcmread(tmp_path / "elsewhere.dcm")
    del seg.ReferencedSeriesSequence
    seg.save_as(plain / "case1_seg.dcm")
    assert [(c.image.name, c.label.name) for c in discover_volumes([plain])] == [("case1", "case1_seg.dcm")]


def test_evaluation_pairs_follow_the_names_coral_segment_writes(tmp_path):
    """ACDC frames (one patient's frames share a subject, so the file's name counts) and KiTS's folder per case
    (imaging.nii.gz named by its folder), each prediction as `coral segment --out-dir` names it."""
    acdc, kits, preds = tmp_path / "acdc", tmp_path / "kits", tmp_path / "preds"
    for frame in ("01", "12"):
        (acdc / "patient001").mkdir(parents=True, exist_ok=True)
        _write(acdc / "patient001" / f"patient001_frame{frame}.nii.gz")
        _write(acdc / "patient001" / f"patient001_frame{frame}_gt.nii.gz")
    for case in ("case_00000", "case_00001"):
        (kits / case).mkdir(parents=True)
        _write(kits / case / "imaging.nii.gz")
        _write(kits / case / "segmentation.nii.gz")
    preds.mkdir()
    for name in ("patient001_frame01", "patient001_frame12", "patient009_frame01", "case_00001_imaging"):
        _write(preds / f"{name}_labels.nii.gz")
    pairs, unmatched, missing = evaluation_pairs(preds, acdc)
    assert [(n, p.name, t.name) for n, p, t in pairs] == [
        ("patient001_frame01", "patient001_frame01_labels.nii.gz", "patient001_frame01_gt.nii.gz"),
        ("patient001_frame12", "patient001_frame12_labels.nii.gz", "patient001_frame12_gt.nii.gz")]
    assert [p.name for p in unmatched] == ["case_00001_imaging_labels.nii.gz", "patient009_frame01_labels.nii.gz"]
    assert missing == []
    pairs, _, missing = evaluation_pairs(preds, kits)
    assert [(n, t.parent.name, t.name) for n, _, t in pairs] == [("case_00001_imaging", "case_00001", "segmentation.nii.gz")]
    assert [(t.parent.name, t.name) for t in missing] == [("case_00000", "segmentation.nii.gz")]
    _write(preds / "patient001_frame01_seg.nii.gz")  # a second prediction of one case
    with pytest.raises(UserError, match="patient001_frame01_labels.nii.gz and patient001_frame01_seg.nii.gz are both"):
        evaluation_pairs(preds, acdc)


def test_discover_refuses_a_label_file_two_images_claim(tmp_path):
    for name in ("a", "a_image", "a_label"):
        _write(tmp_path / f"{name}.nii.gz")
    with pytest.raises(UserError, match="a_label.nii.gz: both a.nii.gz and a_image.nii.gz could be its image"):
        discover_volumes([tmp_path])


def test_discover_one_acdc_patient_folder(tmp_path):
    # a single patient's folder: its frames with their _gt files, the 4-D cine file left out
    d = tmp_path / "patient007"
    d.mkdir()
    _write(d / "patient007_4d.nii.gz", (10, 12, 4, 3))
    for frame in ("01", "09"):
        _write(d / f"patient007_frame{frame}.nii.gz")
        _write(d / f"patient007_frame{frame}_gt.nii.gz")
    cases = discover_volumes([d])
    assert [(c.image.name, c.label.name, c.subject) for c in cases] == [
        ("patient007_frame01.nii.gz", "patient007_frame01_gt.nii.gz", "patient007"),
        ("patient007_frame09.nii.gz", "patient007_frame09_gt.nii.gz", "patient007"),
    ]


def test_label_map_renumbers_coded_values_and_refuses_what_is_not_a_label_map(capsys):
    from coral_core.data import label_map, parse_label_values

    raw = np.array([[0, 205, 850], [500, 421, 205]], dtype=np.int16)
    assert parse_label_values("205, 500,850") == [205, 500, 850]
    out = label_map(raw, "L.nii.gz", [205, 500, 850])
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1, 3], [2, 0, 1]]
    assert "L.nii.gz: values 421 (1 voxels) are not in --label-values; read as background" in capsys.readouterr().err
    assert label_map(np.array([0, 1, 3]), "L").tolist() == [0, 1, 3]  # class numbers stay as they are
    # negative or huge codes take the sorting path, float files the rounding: the same classes
    assert label_map(raw.astype(np.int64) - 300, "L", [-95, 200, 550]).tolist() == [[0, 1, 3], [2, 0, 1]]
    assert label_map(raw.astype(np.int64) << 21, "L", [205 << 21, 500 << 21, 850 << 21]).tolist() == out.tolist()
    assert label_map(raw.astype(np.float32), "L", [205, 500, 850]).tolist() == out.tolist()
    for bad, fragment in ((raw, "holds label value 850"), (raw - 300, "negative label values"),
                          (raw + 0.5, "non-integer values")):
        with pytest.raises(UserError, match=fragment):
            label_map(bad, "L")
    for text, fragment in (("", "give the label values"), ("0,1", "0 is background"), ("1,1", "listed twice"),
                           ("a", "whole numbers"), (",".join(map(str, range(1, 258))), "at most 255")):
        with pytest.raises(UserError, match=fragment):
            parse_label_values(text)


def test_all_frames_reads_an_acdc_patient_as_its_cine_frames(tmp_path):
    from coral_core.data import case_volumes

    for pid in ("patient001", "patient002"):
        d = tmp_path / pid
        d.mkdir()
        if pid == "patient001":
            _write(d / f"{pid}_4d.nii.gz", (10, 12, 4, 3))
        for frame in ("01", "03"):
            _write(d / f"{pid}_frame{frame}.nii.gz")
            _write(d / f"{pid}_frame{frame}_gt.nii.gz")
    cases = discover_volumes([tmp_path], all_frames=True)
    # patient002 has no cine file: its frames stay; a file given by name is read frame by frame too
    assert [(c.image.name, c.frames) for c in cases] == [
        ("patient001_4d.nii.gz", True), ("patient002_frame01.nii.gz", False), ("patient002_frame03.nii.gz", False)]
    assert [name for name, _ in case_volumes(cases[0])] == ["patient001_t00", "patient001_t01", "patient001_t02"]
    assert [name for name, v in case_volumes(cases[1])] == ["patient002"]
    one = discover_volumes([tmp_path / "patient001" / "patient001_frame01.nii.gz"], all_frames=True)
    assert [name for name, _ in case_volumes(one[0])] == ["patient001_frame01"]


def test_at_pixel_spacing_keeps_millimetres_and_centres_the_crop():
    """Resampled to 1 mm per pixel, a 30 mm square at 1.5 mm (20 pixels) covers 30 pixels, centred as
    it was; its classes keep their sizes, the image its values; a crop that cuts a class counts it."""
    from coral_core.data import at_pixel_spacing

    image = np.zeros((2, 60, 40), np.float32)  # 90 x 60 mm at 1.5 mm
    labels = np.zeros((2, 60, 40), np.uint8)
    labels[:, 20:40, 10:30] = 1  # 30 x 30 mm, centred
    labels[:, 28:32, 18:22] = 2  # 6 x 6 mm inside it
    image[labels == 1], image[labels == 2] = 1.0, 2.0
    image[:, 0, 0] = -1.0  # the lowest value: what padding fills with
    out, lab, spacing, cut = at_pixel_spacing(image, (8.0, 1.5, 1.5), 1.0, 100, labels)
    assert out.shape == lab.shape == (2, 100, 100) and out.dtype == np.float32 and lab.dtype == np.uint8
    assert spacing == (8.0, 1.0, 1.0) and cut == 0
    # 90 x 60 pixels padded to 100 x 100: 5 rows and 20 columns before; the square at rows 30-60, columns 15-45
    rows, cols = np.nonzero(lab[0] > 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5 + 30, 5 + 59, 20 + 15, 20 + 44)
    assert np.count_nonzero(lab[0] == 2) == 36  # 6 x 6 mm
    assert out[0, 0, 0] == -1.0 and out[0, 50, 50] == 2.0 and np.isclose(out[0, 40, 40], 1.0)
    # already at 1.5 mm: a centred crop to 40 x 40, the values untouched; cutting the square is counted
    out, lab, _, cut = at_pixel_spacing(image, (8.0, 1.5, 1.5), 1.5, 40, labels)
    assert np.array_equal(out, image[:, 10:50]) and np.array_equal(lab, labels[:, 10:50]) and cut == 0
    _, lab, _, cut = at_pixel_spacing(image, (8.0, 1.5, 1.5), 1.5, 16, labels)
    assert cut == np.count_nonzero(labels) - np.count_nonzero(lab) > 0
    assert np.array_equal(lab, labels[:, 22:38, 12:28])
    out, none, _, cut = at_pixel_spacing(image, (8.0, 1.5, 3.0), 1.5, 80)  # anisotropic: columns doubled
    assert none is None and cut == 0 and np.count_nonzero(out[0] == 1.0) > 0
    assert np.count_nonzero(out[0] >= 0.99) == pytest.approx(2 * np.count_nonzero(image[0] >= 0.99), rel=0.1)


def test_a_spacing_a_model_cannot_see_at_is_refused_before_any_memory_is_asked_for():
    """Metres or microns written as millimetres: a model at 1.5 mm on pixels of 0.001 mm asked NumPy for 34 GiB to pad
    a 24 x 20 slice to its 48000-pixel square, and pixels of 1000 mm were segmented in 480 windows of one pixel each.
    Refused in one sentence, by the field of view and by the resampling to the model's millimetres alike; the limits
    themselves pass."""
    from coral_core.data import MAX_COARSER, MAX_FINER, FieldOfView, at_pixel_spacing, check_scale
    from coral_core.errors import ScaleError

    image = np.zeros((2, 24, 20), np.float32)
    for spacing, fragment in (((3.0, 0.001, 0.001), "its pixels of 0.001 x 0.001 mm are 1.5e+03 times finer than "
                                                    "the model's 1.5 mm (at most 32 times finer or 8 times coarser)"),
                              ((3.0, 1.0, 1000.0), "its pixels of 1 x 1000 mm are 667 times coarser"),
                              ((3.0, float("nan"), 1.0), "its pixel spacing nan x 1 mm is not a size"),
                              ((3.0, 1.0, 0.0), "its pixel spacing 1 x 0 mm is not a size")):
        for call in (lambda: FieldOfView.of(image.shape[1:], spacing[1:], 1.5, 32),
                     lambda: at_pixel_spacing(image, spacing, 1.5, 32)):
            with pytest.raises(ScaleError, match=re.escape(fragment)):
                call()
    check_scale((1.5 / MAX_FINER, 1.5 / MAX_FINER), 1.5)
    check_scale((1.5 * MAX_COARSER, 1.5), 1.5)
    assert FieldOfView.of((24, 20), (1.5 * MAX_COARSER, 1.5 * MAX_COARSER), 1.5, 32).window == (4, 4)
    with pytest.raises(ScaleError, match="times coarser"):
        check_scale((1.5 * MAX_COARSER * 1.01, 1.5), 1.5)


def test_field_of_view_cuts_pads_and_puts_back_the_centred_square():
    from coral_core.data import FieldOfView, field_of_view
    from coral_core.model import UNetConfig

    # a 64-pixel model at 2 mm sees 128 mm: 128 rows of 1 mm, 64 columns of 2 mm
    fov = FieldOfView.of((100, 70), (1.0, 2.0), 2.0, 64)
    assert fov.window == (128, 64) and not fov.whole
    image = np.arange(3 * 100 * 70, dtype=np.float32).reshape(3, 100, 70) + 5
    window = fov.crop(image)
    assert window.shape == (3, 128, 64)
    # rows: padded by 14 above and below with the lowest value; columns: 3 cut on each side
    np.testing.assert_array_equal(window[:, 14:114], image[:, :, 3:67])
    assert (window[:, :14] == 5).all() and (window[:, 114:] == 5).all()
    labels = np.zeros((3, 100, 70), np.uint8)
    labels[1, 40:60, 30:40] = 2
    labels[2, 10, 1] = 1  # outside the window's columns
    assert fov.outside(labels) == 1
    back = fov.paste(fov.crop(labels, 0))
    assert back.shape == labels.shape and back[2, 10, 1] == 0
    labels[2, 10, 1] = 0
    np.testing.assert_array_equal(back, labels)
    # a model without a physical scale, or a scan of unknown spacing, sees each slice whole
    assert field_of_view(UNetConfig(image_size=64), (100, 70), (1.0, 2.0)) is None
    assert field_of_view(UNetConfig(image_size=64, pixel_spacing=2.0), (100, 70), None) is None
    same = field_of_view(UNetConfig(image_size=64, pixel_spacing=2.0), (5, 64, 64), (8.0, 2.0, 2.0))
    assert same.whole and same.crop(image) is image
    with pytest.raises(ValueError):
        UNetConfig(pixel_spacing=0)
    assert "pixel_spacing" not in UNetConfig().to_dict()  # stored as before when unset



def test_field_of_view_tiles_cover_the_slice_and_follow_the_labels():
    from coral_core.data import FieldOfView, tiling_note, windows_per_slice
    from coral_core.model import UNetConfig

    # 100 x 250 pixels of 1 mm, a 40-pixel model at 1 mm: rows 30 + 40 + 30, columns 105 + 40 + 105
    fov = FieldOfView.of((100, 250), (1.0, 1.0), 1.0, 40)
    assert fov.origin == (30, 105) and not fov.covers
    tiles = fov.tiles()
    rows = sorted({t.origin[0] for t in tiles})
    cols = sorted({t.origin[1] for t in tiles})
    # stepped out from the centred window by half a side, the last ones flush with the edges
    assert rows == [0, 10, 30, 50, 60] and cols == [0, 5, 25, 45, 65, 85, 105, 125, 145, 165, 185, 205, 210]
    assert fov.origin in [t.origin for t in tiles] and len(tiles) == len(rows) * len(cols)
    covered = np.zeros((100, 250), int)
    for t in tiles:
        assert t.window == (40, 40) and t.covers is False
        covered += t.paste(np.ones((40, 40), int))
    assert covered.min() >= 1
    # along an axis where the slice is the smaller, the one window pads it
    narrow = FieldOfView.of((30, 250), (1.0, 1.0), 1.0, 40)
    assert {t.origin[0] for t in narrow.tiles()} == {-5}
    assert FieldOfView.of((30, 36), (1.0, 1.0), 1.0, 40).tiles() == [FieldOfView((30, 36), (40, 40))]
    # a window placed on the labels: unchanged when it holds them all, else where it holds the most (of
    # those places, the nearest to centring them), within the slice
    labels = np.zeros((3, 100, 250), np.uint8)
    labels[1, 40:60, 110:140] = 1
    assert fov.around(labels) is fov
    labels[1:, 5:15, 20:30] = 2  # 200 voxels further than a window from the 600 above
    moved = fov.around(labels)
    assert moved.origin == (20, 100) and moved.outside(labels) == 200
    labels[1] = 0
    moved = fov.around(labels)
    assert moved.origin == (0, 5) and moved.outside(labels) == 0
    np.testing.assert_array_equal(moved.paste(moved.crop(labels, 0)), labels)
    # how a model describes it
    config = UNetConfig(image_size=32, pixel_spacing=1.25)  # 40 mm too
    assert windows_per_slice(config, (7, 100, 250), (3.0, 1.0, 1.0)) == 65
    assert windows_per_slice(config, (7, 30, 36), (3.0, 1.0, 1.0)) == 1
    assert windows_per_slice(UNetConfig(image_size=32), (7, 100, 250), (3.0, 1.0, 1.0)) == 1
    assert tiling_note(config, (7, 100, 250), (3.0, 1.0, 1.0)) == (
        "each 100 x 250 mm slice was segmented in 65 overlapping windows of the 40 mm square the model sees")
    assert tiling_note(config, (7, 30, 36), (3.0, 1.0, 1.0)) == ""


def test_a_physical_scale_model_finds_anatomy_anywhere_in_a_wider_slice():
    """The bundled model given the phantoms' scale (128 pixels of 1.8 mm) segments a phantom pasted off
    the centre of a wider scan (background drawn from its corners) in overlapping windows: the phantom's
    labels as when it is segmented alone, nothing elsewhere."""
    import dataclasses

    from coral_core.checkpoint import bundled_model_path, load_checkpoint
    from coral_core.infer import segment_volume
    from coral_core.phantom import make_phantom

    model, _ = load_checkpoint(bundled_model_path())
    model.config = dataclasses.replace(model.config, pixel_spacing=1.8 * 128 / model.config.image_size)
    image, _ = make_phantom(2003, n_slices=6)
    spacing = (10.0, 1.8, 1.8)
    alone = segment_volume(model, image.array, spacing=spacing)
    assert alone.any()
    rng = np.random.default_rng(0)
    for top, left, h, w in ((0, 0, 256, 256), (120, 10, 256, 200)):
        scan = rng.choice(image.array[:, :8, :8].ravel(), size=(6, h, w)).astype(np.float32)
        scan[:, top : top + 128, left : left + 128] = image.array
        labels = segment_volume(model, scan, spacing=spacing)
        assert (labels[:, top : top + 128, left : left + 128] == alone).mean() > 0.99
        labels[:, top : top + 128, left : left + 128] = 0
        assert not labels.any()


def test_slice_lists_and_ranges_are_checked_before_they_are_listed():
    assert parse_slices("0, 2-4,4", 8) == [0, 2, 3, 4]
    with pytest.raises(UserError, match=r"the range 5-2 runs backwards; write it low to high, 2-5"):
        parse_slices("5-2", 8)
    with pytest.raises(UserError, match=r"slices \[99999999999\]: outside the 8 slices \(0..7\) of scan"):
        parse_slices("1-99999999999", 8, "scan")  # was listed first: 800 GB of numbers, then the check
    with pytest.raises(UserError, match=r"slices \[8\]: outside"):
        parse_slices("3-8", 8)
