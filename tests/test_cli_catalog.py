"""The bad-input catalog through the `coral` command (docs/reliability.md lists it).

Every case ends in a sound result or exit status 2 with one `error:` sentence and no
traceback; none leaves a partial output file behind.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from coral_core.phantom import make_phantom
from coral_core.volume import load_volume, save_volume
from helpers import write_dicom_seg, write_nifti_ijk
from test_cli import coral, user_error


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalog")
    img, lab = make_phantom(21, n_slices=6)
    save_volume(d / "img.nii.gz", img.array, img.affine)
    save_volume(d / "lab.nii.gz", lab.array, lab.affine)
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "text.nii.gz").write_text("patient notes, not an image")
    raw = (d / "img.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    write_nifti_ijk(d / "cine.nii.gz", np.random.rand(32, 32, 4, 5).astype(np.float32), img.affine)
    write_nifti_ijk(d / "flat.nii.gz", img.array[2].T.copy(), img.affine)  # a 2-D image
    write_nifti_ijk(d / "one.nii.gz", img.array[2:3].transpose(2, 1, 0).copy(), img.affine)  # a single slice
    odd = img.array.copy()
    odd[0, :4, :4] = np.nan
    odd[1, :4, :4] = np.inf
    odd[2, :4, :4] = -np.inf
    save_volume(d / "nan.nii.gz", odd, img.affine)
    save_volume(d / "constant.nii.gz", np.full(img.shape, 5.0, np.float32), img.affine)
    save_volume(d / "lab_small.nii.gz", lab.array[:, :64], lab.affine)
    write_nifti_ijk(d / "complex.nii.gz", np.ones((32, 32, 4), np.complex64), img.affine)  # raw MRI, not magnitude
    write_nifti_ijk(d / "blank.nii.gz", np.full((32, 32, 4), np.nan, np.float32), img.affine)
    write_dicom_seg(d / "seg.dcm", lab.array, img.affine, ["RV", "myocardium", "LV"])  # a segmentation, as a scan
    save_volume(d / "img.mha", img.array, img.affine)
    raw = (d / "img.mha").read_bytes()
    (d / "cut.mha").write_bytes(raw[: len(raw) // 2])  # an interrupted copy (ITK printed MetaImage's complaint too)
    (d / "text.nrrd").write_text("patient notes, not an image")
    return d


def _no_partial_files(folder) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.startswith("out")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    "name, words",
    [
        ("missing.nii.gz", ["missing.nii.gz", "no such file"]),
        ("empty.nii.gz", ["empty.nii.gz", "empty"]),
        ("text.nii.gz", ["text.nii.gz", "not a readable NIfTI"]),
        ("truncated.nii.gz", ["truncated.nii.gz", "not a readable NIfTI"]),
        ("cut.mha", ["cut.mha: file is truncated (holds", "re-export"]),
        ("text.nrrd", ["text.nrrd: not a readable volume (no image format that SimpleITK reads recognises"]),
        ("cine.nii.gz", ["cine.nii.gz", "4-D series with 5 frames"]),
        ("complex.nii.gz", ["complex.nii.gz", "complex numbers", "save their magnitude"]),
        ("blank.nii.gz", ["blank.nii.gz", "every voxel is NaN or infinite"]),
        ("seg.dcm", ["seg.dcm", "is a DICOM SEG segmentation, not an image", "NIfTI, MHA or NRRD label map"]),
    ],
)
def test_unreadable_inputs_exit_2_with_one_sentence(files, tmp_path, name, words):
    if name == "cine.nii.gz":  # segment takes a cine series frame by frame; embed takes 3-D volumes
        user_error(coral("embed", files / name, "--out", tmp_path / "out.csv", check=False), *words)
    else:
        user_error(coral("segment", files / name, "--out", tmp_path / "out.nii.gz", check=False), *words)
    _no_partial_files(tmp_path)


@pytest.mark.parametrize("name", ["flat.nii.gz", "one.nii.gz", "nan.nii.gz", "constant.nii.gz"])
def test_odd_but_valid_inputs_segment_to_the_input_shape(files, tmp_path, name):
    res = json.loads(coral("segment", files / name, "--out", tmp_path / "out.nii.gz", "--json").stdout)
    image = load_volume(files / name)
    labels = load_volume(tmp_path / "out.nii.gz")
    assert res["shape"] == list(image.shape) == list(labels.shape)
    assert np.allclose(labels.affine, image.affine, atol=1e-5)
    if name == "constant.nii.gz":  # nothing to see: nothing found
        assert not labels.array.any()


def test_nan_and_constant_images_train_without_nan_losses(files, tmp_path):
    for name in ("nan.nii.gz", "constant.nii.gz"):
        res = json.loads(coral("finetune", files / name, "--labels", files / "lab.nii.gz", "--steps", 3,
                               "--batch-size", 2, "--base-filters", 4, "--image-size", 32,
                               "--out", tmp_path / f"{name}.safetensors", "--json").stdout)
        assert np.isfinite(res["final_loss"]), name


def test_label_problems_exit_2_with_one_sentence(files, tmp_path):
    user_error(coral("finetune", files / "img.nii.gz", "--labels", files / "lab_small.nii.gz",
                     "--out", tmp_path / "out.safetensors", check=False), "lab_small.nii.gz", "do not match")
    user_error(coral("finetune", files / "img.nii.gz", "--labels", files / "lab.nii.gz", "--classes", 3,
                     "--out", tmp_path / "out.safetensors", check=False), "holds label 3 but --classes is 3")
    # a model of one class would have nothing to segment (this said "only background is labelled" of labels 1-3)
    user_error(coral("finetune", files / "img.nii.gz", "--labels", files / "lab.nii.gz", "--classes", 1,
                     "--out", tmp_path / "out.safetensors", check=False), "--classes", "at least 2")
    user_error(coral("finetune", files / "img.nii.gz", "--labels", files / "img.nii.gz",
                     "--out", tmp_path / "out.safetensors", check=False), "img.nii.gz", "not a label map")
    _no_partial_files(tmp_path)


def test_output_folder_missing_or_not_writable(files, tmp_path):
    user_error(coral("segment", files / "img.nii.gz", "--out", tmp_path / "no" / "out.nii.gz", check=False),
               "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway; the check needs an ordinary user
            user_error(coral("segment", files / "img.nii.gz", "--out", locked / "out.nii.gz", check=False),
                       "not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_unknown_options_and_commands(files, tmp_path):
    user_error(coral("segment", files / "img.nii.gz", "--out", tmp_path / "out.nii.gz", "--fast", check=False),
               "unrecognized arguments: --fast")
    user_error(coral("segmnet", check=False), "invalid choice")
    user_error(coral("pretrain", "--phantom", 2, "--method", "byol", "--out", tmp_path / "out.safetensors", check=False),
               "invalid choice: 'byol'")
