"""The `coral` command as a user runs it: a subprocess, on small files."""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import coral_core
from coral_core.cli import FINETUNE_BASE_FILTERS
from coral_core.lowlabel import sign_test_p
from coral_core.model import UNetConfig
from coral_core.phantom import make_phantom
from coral_core.volume import frame_count, load_frames, load_volume, read_class_names, save_volume
from helpers import oblique_affine

TINY = ["--base-filters", "4", "--image-size", "32"]


def coral(*args, cwd=None, check=True, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "coral_core.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"coral {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def user_error(proc, *fragments):
    """Exit status 2, exactly one `error:` line naming the problem, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A phantom written as NIfTI with an oblique, anisotropic, non-square geometry."""
    d = tmp_path_factory.mktemp("subject")
    img, lab = make_phantom(11, n_slices=8)
    img_arr = img.array[:, :, 10:110]  # 128 x 100 slices: not square
    lab_arr = lab.array[:, :, 10:110]
    affine = oblique_affine((1.8, 1.8, 10.0))
    save_volume(d / "img.nii.gz", img_arr, affine)
    save_volume(d / "lab.nii.gz", lab_arr, affine)
    return d


@pytest.fixture(scope="module")
def workflow(subject):
    """pretrain -> finetune -> segment on the subject, through the CLI."""
    d = subject
    pre = coral("pretrain", d / "img.nii.gz", "--phantom", 2, "--epochs", 1, "--batch-size", 8, *TINY,
                "--out", d / "pre.safetensors", "--json", "--device", "cpu")
    ft = coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--slices", "1,4,6",
               "--init", d / "pre.safetensors", "--steps", 5, "--batch-size", 2, "--out", d / "ft.safetensors", "--json")
    seg = coral("segment", d / "img.nii.gz", "--model", d / "ft.safetensors", "--out", d / "seg.nii.gz", "--json")
    return d, json.loads(pre.stdout), json.loads(ft.stdout), json.loads(seg.stdout)


def test_pretrain_counts_its_steps_and_says_when_they_are_few(tmp_path):
    import re

    from coral_core.pretrain import SUGGESTED_STEPS, budget_advice, pretraining_steps

    vol = make_phantom(0, n_slices=9)[0].array
    save_volume(tmp_path / "a.nii.gz", vol, np.eye(4))
    text = coral("pretrain", tmp_path / "a.nii.gz", "--epochs", 3, "--batch-size", 4, *TINY,
                 "--out", tmp_path / "p.safetensors").stdout
    steps = pretraining_steps(9, 4, 3)
    assert steps == 6  # 9 slices // 4 a step, 3 epochs
    assert "pretrained coral on 1 volume, 6 steps in" in text, text
    per_epoch = steps // 3
    assert re.search(rf"6 steps is a quick look: .* about {SUGGESTED_STEPS} steps \(--epochs {-(-SUGGESTED_STEPS // per_epoch)} here", text), text
    ran = coral("pretrain", tmp_path / "a.nii.gz", "--epochs", 3, "--batch-size", 4, *TINY,
                "--out", tmp_path / "p.safetensors", "--json")
    assert json.loads(ran.stdout)["steps"] == steps  # the count said is the count run
    assert budget_advice(9, 4, 250) == "" and "--epochs 250 here" in budget_advice(9, 4, 249)  # 500 steps are enough
    assert pretraining_steps(3, 32, 5) == 5  # a batch larger than the slices takes them all, a step an epoch


def test_help_lists_every_command_and_each_has_help():
    out = coral("--help").stdout
    for name in ("pretrain", "finetune", "segment", "embed", "evaluate", "info", "demo", "bench"):
        assert name in out
    for command in ("pretrain", "finetune", "segment", "embed", "evaluate", "info", "demo", "bench lowlabel",
                    "bench embedding", "bench speed"):
        assert "--device" in coral(*command.split(), "--help").stdout
    # and every option of every command says what it does (argparse leaves a bare option without a line)
    from coral_core.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):
                    yield from parsers(sub)

    silent = [f"{parser.prog} {action.option_strings[0]}" for parser in parsers(build_parser())
              for action in parser._actions if action.option_strings and not action.help]
    assert silent == [], silent


def test_output_into_a_pipe_closed_early_ends_quietly(workflow):
    """`coral evaluate ... | head -1`: the reader closes the pipe before the table is written; the command ends
    without a traceback, with a shell's status for a closed pipe (141), as shell tools do (it printed a
    BrokenPipeError traceback). `--help` ends quietly too, with status 0."""
    d = workflow[0]
    for args, status in ((("evaluate", d / "seg.nii.gz", d / "lab.nii.gz"), 141), (("--help",), 0)):
        read_end, write_end = os.pipe()
        os.close(read_end)  # closed before the command starts: its first write finds no reader
        try:
            proc = subprocess.run([sys.executable, "-m", "coral_core.cli", *map(str, args)], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write_end)
        assert proc.returncode == status and proc.stderr == "", proc.stderr


def test_workflow_writes_labels_with_the_input_geometry(workflow):
    d, pre, ft, seg = workflow
    assert pre["volumes"] == 3 and pre["steps"] >= 1 and np.isfinite(pre["final_loss"])
    assert ft["slices"] == [1, 4, 6] and ft["init"].endswith("pre.safetensors")
    src, out = load_volume(d / "img.nii.gz"), load_volume(d / "seg.nii.gz")
    assert out.shape == src.shape == (8, 128, 100)
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    assert seg["shape"] == [8, 128, 100] and set(np.unique(out.array)) <= {0, 1, 2, 3}


def test_evaluate_reports_dice_and_hd95(workflow):
    d = workflow[0]
    res = json.loads(coral("evaluate", d / "lab.nii.gz", d / "lab.nii.gz", "--json").stdout)
    assert res["mean_dice"] == 1.0 and res["mean_hd95"] == 0.0
    text = coral("evaluate", d / "seg.nii.gz", d / "lab.nii.gz").stdout
    assert "Dice" in text and "mean" in text
    empty = d / "empty_seg.nii.gz"
    save_volume(empty, np.zeros(load_volume(d / "lab.nii.gz").shape, np.uint8), load_volume(d / "lab.nii.gz").affine)
    strict = json.loads(coral("evaluate", empty, d / "lab.nii.gz", "--json").stdout, parse_constant=lambda c: 1 / 0)
    assert strict["hd95"]["1"] is None and strict["dice"]["1"] == 0.0  # no NaN/Infinity in the JSON
    named = coral("evaluate", d / "seg.nii.gz", d / "lab.nii.gz", "--class-names", "RV,myocardium,LV,extra").stdout
    rows = {line.split()[0]: line.split()[1] for line in named.splitlines()[1:]}
    assert {"RV", "myocardium", "LV", "extra"} <= set(rows) and rows["extra"] == "nan"  # named, in neither file
    # seg.nii.gz carries its model's class names (fine-tuned without --class-names: "class 1", ...); a copy without
    # them, and labels of any other program, are scored by number
    assert read_class_names(d / "seg.nii.gz") == ["background", "class 1", "class 2", "class 3"]
    assert list(json.loads(coral("evaluate", d / "seg.nii.gz", d / "lab.nii.gz", "--json").stdout)["dice"]) == [
        "class 1", "class 2", "class 3"]
    seg = load_volume(d / "seg.nii.gz")
    save_volume(d / "seg_plain.nii.gz", seg.array, seg.affine)
    numbered = json.loads(coral("evaluate", d / "seg_plain.nii.gz", d / "lab.nii.gz", "--json").stdout)
    assert float(rows["myocardium"]) == round(numbered["dice"]["2"], 3)  # the same scores under their names
    user_error(coral("evaluate", d / "seg.nii.gz", d / "lab.nii.gz", "--class-names", "RV", check=False),
               "holds label 3", "names 1 foreground class")


def test_segment_can_keep_each_class_largest_component(tmp_path):
    """A second heart pasted into a corner of one slice is labelled, an island; --largest-component makes it
    background, as keep_largest_components does to the plain segmentation, and counts the voxels."""
    from coral_core.infer import keep_largest_components

    img, lab = make_phantom(2026)
    data = img.array.copy()
    ys, xs = np.nonzero(lab.array[2])
    patch = data[2, ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()
    data[2, :patch.shape[0], -patch.shape[1]:] = patch
    save_volume(tmp_path / "two.nii.gz", data, img.affine)
    coral("segment", tmp_path / "two.nii.gz", "--out", tmp_path / "all.nii.gz")
    proc = coral("segment", tmp_path / "two.nii.gz", "--out", tmp_path / "kept.nii.gz", "--largest-component")
    kept, removed = keep_largest_components(load_volume(tmp_path / "all.nii.gz").array)
    assert removed > 100
    np.testing.assert_array_equal(load_volume(tmp_path / "kept.nii.gz").array, kept)
    assert f"; {removed} voxels of smaller pieces made background" in proc.stdout
    res = json.loads(coral("segment", tmp_path / "two.nii.gz", "--out-dir", tmp_path / "many", "--largest-component",
                           "--json").stdout)
    assert res["volumes"][0]["removed_voxels"] == removed


def test_evaluate_a_folder_of_predictions_against_the_dataset_it_segmented(tmp_path):
    """`coral segment DATASET --out-dir P` then `coral evaluate P DATASET`: each prediction scored against its case's
    labels as `coral evaluate` scores the pair alone, the summary over the cases, and the files left unscored named."""
    import shutil

    data = tmp_path / "Task01"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for i in range(3):  # nnU-Net's naming: case_0000 the image, case the labels; c2 has none
        img, lab = make_phantom(40 + i, n_slices=5)
        save_volume(data / "imagesTr" / f"c{i}_0000.nii.gz", img.array, img.affine)
        if i < 2:
            save_volume(data / "labelsTr" / f"c{i}.nii.gz", lab.array, lab.affine)
    preds = tmp_path / "preds"
    coral("segment", data, "--out-dir", preds)
    missed = load_volume(preds / "c1_0000_labels.nii.gz")  # c1's RV left out: its HD95 is infinite
    save_volume(preds / "c1_0000_labels.nii.gz", np.where(missed.array == 1, 0, missed.array).astype(np.uint8),
                missed.affine, ["background", "RV", "myocardium", "LV"])
    res = json.loads(coral("evaluate", preds, data, "--json").stdout)
    assert [(c["name"], Path(c["truth"]).name) for c in res["cases"]] == [("c0_0000", "c0.nii.gz"), ("c1_0000", "c1.nii.gz")]
    assert [Path(p).name for p in res["unmatched_predictions"]] == ["c2_0000_labels.nii.gz"]
    assert res["missing_predictions"] == []
    for case in res["cases"]:
        alone = json.loads(coral("evaluate", case["pred"], case["truth"], "--json").stdout)
        assert case["dice"] == alone["dice"] and case["mean_dice"] == alone["mean_dice"]
    assert res["mean_dice"] == pytest.approx(np.mean([c["mean_dice"] for c in res["cases"]]))
    assert res["dice"]["LV"] == pytest.approx(np.mean([c["dice"]["LV"] for c in res["cases"]]))
    assert res["hd95_missed"] == {"RV": 1, "myocardium": 0, "LV": 0}
    assert res["hd95"]["RV"] == res["cases"][0]["hd95"]["RV"]  # the finite one alone
    text = coral("evaluate", preds, data).stdout
    assert "c0_0000" in text and "2 cases" in text and "HD95 leaves out 1 case-class pair" in text
    assert "not scored: 1 prediction(s) without reference labels (c2_0000_labels.nii.gz)" in text
    # a folder of label files alone (named as the images were, with a _gt ending) serves as the reference too
    (tmp_path / "truth").mkdir()
    for i in range(2):
        shutil.copy(data / "labelsTr" / f"c{i}.nii.gz", tmp_path / "truth" / f"c{i}_0000_gt.nii.gz")
    (preds / "c0_0000_labels.nii.gz").unlink()
    alone = json.loads(coral("evaluate", preds, tmp_path / "truth", "--json").stdout)
    assert [c["name"] for c in alone["cases"]] == ["c1_0000"] and alone["cases"][0]["dice"] == res["cases"][1]["dice"]
    assert [Path(p).name for p in alone["missing_predictions"]] == ["c0_0000_gt.nii.gz"]
    # mistakes: images given as the predictions, the folders swapped, a folder against a file, files matching no case
    user_error(coral("evaluate", data / "imagesTr", preds, check=False), "c1_0000.nii.gz", "an image, not a label map")
    (tmp_path / "other").mkdir()
    shutil.copy(preds / "c1_0000_labels.nii.gz", tmp_path / "other" / "d9_labels.nii.gz")
    user_error(coral("evaluate", tmp_path / "other", data, check=False), "other: its 1 label file matching none of")
    user_error(coral("evaluate", data, preds, check=False), "a dataset folder", "predictions first")
    user_error(coral("evaluate", preds, data / "labelsTr" / "c0.nii.gz", check=False), "a file, but PRED")
    user_error(coral("evaluate", preds / "c1_0000_labels.nii.gz", data, check=False), "a folder, but PRED")


def test_info_describes_each_model_and_how_it_was_trained(workflow, tmp_path):
    """`coral info` on models and folders of them: classes, architecture, storage and a sentence of the training
    record, the numbers in --json equal to the model's own; a damaged file in a folder is named, not fatal, and
    one given by name exits 2 in one sentence."""
    import shutil

    from coral_core import __version__
    from coral_core.checkpoint import bundled_model_path, load_checkpoint

    d = workflow[0]
    res = json.loads(coral("info", d / "pre.safetensors", d / "ft.safetensors", bundled_model_path(), "--json").stdout)
    pre, ft, demo = res["models"]
    assert pre["trained"] == "coral pretraining for 1 epoch on 3 volumes" and pre["pretrained_only"]
    assert ft["trained"] == "fine-tuned for 5 steps on 3 slices of img.nii.gz, from pre.safetensors"
    assert not ft["pretrained_only"] and ft["training"]["slices"] == [1, 4, 6]
    assert demo["trained"] == ("fine-tuned for 200 steps on 2 subjects by coral demo, from coral pretraining for 6 "
                               "epochs on 18 subjects")
    model, _ = load_checkpoint(d / "ft.safetensors")
    assert ft["parameters"] == sum(t.numel() for t in model.parameters())
    assert ft["classes"] == ["class 1", "class 2", "class 3"] and ft["architecture"]["base_filters"] == 4
    assert ft["weights"] == "float32" and demo["weights"] == "float16"  # the bundled model is stored in half
    assert ft["software"] == {"napari_coral": __version__} and demo["software"] is None  # saved before it was recorded
    text = coral("info", d / "pre.safetensors").stdout
    assert "pre.safetensors: coral pretraining for 1 epoch on 3 volumes" in text
    assert "U-Net: 4 base filters, depth 4, batch norm" in text and "32 px input, each slice resized whole" in text
    assert "pretrained only: its segmentation head is untrained; fine-tune it before segmenting" in text
    assert "  classes: none yet\n" in text  # not the architecture's placeholder names
    # a folder (as the plugin's ~/.napari-coral/models): every model in it, a damaged one named
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(d / "ft.safetensors", models / "a.safetensors")
    (models / "b.safetensors").write_bytes((d / "ft.safetensors").read_bytes()[:5000])
    (models / "notes.txt").write_text("not a model")
    res = json.loads(coral("info", models, "--json").stdout)
    assert [Path(m["path"]).name for m in res["models"]] == ["a.safetensors"]
    assert [Path(m["path"]).name for m in res["unreadable"]] == ["b.safetensors"]
    assert "b.safetensors: not read (" in coral("info", models).stdout
    user_error(coral("info", models / "b.safetensors", check=False), "b.safetensors")
    user_error(coral("info", models / "notes.txt", check=False), "notes.txt: not a model file")
    user_error(coral("info", d / "img.nii.gz", check=False), "img.nii.gz: this is a NIfTI image, not a model")
    user_error(coral("info", tmp_path / "none.safetensors", check=False), "none.safetensors: no such checkpoint file")
    (tmp_path / "empty").mkdir()
    user_error(coral("info", tmp_path / "empty", check=False), "empty: folder holds no .safetensors or .pth model")
    # where one model is expected, a folder is named as one, with the models in it
    user_error(coral("segment", d / "img.nii.gz", "--model", models, "--out", tmp_path / "s.nii.gz", check=False),
               "models: is a folder, not a model (it holds a.safetensors, b.safetensors); give the model's .safetensors")


def test_finetune_repeats_with_the_same_seed(workflow, tmp_path):
    """The head a pretrained encoder gets, and a random-init model, are drawn from the run's seed: two runs of the
    same command write the same weights (they used to differ, each process seeding torch at random)."""
    from coral_core.checkpoint import load_checkpoint

    d = workflow[0]
    common = [d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--slices", "1,4,6", "--steps", 3, "--batch-size", 2]
    for name, extra in (("init", ["--init", d / "pre.safetensors"]), ("random", TINY)):
        weights = []
        for run in (1, 2):
            coral("finetune", *common, *extra, "--out", tmp_path / f"{name}{run}.safetensors")
            model, meta = load_checkpoint(tmp_path / f"{name}{run}.safetensors")
            weights.append(model.state_dict())
        for key, value in weights[0].items():
            assert torch.equal(value, weights[1][key]), (name, key)
    coral("finetune", *common, *TINY, "--seed", 1, "--out", tmp_path / "other.safetensors")
    other = load_checkpoint(tmp_path / "other.safetensors")[0].state_dict()
    assert not all(torch.equal(v, other[k]) for k, v in weights[0].items())  # another seed, other weights


def test_segment_many_volumes_into_a_folder(workflow, tmp_path):
    """--out-dir: every volume of the inputs (files and folders) segmented in one run, each as NAME_labels in
    its input's format, equal to segmenting it alone; mistakes are one sentence, before any work or naming what
    was written."""
    d = workflow[0]
    scans = tmp_path / "scans"
    scans.mkdir()
    src = load_volume(d / "img.nii.gz")
    save_volume(scans / "a.nii.gz", src.array, src.affine)
    save_volume(scans / "b.mha", src.array[::-1].copy(), src.affine)
    res = json.loads(coral("segment", scans, d / "img.nii.gz", "--model", d / "ft.safetensors", "--out-dir",
                           tmp_path / "out" / "labels", "--json").stdout)  # the folder is created
    out = tmp_path / "out" / "labels"
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.nii.gz", "b_labels.mha", "img_labels.nii.gz"]
    assert [v["image"] for v in res["volumes"]] == [str(scans / "a.nii.gz"), str(scans / "b.mha"), str(d / "img.nii.gz")]
    alone = load_volume(d / "seg.nii.gz")  # the workflow's `coral segment img --out seg`
    for name in ("a_labels.nii.gz", "img_labels.nii.gz"):
        got = load_volume(out / name)
        np.testing.assert_array_equal(got.array, alone.array)
        np.testing.assert_allclose(got.affine, alone.affine, atol=1e-4)
    np.testing.assert_array_equal(load_volume(out / "b_labels.mha").array.shape, alone.shape)
    acdc = tmp_path / "acdc" / "patient001"  # an ACDC patient's two frames: one file each, named by frame
    acdc.mkdir(parents=True)
    for frame in ("01", "12"):
        save_volume(acdc / f"patient001_frame{frame}.nii.gz", src.array, src.affine)
        save_volume(acdc / f"patient001_frame{frame}_gt.nii.gz", load_volume(d / "lab.nii.gz").array, src.affine)
    coral("segment", tmp_path / "acdc", "--model", d / "ft.safetensors", "--out-dir", tmp_path / "acdc_labels")
    assert sorted(p.name for p in (tmp_path / "acdc_labels").iterdir()) == [
        "patient001_frame01_labels.nii.gz", "patient001_frame12_labels.nii.gz"]
    import SimpleITK as sitk  # a multi-frame DICOM file (with or without .dcm): its labels as NIfTI

    sitk.WriteImage(sitk.GetImageFromArray(np.clip(src.array, 0, None).astype(np.uint16)), str(tmp_path / "mf.dcm"))
    (tmp_path / "mf.dcm").rename(tmp_path / "IM0002")
    coral("segment", tmp_path / "IM0002", "--model", d / "ft.safetensors", "--out-dir", tmp_path / "dicom_labels")
    assert load_volume(tmp_path / "dicom_labels" / "IM0002_labels.nii.gz").shape == src.shape
    from helpers import write_enhanced_dicom  # an enhanced multi-frame cine: labels for each of its phases

    movie = np.stack([src.array, src.array[:, ::-1]]).clip(0, 2000)
    write_enhanced_dicom(tmp_path / "IM0003", movie, src.affine)
    coral("segment", tmp_path / "IM0003", "--model", d / "ft.safetensors", "--out-dir", tmp_path / "dicom_labels")
    labels = load_frames(tmp_path / "dicom_labels" / "IM0003_labels.nii.gz")
    assert [f.shape for f in labels] == [src.shape] * 2
    np.testing.assert_allclose(labels[0].affine, src.affine, atol=1e-3)

    user_error(coral("segment", scans, "--out", tmp_path / "s.nii.gz", check=False), "folder of volumes", "--out-dir")
    user_error(coral("segment", d / "img.nii.gz", scans / "a.nii.gz", "--out", tmp_path / "s.nii.gz", check=False),
               "2 inputs", "--out-dir")
    user_error(coral("segment", d / "img.nii.gz", check=False), "--out LABELS", "--out-dir DIR")
    user_error(coral("segment", scans / "a.nii.gz", scans / ".." / "scans" / "a.nii.gz", "--out-dir", tmp_path / "twice",
                     check=False), "would both be written")
    assert not (tmp_path / "twice").exists()  # refused before anything was made
    (scans / "c.nii.gz").write_text("not a volume")  # read after a and b
    user_error(coral("segment", scans, "--model", d / "ft.safetensors", "--out-dir", tmp_path / "partial", check=False),
               "c.nii.gz", "stopped after segmenting the 2 volumes before it")
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == ["a_labels.nii.gz", "b_labels.mha"]


def test_segment_refuses_a_pretrained_only_model(workflow, tmp_path):
    """A pretrained checkpoint's segmentation head is untrained: segmenting with it would write noise."""
    d = workflow[0]
    user_error(coral("segment", d / "img.nii.gz", "--model", d / "pre.safetensors", "--out", tmp_path / "s.nii.gz",
                     check=False), "pre.safetensors", "untrained", "coral finetune")
    assert not (tmp_path / "s.nii.gz").exists()


def test_embed_writes_table_and_plot(workflow):
    d = workflow[0]
    res = json.loads(coral("embed", d / "img.nii.gz", d / "lab.nii.gz", "--model", d / "pre.safetensors",
                           "--out", d / "emb.csv", "--plot", d / "emb.png", "--json").stdout)
    rows = list(csv.DictReader(open(d / "emb.csv")))
    assert len(rows) == 16 and rows[0]["volume"] == "img" and rows[0]["position"] == "0.125000"
    assert (d / "emb.png").read_bytes()[:4] == b"\x89PNG"
    assert res["axis"] == "coral" and -1 <= res["ordinal_consistency"] <= 1
    folder = d / "embed_folder"  # a folder's volumes, as pretrain and segment read it
    folder.mkdir(exist_ok=True)
    for name in ("img", "lab"):
        (folder / f"{name}.nii.gz").write_bytes((d / f"{name}.nii.gz").read_bytes())
    again = json.loads(coral("embed", folder, "--model", d / "pre.safetensors", "--out", d / "emb2.csv", "--json").stdout)
    assert again["volumes"] == res["volumes"] and (d / "emb2.csv").read_text() == (d / "emb.csv").read_text()


def test_finetune_from_a_pretrained_encoder_names_the_new_classes(workflow):
    from coral_core.checkpoint import load_checkpoint

    d = workflow[0]
    coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--init", d / "pre.safetensors", "--steps", 1,
          "--class-names", "RV,Myo,LV", "--out", d / "named.safetensors")
    model, meta = load_checkpoint(d / "named.safetensors")
    assert model.config.class_names == ["background", "RV", "Myo", "LV"]
    # a CORAL-pretrained init: fine-tuning kept the embedding (and says so), with a unit direction
    assert meta["training"]["embedding_weight"] == 0.1 and meta["training"]["compute"] in ("bf16", "float32")
    assert abs(float(model.canonical_direction.norm()) - 1) < 1e-3
    plain, _ = load_checkpoint(d / "ft.safetensors")  # from the pretrain stage, no names given
    assert plain.config.class_names == ["background", "class 1", "class 2", "class 3"]
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--class-names", "a,b",
                     "--out", d / "bad.safetensors", check=False), "2 names for 4 classes")
    # labels that carry their classes' names (as coral segment and the napari writer save them) name the classes;
    # names that do not fit the labels' classes are left aside
    lab = load_volume(d / "lab.nii.gz")
    for names, expected in ((["background", "RV", "Myo", "LV"], ["background", "RV", "Myo", "LV"]),
                            (["background", "RV"], ["background", "class 1", "class 2", "class 3"])):
        save_volume(d / "lab_named.nrrd", lab.array, lab.affine, names)
        coral("finetune", d / "img.nii.gz", "--labels", d / "lab_named.nrrd", "--init", d / "pre.safetensors",
              "--steps", 1, "--out", d / "from_file.safetensors")
        assert load_checkpoint(d / "from_file.safetensors")[0].config.class_names == expected
    # a fine-tuned model (RV, Myo, LV) fine-tuned on as many classes that the label file names otherwise: its head,
    # under the file's names (it kept its own, so a liver was segmented as "RV")
    save_volume(d / "lab_named.nrrd", lab.array, lab.affine, ["background", "liver", "spleen", "kidney"])
    coral("finetune", d / "img.nii.gz", "--labels", d / "lab_named.nrrd", "--init", d / "named.safetensors",
          "--steps", 1, "--out", d / "renamed.safetensors")
    assert load_checkpoint(d / "renamed.safetensors")[0].config.class_names == ["background", "liver", "spleen", "kidney"]


def test_finetune_from_random_init_uses_the_label_classes(subject):
    d = subject
    res = json.loads(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--steps", 2, *TINY,
                           "--out", d / "rand.safetensors", "--json").stdout)
    assert res["init"] == "random" and len(res["slices"]) == 8
    from coral_core.checkpoint import load_checkpoint

    assert load_checkpoint(d / "rand.safetensors")[1]["training"]["balance_classes"] is False
    coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--steps", 2, *TINY, "--balance-classes",
          "--out", d / "balanced.safetensors")
    assert load_checkpoint(d / "balanced.safetensors")[1]["training"]["balance_classes"] is True
    assert load_checkpoint(d / "balanced.safetensors")[1]["training"]["zoom"] == [0.85, 1.15]  # the default
    assert load_checkpoint(d / "balanced.safetensors")[1]["training"]["shift"] == 0.25  # FINETUNE_TRANSLATE, any model
    coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--steps", 2, *TINY, "--zoom", "0.7,1.4",
          "--out", d / "zoomed.safetensors")
    assert load_checkpoint(d / "zoomed.safetensors")[1]["training"]["zoom"] == [0.7, 1.4]
    assert load_checkpoint(d / "zoomed.safetensors")[1]["training"]["shift"] == 0.25  # a wider zoom keeps the shift
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--zoom", "1.4", "--out",
                     d / "bad.safetensors", check=False), "--zoom", "LOW,HIGH")


def test_finetune_on_several_annotated_images(subject, tmp_path):
    """A few slices in each of two scans (of different shapes): one model from both."""
    from coral_core.checkpoint import load_checkpoint

    d = subject
    img, lab = make_phantom(12, n_slices=6)
    second = lab.array.copy()
    second[second == 3] = 4  # a label only the second scan holds: the classes come from both
    save_volume(tmp_path / "img2.nii.gz", img.array, np.eye(4))
    save_volume(tmp_path / "lab2.nii.gz", second, np.eye(4))
    pair = [d / "img.nii.gz", tmp_path / "img2.nii.gz", "--labels", d / "lab.nii.gz", tmp_path / "lab2.nii.gz"]
    res = json.loads(coral("finetune", *pair, "--slices", "1,4", "--slices", "0-2", "--steps", 2, *TINY,
                           "--out", tmp_path / "two.safetensors", "--json").stdout)
    assert res["slices"] == [[1, 4], [0, 1, 2]] and res["images"] == [str(d / "img.nii.gz"), str(tmp_path / "img2.nii.gz")]
    model, meta = load_checkpoint(tmp_path / "two.safetensors")
    assert model.config.n_classes == 5
    assert meta["training"]["images"] == res["images"] and meta["training"]["slices"] == [[1, 4], [0, 1, 2]]
    text = coral("finetune", *pair, "--steps", 1, *TINY, "--out", tmp_path / "all.safetensors").stdout
    assert f"slices [0, 1, 2, 3, 4, 5] of {tmp_path / 'img2.nii.gz'}" in text  # every slice holding a label
    user_error(coral("finetune", d / "img.nii.gz", tmp_path / "img2.nii.gz", "--labels", d / "lab.nii.gz",
                     "--out", tmp_path / "x.safetensors", check=False), "--labels names 1 file(s) for 2 image(s)")
    user_error(coral("finetune", *pair, "--slices", "1,4", "--out", tmp_path / "x.safetensors", check=False),
               "--slices is given 1 time(s) for 2 image(s)")
    user_error(coral("finetune", *pair, "--slices", "1,4", "--slices", "0,9", "--out", tmp_path / "x.safetensors",
                     check=False), "img2.nii.gz", "9")
    assert not (tmp_path / "x.safetensors").exists()


def test_finetune_on_the_labelled_cases_of_a_dataset_folder(tmp_path):
    """Without --labels, a dataset folder's labelled cases train; unlabelled ones are left out."""
    from coral_core.checkpoint import load_checkpoint

    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for k, name in enumerate(("case_a", "case_b", "case_c")):
        img, lab = make_phantom(20 + k, n_slices=5)
        save_volume(root / "imagesTr" / f"{name}_0000.nii.gz", img.array, np.eye(4))
        if name != "case_b":  # case_b has no labels
            save_volume(root / "labelsTr" / f"{name}.nii.gz", lab.array, np.eye(4))
    res = json.loads(coral("finetune", root, "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert [Path(p).name for p in res["images"]] == ["case_a_0000.nii.gz", "case_c_0000.nii.gz"]
    assert res["slices"] == [[0, 1, 2, 3, 4]] * 2
    assert [Path(p).name for p in res["skipped_without_labels"]] == ["case_b_0000.nii.gz"]  # and said so
    text = coral("finetune", root, "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors").stdout
    assert "(1 image without a label file skipped: " in text and "case_b_0000.nii.gz" in text
    assert load_checkpoint(tmp_path / "m.safetensors")[0].config.n_classes == 4
    user_error(coral("finetune", root, "--slices", "1", "--out", tmp_path / "x.safetensors", check=False),
               "--slices needs --labels")
    user_error(coral("finetune", root / "imagesTr", "--out", tmp_path / "x.safetensors", check=False),
               "imagesTr", "no image there comes with a label file")
    assert not (tmp_path / "x.safetensors").exists()



def test_a_folder_of_images_beside_their_labels_trains_on_images_only(tmp_path):
    """CHD's and MM-WHS's layout, ct_1001_image beside ct_1001_label in one folder: fine-tuning takes the
    pairs, and pretraining, embedding and segmenting read the images only, never a label map as a scan."""
    root = tmp_path / "chd"
    root.mkdir()
    for k in range(3):
        img, lab = make_phantom(30 + k, n_slices=5)
        save_volume(root / f"ct_100{k + 1}_image.nii.gz", img.array, np.eye(4))
        if k != 1:
            save_volume(root / f"ct_100{k + 1}_label.nii.gz", lab.array, np.eye(4))
    res = json.loads(coral("finetune", root, "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert [Path(p).name for p in res["images"]] == ["ct_1001_image.nii.gz", "ct_1003_image.nii.gz"]
    assert [Path(p).name for p in res["skipped_without_labels"]] == ["ct_1002_image.nii.gz"]
    res = json.loads(coral("pretrain", root, "--epochs", 1, *TINY, "--out", tmp_path / "p.safetensors",
                           "--json").stdout)
    assert res["volumes"] == 3
    coral("segment", root, "--model", tmp_path / "m.safetensors", "--out-dir", tmp_path / "seg")
    assert sorted(f.name for f in (tmp_path / "seg").iterdir()) == [
        f"ct_100{k}_image_labels.nii.gz" for k in (1, 2, 3)]

def test_finetune_prepares_scans_wider_than_the_automatic_size_as_it_reads_them(tmp_path):
    """A scan wider than the automatic size's cap (256) is resampled to it as it is read, next to a
    small one kept as read until the size is known; the labels still give the classes."""
    from scipy import ndimage

    from coral_core.checkpoint import load_checkpoint

    img, lab = make_phantom(40, n_slices=4)
    save_volume(tmp_path / "small.nii.gz", img.array, np.eye(4))
    save_volume(tmp_path / "small_lab.nii.gz", lab.array, np.eye(4))
    wide = (1, 300 / img.array.shape[1], 300 / img.array.shape[2])
    save_volume(tmp_path / "wide.nii.gz", ndimage.zoom(img.array, wide, order=1), np.eye(4))
    save_volume(tmp_path / "wide_lab.nii.gz", ndimage.zoom(lab.array, wide, order=0), np.eye(4))
    res = json.loads(coral("finetune", tmp_path / "small.nii.gz", tmp_path / "wide.nii.gz", "--labels",
                           tmp_path / "small_lab.nii.gz", tmp_path / "wide_lab.nii.gz", "--steps", 1, "--batch-size", 2,
                           "--base-filters", "4", "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert res["slices"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    model = load_checkpoint(tmp_path / "m.safetensors")[0]
    assert model.config.image_size == 256 and model.config.n_classes == 4
    # how each scan is held while training: the wide one at the model's size only, the small one as read
    import torch

    from coral_core.cli import _annotated_pairs

    def held(name, size=None):
        [(_, _, pair)] = _annotated_pairs(str(tmp_path / f"{name}.nii.gz"), str(tmp_path / f"{name}_lab.nii.gz"), None,
                                          size)
        return pair

    image, labels, slices, shape, top, outside = held("wide")
    assert isinstance(image, torch.Tensor) and image.shape == (4, 1, 256, 256) and labels.shape == (4, 256, 256)
    assert labels.dtype == torch.uint8 and shape == (4, 300, 300) and top == 3 and outside == 0
    image, labels, *_ = held("small")
    assert isinstance(image, np.ndarray) and image.shape == img.array.shape and labels.dtype == np.uint8
    image, _, *_ = held("small", 64)
    assert image.shape == (4, 1, 64, 64)  # a size known when read (--init, --image-size)

def test_finetune_with_unlabelled_scans_trains_the_embedding_loss_on_them(subject, tmp_path):
    """Semi-supervised: unlabelled scans join the CORAL loss, even from random init (which then has a direction)."""
    from coral_core.checkpoint import load_checkpoint

    d = subject
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for k in (30, 31):
        save_volume(folder / f"scan{k}.nii.gz", make_phantom(k, n_slices=5)[0].array, np.eye(4))
    res = json.loads(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--unlabelled", folder,
                           "--steps", 2, *TINY, "--out", tmp_path / "semi.safetensors", "--json").stdout)
    assert res["unlabelled"] == 2 and res["init"] == "random"
    model, meta = load_checkpoint(tmp_path / "semi.safetensors")
    assert model.has_direction and meta["training"]["unlabelled"] == [str(folder)]
    assert meta["training"]["embedding_weight"] == 0.1
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--unlabelled", folder,
                     "--embedding-weight", 0, "--out", tmp_path / "x.safetensors", check=False),
               "--unlabelled", "--embedding-weight above 0")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--unlabelled", tmp_path / "nothing",
                     "--out", tmp_path / "x.safetensors", check=False), "nothing", "no such file")
    assert not (tmp_path / "x.safetensors").exists()


def test_finetune_refuses_label_files_that_are_not_label_maps(subject, tmp_path):
    d = subject
    truth = load_volume(d / "lab.nii.gz")
    for name, values, fragment in (("float", truth.array + 0.5, "non-integer values"),
                                   ("big", truth.array.astype(np.int32) * 100, "holds label value 300"),
                                   ("negative", truth.array.astype(np.int32) - 1, "negative label values")):
        save_volume(tmp_path / f"{name}.nii.gz", values, truth.affine)
        user_error(coral("finetune", d / "img.nii.gz", "--labels", tmp_path / f"{name}.nii.gz",
                         "--out", tmp_path / "x.safetensors", check=False), f"{name}.nii.gz", fragment)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_folder_per_case_is_read_and_written_by_case(tmp_path):
    """KiTS's layout, case_00000/imaging.nii.gz beside a bare segmentation.nii.gz: fine-tuning takes the
    labelled case, and segmenting writes each case's labels under its folder's name (the files share one)."""
    root = tmp_path / "kits"
    for k in range(2):
        img, lab = make_phantom(60 + k, n_slices=5)
        (root / f"case_0000{k}").mkdir(parents=True)
        save_volume(root / f"case_0000{k}" / "imaging.nii.gz", img.array, np.eye(4))
        if k == 0:
            save_volume(root / f"case_0000{k}" / "segmentation.nii.gz", lab.array, np.eye(4))
    res = json.loads(coral("finetune", root, "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert Path(res["image"]).parent.name == "case_00000"
    assert [Path(p).parent.name for p in res["skipped_without_labels"]] == ["case_00001"]
    coral("segment", root, "--out-dir", tmp_path / "seg")
    assert sorted(f.name for f in (tmp_path / "seg").iterdir()) == [
        "case_00000_imaging_labels.nii.gz", "case_00001_imaging_labels.nii.gz"]


def test_label_files_whose_values_are_codes(tmp_path):
    """MM-WHS writes its classes as 205, 420, ... 850: `--label-values` renumbers them for fine-tuning, the
    low-label benchmark and evaluation; a value it does not list is background, with a warning."""
    from coral_core.checkpoint import load_checkpoint

    codes = np.array([0, 205, 500, 850], dtype=np.int16)
    root = tmp_path / "mmwhs"
    root.mkdir()
    for k in range(4):
        img, lab = make_phantom(50 + k, n_slices=5)
        coded = codes[lab.array.astype(int)]
        if k == 0:
            coded[0, 0, :3] = 421  # a stray value, as one MM-WHS case has
        save_volume(root / f"ct_train_100{k + 1}_image.nii.gz", img.array, np.eye(4))
        save_volume(root / f"ct_train_100{k + 1}_label.nii.gz", coded, np.eye(4))
    user_error(coral("finetune", root, "--out", tmp_path / "x.safetensors", check=False),
               "ct_train_1001_label.nii.gz", "holds label value 850", "--label-values")
    proc = coral("finetune", root, "--label-values", "205,500,850", "--steps", 1, *TINY,
                 "--out", tmp_path / "m.safetensors", "--json")
    assert "ct_train_1001_label.nii.gz: values 421 (3 voxels) are not in --label-values" in proc.stderr
    model, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert model.config.n_classes == 4 and meta["training"]["label_values"] == [205, 500, 850]

    _, lab = make_phantom(50, n_slices=5)
    save_volume(tmp_path / "pred.nii.gz", lab.array.astype(np.uint8), np.eye(4))
    res = json.loads(coral("evaluate", tmp_path / "pred.nii.gz", root / "ct_train_1001_label.nii.gz",
                           "--label-values", "205,500,850", "--json").stdout)
    assert res["mean_dice"] > 0.99  # the same labels once renumbered (but for 3 stray voxels)

    res = json.loads(coral("bench", "lowlabel", "--quick", "--data", root, "--label-values", "205,500,850",
                           "--folds", 2, "--seeds", 1, "--labeled", 1, "--methods", "random", "--finetune-steps", 2,
                           "--json", "--device", "cpu").stdout)
    assert res["config"]["n_classes"] == 4 and res["config"]["source"] == f"{root} (label values 205,500,850)"
    for bad, fragment in (("0,500", "0 is background"), ("205,205", "listed twice"), ("205,x", "whole numbers")):
        user_error(coral("finetune", root, "--label-values", bad, "--out", tmp_path / "x.safetensors", check=False),
                   f"--label-values {bad}", fragment)
    user_error(coral("finetune", root, "--label-values", "205,500,850", "--classes", 3, "--out",
                     tmp_path / "x.safetensors", check=False), "--classes 3", "3 foreground classes")
    user_error(coral("bench", "lowlabel", "--label-values", "205", check=False), "give --data")
    assert not (tmp_path / "x.safetensors").exists()


def test_demo_runs_end_to_end(tmp_path):
    res = json.loads(coral("demo", "--phantom", 2, "--epochs", 1, "--steps", 2, "--out-dir", tmp_path / "demo",
                           "--save-model", tmp_path / "demo.safetensors", "--json").stdout)
    assert 0.0 <= res["mean_dice"] <= 1.0 and set(res["dice"]) == {"RV", "myocardium", "LV"}
    assert (tmp_path / "demo" / "demo_segmentation.png").stat().st_size > 10_000
    assert (tmp_path / "demo.safetensors").is_file()
    # its pretraining says how many steps it made, and that so few are a demonstration
    from coral_core.demo import LABELLED_SEED_OFFSET
    from coral_core.phantom import make_cohort
    from coral_core.pretrain import SUGGESTED_STEPS, pretraining_steps

    cohort = make_cohort(2, seed=0) + make_cohort(2, seed=LABELLED_SEED_OFFSET)  # what it pretrained on
    n_slices = sum(len(image.array) for image, _ in cohort)
    per_epoch = pretraining_steps(n_slices, 32, 1)
    assert res["pretrain_steps"] == per_epoch
    text = coral("demo", "--phantom", 2, "--epochs", 1, "--steps", 2, "--out-dir", tmp_path / "demo2").stdout
    (line,) = [ln for ln in text.splitlines() if "of CORAL" in ln]
    assert line.strip().startswith(f"{per_epoch} pretraining step")
    assert f"about {SUGGESTED_STEPS} steps (--epochs {-(-SUGGESTED_STEPS // per_epoch)} here" in line
    assert "mean Dice" in text and (tmp_path / "demo2" / "demo_segmentation.png").is_file()


def test_user_mistakes_exit_2_with_one_sentence(subject, tmp_path):
    d = subject
    user_error(coral("segment", tmp_path / "missing.nii.gz", "--out", tmp_path / "s.nii.gz", check=False), "missing.nii.gz", "no such file")
    (tmp_path / "fake.nii.gz").write_text("not an image")
    user_error(coral("segment", tmp_path / "fake.nii.gz", "--out", tmp_path / "s.nii.gz", check=False), "fake.nii.gz")
    user_error(coral("segment", d / "img.nii.gz", "--out", tmp_path / "no" / "dir" / "s.nii.gz", check=False), "does not exist")
    user_error(coral("segment", d / "img.nii.gz", "--out", tmp_path / "s.nii.gz", "--bogus", check=False), "unrecognized arguments")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--slices", "1,99",
                     "--out", tmp_path / "x.safetensors", check=False), "99")
    other = tmp_path / "other.nii.gz"
    save_volume(other, np.zeros((3, 4, 5), np.uint8), np.eye(4))
    user_error(coral("finetune", d / "img.nii.gz", "--labels", other, "--out", tmp_path / "x.safetensors", check=False), "do not match")
    user_error(coral("segment", d / "img.nii.gz", "--model", tmp_path / "nope.safetensors", "--out", tmp_path / "s.nii.gz", check=False), "nope.safetensors")
    user_error(coral("pretrain", "--epochs", 1, "--out", tmp_path / "p.safetensors", check=False), "no input volumes")
    user_error(coral("pretrain", "--phantom", 2, "--embedding-dim", 0, "--out", tmp_path / "p.safetensors", check=False),
               "--embedding-dim", "at least 1")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--base-filters", "x",
                     "--out", tmp_path / "x.safetensors", check=False), "--base-filters")
    user_error(coral("bench", "lowlabel", "--quick", "--image-size", 40, check=False), "--image-size", "multiple of 16")
    # numbers that would once crash, or train nothing, deep inside the run
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--lr", -1,
                     "--out", tmp_path / "x.safetensors", check=False), "--lr -1", "above 0")
    user_error(coral("pretrain", "--phantom", 2, "--lr", 0, "--out", tmp_path / "p.safetensors", check=False), "--lr 0")
    user_error(coral("bench", "lowlabel", "--quick", "--finetune-lr", "nan", check=False), "--finetune-lr nan")
    user_error(coral("bench", "lowlabel", "--quick", "--pretrain-lr", 0, check=False), "--pretrain-lr 0")
    user_error(coral("bench", "lowlabel", "--quick", "--pretrain-batch", 1, check=False), "--pretrain-batch")
    user_error(coral("bench", "lowlabel", "--quick", "--fold-seed", -1, check=False), "--fold-seed", "0")
    user_error(coral("pretrain", "--phantom", -2, "--out", tmp_path / "p.safetensors", check=False), "--phantom", "0 or more")
    user_error(coral("segment", d / "img.nii.gz", "--out", tmp_path / "s.nii.gz", "--batch-size", 0, check=False),
               "--batch-size")
    user_error(coral("embed", d / "img.nii.gz", "--out", tmp_path / "e.csv", "--plot", tmp_path / "e.pdf", check=False),
               "e.pdf", "PNG")
    user_error(coral("evaluate", d / "img.nii.gz", d / "lab.nii.gz", check=False), "img.nii.gz", "not a label map")
    (tmp_path / "a_file").write_text("")
    user_error(coral("demo", "--out-dir", tmp_path / "a_file" / "sub", check=False), "cannot create the output folder")
    (tmp_path / "a_file").unlink()
    # training options that cannot work are refused before any file is read (a missing one is named only after)
    missing, out = tmp_path / "missing.nii.gz", tmp_path / "m.safetensors"
    for command, option, value, fragment in (
            ("pretrain", "--epochs", 0, "at least 1"), ("pretrain", "--batch-size", 1, "at least 2"),
            ("pretrain", "--lr", -1, "learning rate"), ("finetune", "--steps", 0, "at least 1"),
            ("finetune", "--batch-size", 0, "at least 1"), ("finetune", "--embedding-every", 0, "at least 1"),
            ("finetune", "--lr", 0, "learning rate"), ("finetune", "--embedding-weight", -1, "0 (off) or more")):
        labels = ("--labels", d / "lab.nii.gz") if command == "finetune" else ()
        user_error(coral(command, missing, *labels, option, value, "--out", out, check=False), option, fragment)
    for option in ("--steps", "--epochs"):  # refused before the demo pretrains, not after
        user_error(coral("demo", option, 0, "--out-dir", tmp_path / "demo", check=False), option, "at least 1")
    assert not (tmp_path / "demo").exists()
    demo = Path(coral_core.__file__).parent / "assets" / "demo_model.safetensors"  # 16 filters at 128 x 128
    for option, value in (("--image-size", 64), ("--base-filters", 8)):
        user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--init", demo, option, value,
                         "--out", tmp_path / "x.safetensors", check=False), f"{option} {value}", "the --init model")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--image-size", 0,
                     "--out", tmp_path / "x.safetensors", check=False), "--image-size", "at least 1")
    assert FINETUNE_BASE_FILTERS == UNetConfig().base_filters
    assert not list(tmp_path.glob("s.nii.gz")) and not list(tmp_path.glob("x.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_odd_option_values_found_by_fuzz_options(subject, tmp_path):
    """Values that benchmarks/fuzz_options.py found ending in a traceback, each now one sentence."""
    d, out = subject, tmp_path / "p.safetensors"
    for argv, value, fragment in ((("pretrain", "--phantom", 2, "--out", out), "-1", "not a seed"),
                                  (("demo", "--out-dir", tmp_path / "demo"), "99999999999999999999", "0 to 4294967295"),
                                  (("bench", "embedding", "--out", tmp_path / "x.png"), "-5", "not a seed")):
        user_error(coral(*argv, "--seed", value, check=False), "--seed", fragment)
    user_error(coral("pretrain", "--phantom", 2, "--base-filters", "99999999999999999999", "--out", out, check=False),
               "--base-filters", "too large")
    user_error(coral("pretrain", "--phantom", 2, "--lr", "1e300", "--out", out, check=False), "--lr 1e+300", "at most 1")
    user_error(coral("bench", "lowlabel", "--quick", "--encoder-lr-scale", "1e300", check=False),
               "--encoder-lr-scale 1e+300", "above 1")
    user_error(coral("bench", "lowlabel", "--quick", "--phantom", 4, "--phantom-noise", "inf,inf", check=False),
               "--phantom-noise 'inf,inf'")
    user_error(coral("bench", "speed", "--quick", "--peak-tflops", "nan", check=False), "--peak-tflops nan", "above 0")
    # the runs were listed before anything said how many: out of memory, said as "use a smaller --image-size ..."
    user_error(coral("bench", "lowlabel", "--quick", "--seeds", 2**31 - 1, check=False),
               "2147483647 seeds x 7 methods x 1 labelled count x 2 folds make 30,064,771,058 fine-tuning runs",
               "give fewer --seeds")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--classes", 2**31 - 1, "--out", out,
                     check=False), "--classes 2147483647", "up to 255 classes")
    user_error(coral("segment", d / "img.nii.gz", "--out", tmp_path / "s.nii.gz", "--out-dir", tmp_path, check=False),
               "--out LABELS or --out-dir DIR, not both")
    # a model far larger than the machine: torch's allocator refuses it (an address-space limit makes that certain)
    limit = 16 << 30
    proc = subprocess.run([sys.executable, "-m", "coral_core.cli", "pretrain", "--phantom", "2", "--epochs", "1",
                           "--base-filters", "100000", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    user_error(proc, "coral pretrain ran out of this machine's memory (an allocation of", "--base-filters")
    assert not out.exists() and not list(tmp_path.glob("s.nii.gz"))


def test_outputs_never_replace_the_inputs(subject, tmp_path):
    """An output named as one of the command's inputs is refused before any work (these used to write over the scan,
    the labels drawn on it, or the model, found by benchmarks/fuzz_options.py)."""
    import shutil

    d = tmp_path / "data"
    d.mkdir()
    for name in ("img.nii.gz", "lab.nii.gz"):
        shutil.copy(subject / name, d / name)
    model = tmp_path / "m.safetensors"
    shutil.copy(Path(coral_core.__file__).parent / "assets" / "demo_model.safetensors", model)
    before = {p.name: p.read_bytes() for p in [*d.iterdir(), model]}
    user_error(coral("segment", d / "img.nii.gz", "--model", model, "--out", d / "img.nii.gz", check=False),
               "img.nii.gz: is also an input of this command", "give the output another name")
    os.link(d / "img.nii.gz", tmp_path / "hard.nii.gz")  # the same file by another name
    user_error(coral("segment", d / "img.nii.gz", "--model", model, "--out", tmp_path / "hard.nii.gz", check=False),
               "hard.nii.gz: is the same file as the input")
    user_error(coral("embed", d / "img.nii.gz", "--model", model, "--out", model, check=False),
               "m.safetensors: is also an input")
    user_error(coral("finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--out", d / "lab.nii.gz",
                     check=False), "--out", "lab.nii.gz", "end the name with .safetensors")
    user_error(coral("pretrain", d / "img.nii.gz", "--out", tmp_path / "p.pt", check=False), "p.pt", ".safetensors")
    # a folder's images beside their labels, named as coral segment names its output (CASE_labels)
    (d / "lab.nii.gz").rename(d / "img_labels.nii.gz")
    before["img_labels.nii.gz"] = before.pop("lab.nii.gz")
    user_error(coral("segment", d, "--model", model, "--out-dir", d, check=False),
               "img_labels.nii.gz: holds the labels of", "choose another --out-dir")
    assert {p.name: p.read_bytes() for p in [*d.iterdir(), model]} == before
    coral("segment", d, "--model", model, "--out-dir", tmp_path / "predicted")
    assert (tmp_path / "predicted" / "img_labels.nii.gz").is_file()
    # predictions written beside their images are said to be read back as ground truth next time
    (d / "img_labels.nii.gz").unlink()
    stderr = coral("segment", d, "--model", model, "--out-dir", d).stderr
    assert "warning: 1 label file will lie beside its image in" in stderr and "img_labels.nii.gz" in stderr, stderr
    assert "keep predictions in a folder of their own" in stderr


def test_segment_and_embed_default_to_the_bundled_demo_model(tmp_path):
    img, lab = make_phantom(4242)
    save_volume(tmp_path / "img.nii.gz", img.array, img.affine)
    save_volume(tmp_path / "lab.nii.gz", lab.array, lab.affine)
    res = json.loads(coral("segment", tmp_path / "img.nii.gz", "--out", tmp_path / "seg.nii.gz", "--json").stdout)
    assert res["shape"] == list(img.shape)
    score = json.loads(coral("evaluate", tmp_path / "seg.nii.gz", tmp_path / "lab.nii.gz", "--json").stdout)
    assert score["dice"]["LV"] > 0.8  # an unseen phantom subject's; segment wrote the model's class names
    coral("segment", tmp_path / "img.nii.gz", "--out", tmp_path / "seg_cl.nii.gz", "--channels-last")
    same = load_volume(tmp_path / "seg_cl.nii.gz").array == load_volume(tmp_path / "seg.nii.gz").array
    assert same.mean() > 0.999
    emb = json.loads(coral("embed", tmp_path / "img.nii.gz", "--out", tmp_path / "e.csv", "--json").stdout)
    assert emb["axis"] == "coral"
    # --phantom N embeds the subjects that --seed names, as their files embed
    made = json.loads(coral("embed", "--phantom", 1, "--seed", 4242, "--out", tmp_path / "p.csv", "--json").stdout)
    assert list(made["volumes"]) == ["phantom4242"] and made["ordinal_consistency"] == emb["ordinal_consistency"]
    rows = [line.split(",", 1)[1] for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert rows == [line.split(",", 1)[1] for line in (tmp_path / "e.csv").read_text().splitlines()[1:]]
    user_error(coral("embed", "--out", tmp_path / "none.csv", check=False), "no input volumes", "--phantom N")


def _interrupt_when(proc, path, timeout=300):
    """Ctrl-C the process once ``path`` exists (its first saved progress). The limit is generous: on a
    2-core machine busy with other work the first save took over 120 s once."""
    import signal
    import time

    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return err


def _popen_coral(*args):
    import signal

    return subprocess.Popen(
        [sys.executable, "-m", "coral_core.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell's background job ignores it
        start_new_session=True,  # its processes, workers included, are then the session's: see _left_running
    )


def _left_running(proc, grace=15.0):
    """The processes of ``proc``'s session still running (not zombies) ``grace`` seconds after it
    exited, as "pid command" lines; multiprocessing's helpers (the resource tracker) leave within
    that once their parent has gone. Linux only: elsewhere nothing is checked."""
    import time

    if not Path("/proc/self/stat").exists():
        return []
    deadline = time.monotonic() + grace
    while True:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # it has just exited
                continue
            fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session
            if int(fields[3]) == proc.pid and fields[0] != "Z":
                left.append(f"{stat.parent.name} {cmdline.strip()}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_bench_lowlabel_table_is_continued_not_rerun(tmp_path):
    table = tmp_path / "t.json"
    base = ["bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
            "--pretrain-epochs", 1, "--finetune-steps", 2, "--device", "cpu", "--table", table, "--json"]
    first = json.loads(coral(*base, "--methods", "random").stdout)
    assert len(first["runs"]) == 2 and first["complete"] and first["config"]["source"] == "4 phantom subjects"
    proc = coral(*base, "--methods", "random,coral")
    second = json.loads(proc.stdout)
    assert "fine-tune random" not in proc.stderr and "fine-tune coral" in proc.stderr  # only the new runs ran
    assert {"finetune random", "score random"} <= first["timings"].keys()
    assert second["timings"]["finetune random"] == first["timings"]["finetune random"]  # carried over, not rerun
    assert second["runs"][:2] == first["runs"] and len(second["runs"]) == 4 and second["complete"]
    assert [r["method"] for r in second["rows"]] == ["random", "coral"]
    assert [(r["method"], r["reference"]) for r in second["paired"]] == [("coral", "random"), ("random", "coral")]
    assert json.loads(table.read_text())["runs"] == second["runs"]
    import torch

    assert {r["threads"] for r in second["runs"]} == {torch.get_num_threads()}  # one process: all its threads
    from coral_core.device import cpu_name

    assert {r["device"] for r in second["runs"]} == {f"cpu ({cpu_name()})"}  # the CPU model rounds float32 its way
    kept = json.loads(table.read_text())
    for run in kept["runs"]:
        run["threads"], run["device"] = 99, "cpu (another CPU)"
    del kept["config"]["finetune_freeze_encoder"]  # as a table from before these fields were recorded
    del kept["config"]["finetune_augment"]
    table.write_text(json.dumps(kept))
    user_error(coral(*base, "--freeze-encoder", check=False), str(table), "finetune_freeze_encoder is False, this run's True")
    user_error(coral(*base, "--no-finetune-augment", check=False), str(table), "finetune_augment is True, this run's False")
    proc = coral(*base, "--methods", "random", "--workers", 1)  # nothing new to run: no note
    assert "note:" not in proc.stderr
    proc = coral(*base[:-1], "--seeds", 2, "--methods", "random", "--workers", 1)
    assert "note: the rows hold different numbers of runs (random: 4 runs; coral: 2 runs)" in proc.stdout
    assert (f"the table's runs used 99 CPU thread(s) per process, the new ones use {torch.get_num_threads()}"
            in proc.stderr)
    assert f"the table's runs ran on cpu (another CPU), the new ones on cpu ({cpu_name()})" in proc.stderr
    user_error(coral(*base[:-1], "--finetune-steps", 3, check=False), str(table), "finetune_steps is 2, this run's 3")
    table.write_text("{not json")
    user_error(coral(*base, check=False), str(table), "cannot be read as a benchmark table")


def test_bench_lowlabel_workers_give_the_runs_of_one_process(tmp_path):
    """--workers 2 on this 2-core machine runs units side by side with one CPU thread each: the
    same runs, to the bit, as one process with one thread, collected in the same order."""
    args = ["bench", "lowlabel", "--quick", "--phantom", 6, "--folds", 2, "--seeds", 2, "--labeled", "1",
            "--methods", "random,coral", "--pretrain-epochs", 1, "--finetune-steps", 8, "--device", "cpu", "--json"]
    import torch

    threads = max(1, torch.get_num_threads() // 2)  # what each of 2 workers gets
    one = json.loads(coral(*args, "--workers", 1, "--table", tmp_path / "one.json",
                           env={"OMP_NUM_THREADS": str(threads)}).stdout)
    proc = coral(*args, "--workers", 2, "--table", tmp_path / "two.json")
    two = json.loads(proc.stdout)
    assert "in 2 processes" in proc.stderr
    assert two["runs"] == one["runs"] and two["rows"] == one["rows"] and len(two["runs"]) == 8
    assert json.loads((tmp_path / "two.json").read_text())["runs"] == two["runs"]
    user_error(coral(*args, "--workers", 0, check=False), "--workers must be at least 1")


@pytest.mark.parametrize("workers", [1, 2])
def test_bench_lowlabel_ctrl_c_keeps_the_finished_runs(tmp_path, workers):
    table = tmp_path / "t.json"
    args = ["bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 3, "--labeled", "1",
            "--methods", "random", "--finetune-steps", 60, "--device", "cpu", "--workers", workers,
            "--table", table, "--json"]
    proc = _popen_coral(*args)
    err = _interrupt_when(proc, table)
    assert proc.returncode == 130 and "Traceback" not in err
    assert _left_running(proc) == []  # no worker goes on training after the command has returned
    kept = json.loads(table.read_text())
    assert 1 <= len(kept["runs"]) < 6 and not kept["complete"]
    assert err.strip().splitlines()[-1] == (f"error: interrupted; {table} holds the runs finished so far "
                                            f"({len(kept['runs'])}), and the same command continues it")
    if workers == 2:  # Ctrl-C twice as the workers start: exit 130, no traceback, the table as it was
        import signal
        import time

        proc = _popen_coral(*args)
        while "units of work" not in proc.stderr.readline():
            assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert _left_running(proc) == []
        assert err.strip().splitlines()[-1] == (f"error: interrupted before another run finished; {table} still "
                                                f"holds its {len(kept['runs'])} runs, and the same command continues it")
        assert json.loads(table.read_text()) == kept
    done = json.loads(coral(*args).stdout)
    assert all(run in done["runs"] for run in kept["runs"]) and len(done["runs"]) == 6 and done["complete"]
    assert done["rows"][0]["n"] == 6
    if workers == 1:  # one process finishes the runs in the table's own order
        assert done["runs"][:len(kept["runs"])] == kept["runs"]


def test_ctrl_c_keeps_the_progress_and_no_partial_output(tmp_path):
    out = tmp_path / "pre.safetensors"
    proc = _popen_coral("pretrain", "--phantom", 4, "--epochs", 100000, *TINY, "--out", out)
    err = _interrupt_when(proc, tmp_path / "pre.resume.safetensors")
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted after step ") and "run the same command with --resume" in last
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["pre.resume.safetensors"]  # no partial pre.safetensors


def test_finetune_resumes_after_ctrl_c_and_cleans_up(subject, tmp_path):
    d = subject
    args = ["finetune", d / "img.nii.gz", "--labels", d / "lab.nii.gz", "--steps", 600, "--batch-size", 2, *TINY,
            "--out", tmp_path / "ft.safetensors", "--json"]
    proc = _popen_coral(*args)
    _interrupt_when(proc, tmp_path / "ft.resume.safetensors")
    assert proc.returncode == 130 and not (tmp_path / "ft.safetensors").exists()
    user_error(coral(*args[:-1], "--steps", 700, "--resume", check=False), "other options")
    # speed levers are not part of what a resumed run must share
    res = json.loads(coral(*args, "--resume", "--channels-last").stdout)
    assert 50 <= res["resumed_from"] < 600
    assert res["resumed_from"] + res["steps"] == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.safetensors"]


def test_sign_test_p_values_are_exact():
    from math import comb

    assert sign_test_p(6, 0) == 2 / 64 and sign_test_p(0, 6) == 2 / 64
    assert sign_test_p(5, 1) == 2 * (comb(6, 5) + 1) / 64
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(15, 5) == pytest.approx(0.04139, abs=1e-5)


def test_bench_lowlabel_prints_rows_for_every_method_and_count(tmp_path):
    proc = coral("bench", "lowlabel", "--quick", "--phantom", 6, "--folds", 2, "--seeds", 2, "--labeled", "1,2",
                 "--methods", "random,coral,pcl", "--pretrain-epochs", 1, "--finetune-steps", 3,
                 "--table", tmp_path / "t.json", "--json", "--device", "cpu")
    res = json.loads(proc.stdout)
    assert [(r["method"], r["labeled"]) for r in res["rows"]] == [
        ("random", 1), ("random", 2), ("coral", 1), ("coral", 2), ("pcl", 1), ("pcl", 2)]
    assert all(0 <= r["dice"] <= 1 and r["dice_std"] >= 0 and r["n"] == 4 for r in res["rows"])
    assert res["config"]["subjects"] == 6 and res["config"]["folds"] == 2
    assert res["config"]["finetune_balance_classes"] is True  # the benchmark's default fine-tuning loss
    assert res["config"]["cpu_bf16"] is False  # float32 on the CPU unless asked, as its tables were measured
    # the same labelled subjects for every method in a (fold, seed, M) cell: a paired comparison
    draws = {}
    for run in res["runs"]:
        draws.setdefault((run["fold"], run["seed"], run["labeled"]), set()).add(tuple(run["train"]))
    assert all(len(v) == 1 for v in draws.values())
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == res["rows"]
    # paired differences: recomputed here from the runs, as a reader of the table would
    dice = {(r["method"], r["labeled"], r["fold"], r["seed"]): r["dice"] for r in res["runs"]}
    for row in res["paired"]:
        diffs = [d - dice[(row["reference"], *key[1:])] for key, d in dice.items()
                 if key[0] == row["method"] and key[1] == row["labeled"]]
        assert row["n"] == 4 and np.isclose(row["diff"], np.mean(diffs)) and row["wins"] == sum(x > 0 for x in diffs)
        assert row["losses"] == sum(x < 0 for x in diffs) and row["sign_p"] == sign_test_p(row["wins"], row["losses"])
        # counted by pretraining: each seed's mean difference over its 2 folds
        by_seed = [np.mean([d - dice[(row["reference"], *key[1:])] for key, d in dice.items()
                            if key[0] == row["method"] and key[1] == row["labeled"] and key[3] == seed]) for seed in (0, 1)]
        assert row["seeds"] == 2 and row["seed_wins"] == sum(x > 0 for x in by_seed)
        assert row["seed_losses"] == sum(x < 0 for x in by_seed)
        assert row["seed_sign_p"] == sign_test_p(row["seed_wins"], row["seed_losses"])
        assert np.isclose(row["seed_diff"], np.mean(by_seed))
        assert np.isclose(row["seed_se"], abs(by_seed[0] - by_seed[1]) / 2)  # std over 2 seeds (ddof 1) / sqrt(2)
    assert {(r["method"], r["reference"]) for r in res["paired"]} == {
        ("coral", "random"), ("pcl", "random"), ("random", "coral"), ("pcl", "coral")}
    # the same command on its finished table prints it again at once, with the count by pretraining
    again = coral("bench", "lowlabel", "--quick", "--phantom", 6, "--folds", 2, "--seeds", 2, "--labeled", "1,2",
                  "--methods", "random,coral,pcl", "--pretrain-epochs", 1, "--finetune-steps", 3,
                  "--table", tmp_path / "t.json", "--device", "cpu").stdout
    assert again.count("the same counted by pretraining") == 2
    for row in res["paired"]:
        line = next(ln for ln in again.split("the same counted by pretraining")[1 + (row["reference"] == "coral")]
                    .splitlines() if ln.split()[:1] == [row["method"]])
        cell = f"{row['seed_diff']:+.3f} +- {row['seed_se']:.3f}, {row['seed_wins']}/2 (p {row['seed_sign_p']:.2g})"
        assert cell in line
    text = coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                 "--methods", "random", "--finetune-steps", 2, "--device", "cpu").stdout
    assert "random" in text and "M=1" in text and "Dice pooled over each fold's test slices" in text
    assert "best checkpoint" not in text
    scored = coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                   "--methods", "random", "--finetune-steps", 2, "--device", "cpu", "--score-every", 1,
                   "--finetune-shift", 0.2, "--base-filters", 4, "--image-size", 32, "--table", tmp_path / "s.json")
    assert "each run also scored at its best checkpoint on the test fold" in scored.stdout
    scored_table = json.loads((tmp_path / "s.json").read_text())
    assert scored_table["config"]["finetune_shift"] == 0.2 and scored_table["config"]["score_every"] == 1
    assert all([step for step, _, _ in r["curve"]] == [1, 2] for r in scored_table["runs"])
    frozen = json.loads(coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                              "--methods", "coral", "--pretrain-epochs", 1, "--finetune-steps", 2, "--device", "cpu",
                              "--freeze-encoder", "--json").stdout)
    assert frozen["config"]["finetune_freeze_encoder"] is True and len(frozen["runs"]) == 2
    slow = json.loads(coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                            "--methods", "coral", "--pretrain-epochs", 1, "--finetune-steps", 2, "--device", "cpu",
                            "--encoder-lr-scale", 0.1, "--base-filters", 4, "--image-size", 32, "--json").stdout)
    assert slow["config"]["finetune_encoder_lr_scale"] == 0.1 and len(slow["runs"]) == 2
    user_error(coral("bench", "lowlabel", "--quick", "--encoder-lr-scale", 0, check=False), "--encoder-lr-scale")
    plain = json.loads(coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                             "--methods", "random", "--finetune-steps", 2, "--device", "cpu", "--no-finetune-augment",
                             "--base-filters", 4, "--image-size", 32, "--labeled-slices", 2, "--pretrain-scale", "0.7,1.4",
                             "--finetune-scale", "0.8,1.2", "--finetune-cohort-weight", 0.1, "--json").stdout)
    assert plain["config"]["finetune_augment"] is False and len(plain["runs"]) == 2
    assert plain["config"]["finetune_cohort_weight"] == 0.1
    assert plain["config"]["finetune_slices"] == 2
    assert plain["config"]["pretrain_scale"] == [0.7, 1.4] and plain["config"]["finetune_scale"] == [0.8, 1.2]
    assert (plain["config"]["base_filters"], plain["config"]["image_size"]) == (4, 32)
    assert plain["config"]["finetune_shift"] == 0.08 and "best_checkpoint" not in plain
    assert plain["config"]["source"] == "4 phantom subjects"  # the default cohort is named as before
    harder = json.loads(coral("bench", "lowlabel", "--quick", "--phantom", 4, "--folds", 2, "--seeds", 1, "--labeled", "1",
                              "--methods", "random", "--finetune-steps", 2, "--device", "cpu", "--base-filters", 4,
                              "--image-size", 32, "--phantom-bias", 1, "--phantom-noise", "0.05,0.2", "--phantom-fov",
                              "0.8,1.6", "--json").stdout)
    assert harder["config"]["source"] == "4 phantom subjects (bias 1, noise 0.05-0.2, field of view 0.8-1.6x)"
    from coral_core.lowlabel import load_labelled_cases
    from coral_core.phantom import PhantomConfig

    default, hard = load_labelled_cases(None, 2), load_labelled_cases(None, 2, phantom_config=PhantomConfig(bias=1.0))
    for a, b in zip(default, hard):  # the same anatomy in another appearance
        assert np.array_equal(a.labels, b.labels) and not np.allclose(a.image, b.image)
    user_error(coral("bench", "lowlabel", "--quick", "--phantom-noise", "0.2,0.05", check=False), "--phantom-noise", "LOW,HIGH")
    user_error(coral("bench", "lowlabel", "--quick", "--phantom-bias", -1, check=False), "--phantom-bias")
    user_error(coral("bench", "lowlabel", "--quick", "--phantom-fov", "0.5,1", check=False), "--phantom-fov",
               "within 0.75-4")
    user_error(coral("bench", "lowlabel", "--quick", "--labeled-slices", -1, check=False), "--labeled-slices")
    user_error(coral("bench", "lowlabel", "--quick", "--finetune-shift", 0.7, check=False), "--finetune-shift")
    user_error(coral("bench", "lowlabel", "--quick", "--score-every", -1, check=False), "--score-every")
    user_error(coral("bench", "lowlabel", "--quick", "--freeze-encoder-steps", 300, check=False), "--freeze-encoder-steps",
               "fewer than the fine-tuning steps")
    user_error(coral("bench", "lowlabel", "--quick", "--pretrain-scale", "1.4,0.7", check=False), "--pretrain-scale", "LOW,HIGH")
    user_error(coral("bench", "lowlabel", "--phantom", 4, "--folds", 2, "--labeled", "3", "--methods", "random",
                     check=False), "--labeled 3 exceeds the 2 training subjects")
    user_error(coral("bench", "lowlabel", "--phantom", 4, "--methods", "random,byol", check=False), "byol")


def test_bench_lowlabel_reads_an_acdc_folder_and_splits_patients_not_frames(tmp_path):
    root = tmp_path / "ACDC"
    for i in range(4):  # 4 patients with two labelled frames each, as ACDC's ED and ES
        patient = root / f"patient{i + 1:03d}"
        patient.mkdir(parents=True)
        for frame, seed in (("01", i), ("12", i + 100)):
            img, lab = make_phantom(seed, n_slices=6)
            save_volume(patient / f"{patient.name}_frame{frame}.nii.gz", img.array, img.affine)
            save_volume(patient / f"{patient.name}_frame{frame}_gt.nii.gz", lab.array.astype(np.uint8), lab.affine)
    res = json.loads(coral("bench", "lowlabel", "--quick", "--data", root, "--folds", 2, "--seeds", 1, "--labeled", 1,
                           "--methods", "random", "--finetune-steps", 2, "--no-balance-classes", "--cpu-bf16",
                           "--json", "--device", "cpu").stdout)
    assert res["config"]["subjects"] == 4 and res["config"]["cases"] == 8 and res["config"]["source"] == str(root)
    assert res["config"]["finetune_balance_classes"] is False and res["config"]["cpu_bf16"] is True
    assert all(0 <= r["dice_pooled"] <= 1 for r in res["runs"]) and 0 <= res["rows"][0]["dice_pooled"] <= 1
    patients = {f"patient{i + 1:03d}" for i in range(4)}
    assert len(res["runs"]) == 2
    for run in res["runs"]:  # folds hold patients; the labelled one is never a test patient
        assert set(run["test"]) <= patients and len(run["test"]) == 2
        assert len(run["train"]) == 1 and run["train"][0] in patients - set(run["test"])
    assert set(res["runs"][0]["test"]) | set(res["runs"][1]["test"]) == patients
    user_error(coral("bench", "lowlabel", "--data", tmp_path / "nothing", check=False), "nothing")
    user_error(coral("bench", "lowlabel", "--data", root, "--phantom-bias", 1, check=False), "--phantom N")
    user_error(coral("bench", "lowlabel", "--phantom", 2, "--structures", "LV", check=False),
               "--structures picks structures of the label files of --data DIR; give --data, or leave it out")
    # the published preprocessing: every scan at one mm per pixel, centre-cropped (here 1.8 mm -> 3.6 mm: 64 pixels)
    res = json.loads(coral("bench", "lowlabel", "--quick", "--data", root, "--folds", 2, "--seeds", 1, "--labeled", 1,
                           "--methods", "random", "--finetune-steps", 2, "--pixel-spacing", 3.6, "--image-size", 48,
                           "--json", "--device", "cpu").stdout)
    assert res["config"]["pixel_spacing"] == 3.6 and res["config"]["image_size"] == 48 and len(res["runs"]) == 2
    user_error(coral("bench", "lowlabel", "--quick", "--data", root, "--pixel-spacing", 1.8, "--image-size", 16,
                     check=False), "patient00", "cuts away", "raise --image-size or --pixel-spacing")
    user_error(coral("bench", "lowlabel", "--quick", "--pixel-spacing", 0, check=False), "--pixel-spacing must be")


def test_cine_frames_pretrain_as_the_published_methods_do(tmp_path):
    """ACDC's patientXXX_4d.nii.gz holds every frame of the cine (ED and ES among them): `pretrain
    --all-frames` reads each frame as a volume, and `bench lowlabel --pretrain-cine` adds to every method's
    pretraining the frames its labelled cases do not already hold."""
    import torch

    from coral_core.data import resize_slices
    from coral_core.lowlabel import load_cine_frames
    from helpers import write_nifti_ijk

    root = tmp_path / "ACDC"
    movies = {}
    for i in range(4):
        patient = root / f"patient{i + 1:03d}"
        patient.mkdir(parents=True)
        movie = [make_phantom(10 * i + t, n_slices=6) for t in range(4)]  # frames 01..04 of the cine
        movies[patient.name] = [img.array for img, _ in movie]
        write_nifti_ijk(patient / f"{patient.name}_4d.nii.gz",
                        np.stack([img.array.transpose(2, 1, 0) for img, _ in movie], -1), np.eye(4))
        for frame in (1, 3):  # ED and ES: copies of cine frames 1 and 3, with labels
            img, lab = movie[frame - 1]
            save_volume(patient / f"{patient.name}_frame{frame:02d}.nii.gz", img.array, np.eye(4))
            save_volume(patient / f"{patient.name}_frame{frame:02d}_gt.nii.gz", lab.array.astype(np.uint8), np.eye(4))
    res = json.loads(coral("pretrain", root, "--all-frames", "--epochs", 1, *TINY, "--out", tmp_path / "p.safetensors",
                           "--json").stdout)
    assert res["volumes"] == 16  # 4 patients x 4 frames, the ED and ES files not read twice
    embedded = json.loads(coral("embed", root / "patient001" / "patient001_4d.nii.gz", root / "patient002",
                                "--all-frames", "--out", tmp_path / "e.csv", "--json").stdout)["volumes"]
    assert sorted(embedded) == [f"{name}_t0{t}" for name in ("patient001_4d", "patient002") for t in range(4)]  # a file, a folder
    with open(tmp_path / "e.csv") as fh:
        assert sum(1 for _ in fh) == 1 + 8 * 6  # a row per slice of every frame
    assert len(json.loads(coral("embed", root / "patient002", "--out", tmp_path / "e.csv", "--json").stdout)["volumes"]) == 2
    assert json.loads(coral("pretrain", root, "--epochs", 1, *TINY, "--out", tmp_path / "p.safetensors",
                            "--json").stdout)["volumes"] == 8
    cache = ["--slice-cache", tmp_path / "slices.npy"]  # a cache of the frames is not the cache of the files
    for frames, volumes, how in (("--all-frames", 16, "written"), (None, 8, "written"), ("--all-frames", 16, "written"),
                                 ("--all-frames", 16, "reused")):
        res = json.loads(coral("pretrain", root, *([frames] if frames else []), *cache, "--epochs", 1, *TINY,
                               "--out", tmp_path / "p.safetensors", "--json").stdout)
        assert (res["volumes"], res["slice_cache"]) == (volumes, how)

    frames = load_cine_frames(root, 32)
    expected = [resize_slices(movies[p][t], 32) for p in sorted(movies) for t in (1, 3)]  # frames 02 and 04
    assert len(frames) == len(expected) == 8
    assert all(torch.equal(a, b) for a, b in zip(frames, expected))
    from coral_core.data import at_pixel_spacing

    at_mm = load_cine_frames(root, 32, pixel_spacing=5.0)  # 128 pixels at 1 mm (the files' affine): 26 at 5 mm, padded
    expected = [resize_slices(at_pixel_spacing(movies[p][t], (1.0, 1.0, 1.0), 5.0, 32)[0], 32)
                for p in sorted(movies) for t in (1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(at_mm, expected))
    res = json.loads(coral("bench", "lowlabel", "--quick", "--data", root, "--pretrain-cine", "--folds", 2,
                           "--seeds", 1, "--labeled", 1, "--methods", "coral,pcl", "--pretrain-epochs", 1,
                           "--finetune-steps", 2, "--workers", 2, "--json", "--device", "cpu").stdout)
    assert len(res["runs"]) == 4  # both methods pretrained with the frames, in two worker processes
    assert res["config"]["pretrain_extra"] == 8 and res["config"]["cases"] == 8
    assert res["config"]["source"].endswith(", pretrained with the 8 other frames of its cine files")
    user_error(coral("bench", "lowlabel", "--pretrain-cine", check=False), "give --data")
    flat = tmp_path / "flat"
    flat.mkdir()
    img, lab = make_phantom(0, n_slices=4)
    save_volume(flat / "a_image.nii.gz", img.array, np.eye(4))
    save_volume(flat / "a_label.nii.gz", lab.array.astype(np.uint8), np.eye(4))
    user_error(coral("bench", "lowlabel", "--quick", "--data", flat, "--pretrain-cine", check=False),
               "holds no 4-D cine files")


def test_finetune_a_cine_series_trains_on_each_annotated_frame(tmp_path):
    """A 4-D image with 4-D labels fine-tunes on every frame that holds labels, each frame a scan named
    "IMAGE frame T", exactly as the same frames given as 3-D files; a frame nobody painted is left out."""
    from coral_core.checkpoint import load_checkpoint
    from helpers import write_nifti_ijk

    movie = [make_phantom(90 + t, n_slices=6) for t in range(3)]
    labels = np.zeros((3, *movie[0][1].shape), np.uint8)
    labels[0, [1, 4]] = movie[0][1].array[[1, 4]]
    labels[2, [2]] = movie[2][1].array[[2]]  # frame 1 is not painted
    affine = oblique_affine()
    write_nifti_ijk(tmp_path / "cine.nii.gz", np.stack([v.array.transpose(2, 1, 0) for v, _ in movie], -1), affine)
    write_nifti_ijk(tmp_path / "cine_gt.nii.gz", np.stack([f.transpose(2, 1, 0) for f in labels], -1), affine)
    common = ("--steps", 3, "--batch-size", 2, "--base-filters", 4, "--image-size", 32, "--seed", 1, "--json")
    res = json.loads(coral("finetune", tmp_path / "cine.nii.gz", "--labels", tmp_path / "cine_gt.nii.gz",
                           "--out", tmp_path / "cine.safetensors", *common).stdout)
    cine = str(tmp_path / "cine.nii.gz")
    assert res["images"] == [f"{cine} frame 0", f"{cine} frame 2"] and res["slices"] == [[1, 4], [2]]
    for t in (0, 2):
        save_volume(tmp_path / f"f{t}.nii.gz", movie[t][0].array, affine)
        save_volume(tmp_path / f"f{t}_gt.nii.gz", labels[t], affine)
    alone = json.loads(coral("finetune", tmp_path / "f0.nii.gz", tmp_path / "f2.nii.gz", "--labels",
                             tmp_path / "f0_gt.nii.gz", tmp_path / "f2_gt.nii.gz",
                             "--out", tmp_path / "frames.safetensors", *common).stdout)
    assert res["final_loss"] == alone["final_loss"]
    a, meta = load_checkpoint(tmp_path / "cine.safetensors")
    b, _ = load_checkpoint(tmp_path / "frames.safetensors")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert meta["training"]["images"] == res["images"]
    user_error(coral("finetune", tmp_path / "cine.nii.gz", "--labels", tmp_path / "cine_gt.nii.gz", "--slices", "1",
                     "--out", tmp_path / "x.safetensors", check=False), "cine.nii.gz", "series of 3 frames",
               "leave --slices out")
    user_error(coral("finetune", tmp_path / "cine.nii.gz", "--labels", tmp_path / "f0_gt.nii.gz",
                     "--out", tmp_path / "x.safetensors", check=False), "f0_gt.nii.gz", "holds 1 frame",
               "series of 3 frames")
    write_nifti_ijk(tmp_path / "none.nii.gz", np.zeros_like(np.asarray(labels.transpose(3, 2, 1, 0))), affine)
    user_error(coral("finetune", tmp_path / "cine.nii.gz", "--labels", tmp_path / "none.nii.gz",
                     "--out", tmp_path / "x.safetensors", check=False), "none.nii.gz", "no frame holds any label")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_scan_whose_spacing_a_model_cannot_see_at_is_refused_by_name(tmp_path):
    """A scan whose header gives metres as millimetres (or one of pixels a metre wide), given to a model with a
    physical scale: each command that would see it at that scale exits 2 naming the file (it ran out of memory, or
    tiled each slice into one-pixel windows); the same voxels at a plausible spacing segment."""
    from coral_core.checkpoint import save_checkpoint
    from coral_core.model import UNet

    config = UNetConfig(n_classes=2, base_filters=4, depth=2, embedding_dim=8, image_size=32,
                        class_names=["background", "LV"], pixel_spacing=1.5)
    save_checkpoint(tmp_path / "mm.safetensors", UNet(config), {"stage": "finetune"})
    image = np.random.default_rng(0).random((3, 24, 20)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 5:10, 5:10] = 1
    for name, mm in (("metres", 0.0015), ("wide", 1000.0), ("fine", 1.0)):
        save_volume(tmp_path / f"{name}.nii.gz", image, np.diag([mm, mm, 3.0, 1.0]))
        save_volume(tmp_path / f"{name}_gt.nii.gz", labels, np.diag([mm, mm, 3.0, 1.0]))
    model = ("--model", tmp_path / "mm.safetensors")
    metres = str(tmp_path / "metres.nii.gz")
    finer = "its pixels of 0.0015 x 0.0015 mm are 1e+03 times finer than the model's 1.5 mm"
    user_error(coral("segment", metres, *model, "--out", tmp_path / "s.nii.gz", check=False), metres, finer,
               "metres or microns written as millimetres?")
    user_error(coral("embed", metres, *model, "--out", tmp_path / "e.csv", check=False), metres, finer)
    user_error(coral("finetune", metres, "--labels", tmp_path / "metres_gt.nii.gz", "--init",
                     tmp_path / "mm.safetensors", "--steps", 1, "--out", tmp_path / "f.safetensors", check=False),
               metres, finer)
    user_error(coral("pretrain", tmp_path / "fine.nii.gz", metres, "--pixel-spacing", 1.5, "--image-size", 32,
                     "--base-filters", 4, "--epochs", 1, "--out", tmp_path / "p.safetensors", check=False), metres,
               finer)
    wide = str(tmp_path / "wide.nii.gz")
    user_error(coral("segment", tmp_path / "fine.nii.gz", wide, *model, "--out-dir", tmp_path / "segs", check=False),
               wide, "its pixels of 1000 x 1000 mm are 667 times coarser", "stopped after segmenting the 1 volume")
    assert load_volume(tmp_path / "segs" / "fine_labels.nii.gz").shape == (3, 24, 20)


def test_a_model_at_a_pixel_spacing_sees_the_same_anatomy_in_a_wider_field_of_view(tmp_path):
    """--pixel-spacing gives a model a physical scale: a scan acquired with a wider field of view at the
    same spacing (the same slices padded by 32 pixels on every side) fine-tunes to the same weights and
    embeds to the same rows; its slices, wider than the model's square, are segmented in several windows of it."""
    from coral_core.checkpoint import load_checkpoint

    image, labels = make_phantom(7, n_slices=6)
    save_volume(tmp_path / "scan.nii.gz", image.array, image.affine)
    save_volume(tmp_path / "scan_gt.nii.gz", labels.array, labels.affine)
    pad = ((0, 0), (32, 32), (32, 32))
    save_volume(tmp_path / "wide.nii.gz", np.pad(image.array, pad, constant_values=image.array.min()), image.affine)
    save_volume(tmp_path / "wide_gt.nii.gz", np.pad(labels.array, pad), labels.affine)
    # 64 pixels at 3.6 mm: 230.4 mm, the phantom's 128 pixels of 1.8 mm
    common = ("--slices", "1,4", "--steps", 3, "--batch-size", 2, "--base-filters", 4, "--pixel-spacing", 3.6,
              "--image-size", 64, "--json")
    runs = {name: json.loads(coral("finetune", tmp_path / f"{name}.nii.gz", "--labels", tmp_path / f"{name}_gt.nii.gz",
                                   "--out", tmp_path / f"{name}.safetensors", *common).stdout) for name in ("scan", "wide")}
    assert runs["scan"]["final_loss"] == runs["wide"]["final_loss"]
    assert runs["wide"]["pixel_spacing"] == 3.6 and runs["wide"]["labels_outside_field_of_view"] == 0
    model, meta = load_checkpoint(tmp_path / "wide.safetensors")
    assert model.config.pixel_spacing == 3.6 and model.config.image_size == 64
    assert meta["training"]["shift"] == 0.25  # anatomy anywhere in a square (FINETUNE_TRANSLATE, as every model)
    for name in ("scan", "wide"):
        res = json.loads(coral("segment", tmp_path / f"{name}.nii.gz", "--model", tmp_path / "wide.safetensors",
                               "--out", tmp_path / f"{name}_seg.nii.gz", "--json").stdout)
        assert res["pixel_spacing"] == 3.6 and res["windows_per_slice"] == (9 if name == "wide" else 1)
        coral("embed", tmp_path / f"{name}.nii.gz", "--model", tmp_path / "wide.safetensors",
              "--out", tmp_path / f"{name}.csv")
    text = coral("segment", tmp_path / "wide.nii.gz", "--model", tmp_path / "wide.safetensors",
                 "--out", tmp_path / "wide_seg.nii.gz").stdout
    assert "each 345.6 x 345.6 mm slice was segmented in 9 overlapping windows of the 230.4 mm square" in text
    folder = json.loads(coral("segment", tmp_path / "scan.nii.gz", tmp_path / "wide.nii.gz", "--model",
                              tmp_path / "wide.safetensors", "--out-dir", tmp_path / "segs", "--json").stdout)
    assert [v["windows_per_slice"] for v in folder["volumes"]] == [1, 9]
    text = coral("segment", tmp_path / "scan.nii.gz", tmp_path / "wide.nii.gz", "--model",
                 tmp_path / "wide.safetensors", "--out-dir", tmp_path / "segs").stdout
    assert "1 of them wider than the 230.4 mm square the model sees" in text
    seg, wide = (load_volume(tmp_path / f"{name}_seg.nii.gz").array for name in ("scan", "wide"))
    assert wide.shape == (6, 192, 192) and seg.shape == (6, 128, 128)
    rows = [list(csv.reader(open(tmp_path / f"{name}.csv")))[1:] for name in ("scan", "wide")]
    assert [r[1:] for r in rows[0]] == [r[1:] for r in rows[1]]
    # the same scan fine-tuned from that model keeps its scale; another one is refused
    user_error(coral("finetune", tmp_path / "scan.nii.gz", "--labels", tmp_path / "scan_gt.nii.gz", "--init",
                     tmp_path / "wide.safetensors", "--pixel-spacing", 1.25, "--out", tmp_path / "x.safetensors",
                     check=False), "--pixel-spacing 1.25", "sees 3.6 mm")
    # the square is placed on the labels, where it holds the most of them; the rest are counted
    corner = np.zeros_like(labels.array)
    corner[2, :6, :6] = 1
    save_volume(tmp_path / "corner_gt.nii.gz", corner, labels.affine)
    common = ("--pixel-spacing", 1.8, "--image-size", 96, "--steps", 2, "--base-filters", 4, "--json")
    res = json.loads(coral("finetune", tmp_path / "scan.nii.gz", "--labels", tmp_path / "corner_gt.nii.gz",
                           "--out", tmp_path / "x.safetensors", *common).stdout)
    assert res["labels_outside_field_of_view"] == 0  # the centred square (rows and columns 16-111) held none
    apart = np.zeros_like(labels.array)
    apart[2, :6, :6] = 1  # 36 voxels, and 1600 in rows and columns 60-99: the 96-pixel square holds all 1600
    apart[2, 60:100, 60:100] = 2  # and at most 2 x 2 of the 36 (rows and columns 4-99)
    save_volume(tmp_path / "apart_gt.nii.gz", apart, labels.affine)
    res = json.loads(coral("finetune", tmp_path / "scan.nii.gz", "--labels", tmp_path / "apart_gt.nii.gz",
                           "--out", tmp_path / "x.safetensors", *common).stdout)
    assert res["labels_outside_field_of_view"] == 36 - 4
    # pretraining at a pixel spacing sees the same square of each scan, and a fine-tuning from it keeps the scale
    pre = {name: json.loads(coral("pretrain", tmp_path / f"{name}.nii.gz", "--epochs", 1, "--batch-size", 4,
                                  "--base-filters", 4, "--pixel-spacing", 3.6, "--image-size", 64,
                                  "--out", tmp_path / f"pre_{name}.safetensors", "--json").stdout)
           for name in ("scan", "wide")}
    assert pre["scan"]["final_loss"] == pre["wide"]["final_loss"]
    res = json.loads(coral("finetune", tmp_path / "wide.nii.gz", "--labels", tmp_path / "wide_gt.nii.gz", "--init",
                           tmp_path / "pre_wide.safetensors", "--steps", 2, "--out", tmp_path / "y.safetensors",
                           "--json").stdout)
    assert res["pixel_spacing"] == 3.6 and load_checkpoint(tmp_path / "y.safetensors")[0].config.pixel_spacing == 3.6


def test_a_warning_is_one_line(tmp_path):
    """A warning (here: a DICOM series with a slice missing, read as labels) is one line, `warning: ...`, as an error
    is `error: ...`: no source line, no ITK report."""
    from helpers import write_dicom_series

    labels = np.zeros((6, 8, 8), np.int16)
    labels[:, 2:5, 2:5] = 1
    gap = write_dicom_series(tmp_path / "gap", labels, skip=(2,))
    proc = coral("evaluate", gap, gap)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {gap}: DICOM slices slice001.dcm and slice003.dcm are "
                                                   "8.00 mm apart"), proc.stderr  # once, for PRED and TRUTH alike


def test_a_dicom_seg_as_labels(tmp_path):
    """A DICOM SEG file (as segmentation tools export annotations) is taken as the labels of the image it was drawn
    on: `coral finetune --labels` trains as on the same labels in NIfTI and names the classes after its segments,
    and `coral evaluate` scores against it; two SEG files, or a SEG given as the scan, are refused in one sentence."""
    from helpers import write_dicom_seg

    img, lab = make_phantom(11, n_slices=6)
    affine = oblique_affine((1.8, 1.8, 10.0))
    save_volume(tmp_path / "img.nii.gz", img.array, affine)
    painted = lab.array.copy()
    painted[[0, 2, 5]] = 0  # three slices painted
    save_volume(tmp_path / "lab.nii.gz", painted, affine)
    image = load_volume(tmp_path / "img.nii.gz")
    write_dicom_seg(tmp_path / "lab.dcm", load_volume(tmp_path / "lab.nii.gz").array, image.affine,
                    ["RV", "myocardium", "LV"])
    runs = {name: json.loads(coral("finetune", tmp_path / "img.nii.gz", "--labels", tmp_path / name, "--steps", 2,
                                   *TINY, "--out", tmp_path / f"{name}.safetensors", "--json").stdout)
            for name in ("lab.nii.gz", "lab.dcm")}
    assert runs["lab.dcm"]["slices"] == runs["lab.nii.gz"]["slices"] == [1, 3, 4]
    assert runs["lab.dcm"]["final_loss"] == runs["lab.nii.gz"]["final_loss"]
    info = json.loads(coral("info", tmp_path / "lab.dcm.safetensors", "--json").stdout)["models"][0]
    assert info["classes"] == ["RV", "myocardium", "LV"]
    scores = json.loads(coral("evaluate", tmp_path / "lab.nii.gz", tmp_path / "lab.dcm", "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0}
    user_error(coral("evaluate", tmp_path / "lab.dcm", tmp_path / "lab.dcm", check=False),
               "both DICOM SEG or RT structure set files", "give the image they were drawn on with --image IMAGE")
    user_error(coral("segment", tmp_path / "lab.dcm", "--out", tmp_path / "s.nii.gz", check=False),
               "lab.dcm: is a DICOM SEG segmentation, not an image", "coral finetune IMAGE --labels SEG")


def test_an_rt_structure_set_as_labels(tmp_path):
    """An RT structure set (contours, as radiotherapy planning exports them) is taken as the labels of the image it
    was drawn on, its contours filled on the image's grid and its ROIs' names the classes: `coral finetune --labels`
    trains on the slices it outlines, `coral evaluate` scores against it (and a SEG against it on --image)."""
    from helpers import write_dicom_seg, write_rt_structure_set

    img, _ = make_phantom(11, n_slices=6)
    affine = oblique_affine((1.8, 1.8, 10.0))
    save_volume(tmp_path / "img.nii.gz", img.array, affine)

    def box(i0, i1, j0, j1):
        return [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]

    rs = write_rt_structure_set(tmp_path / "RS.dcm", affine, (
        ("GTV", "GTV", [(1, box(40, 60, 50, 70)), (4, box(30, 50, 40, 60))]),
        ("Lung_L", "ORGAN", [(1, box(70, 90, 30, 50))])))
    truth = np.zeros(img.shape, np.uint8)
    truth[1, 50:71, 40:61], truth[4, 40:61, 30:51], truth[1, 30:51, 70:91] = 1, 1, 2
    save_volume(tmp_path / "truth.nii.gz", truth, affine)
    run = json.loads(coral("finetune", tmp_path / "img.nii.gz", "--labels", rs, "--steps", 2, *TINY,
                           "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert run["slices"] == [1, 4]
    assert json.loads(coral("info", tmp_path / "m.safetensors", "--json").stdout)["models"][0]["classes"] == [
        "GTV", "Lung_L"]
    scores = json.loads(coral("evaluate", tmp_path / "truth.nii.gz", rs, "--json").stdout)
    assert scores["dice"] == {"GTV": 1.0, "Lung_L": 1.0}
    seg = write_dicom_seg(tmp_path / "seg.dcm", truth, affine, ["GTV", "Lung_L"])  # contours against a SEG: on IMAGE
    scores = json.loads(coral("evaluate", seg, rs, "--image", tmp_path / "img.nii.gz", "--json").stdout)
    assert scores["dice"] == {"GTV": 1.0, "Lung_L": 1.0}


def test_segment_a_dicom_series_into_a_dicom_seg(tmp_path):
    """`coral segment SERIES --out x.dcm` writes the labels as a DICOM SEG on the series' images, its segments named
    after the model's classes: the labels it writes to NIfTI, as an independent reader (highdicom) and `coral
    evaluate` see them. A SEG for an image not read from DICOM is refused before the model runs."""
    hd = pytest.importorskip("highdicom")
    from helpers import write_dicom_series

    img, _ = make_phantom(11, n_slices=6)
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    series = write_dicom_series(tmp_path / "sax", np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8),
                                series_uid=uid)
    done = json.loads(coral("segment", series, "--out", tmp_path / "pred.dcm", "--json").stdout)
    assert done["labels"] == str(tmp_path / "pred.dcm") and done["shape"] == [6, 128, 128]
    coral("segment", series, "--out", tmp_path / "pred.nii.gz")
    labels = load_volume(tmp_path / "pred.nii.gz").array
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    seg = hd.seg.segread(tmp_path / "pred.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["RV", "myocardium", "LV"]
    by_source = seg.get_pixels_by_source_instance([f"{uid}.{k + 1}" for k in range(6)], combine_segments=True)
    np.testing.assert_array_equal(by_source, labels)  # slice k is file k, its rows and columns as stored
    scores = json.loads(coral("evaluate", tmp_path / "pred.dcm", tmp_path / "pred.nii.gz", "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0}
    save_volume(tmp_path / "img.nii.gz", img.array, np.eye(4))
    user_error(coral("segment", tmp_path / "img.nii.gz", "--out", tmp_path / "x.dcm", check=False),
               "x.dcm: a DICOM SEG refers to the DICOM images it labels", "img.nii.gz is not a DICOM image series")
    assert not list(tmp_path.glob("*x.dcm*"))


def test_segment_a_dicom_series_into_an_rt_structure_set(tmp_path):
    """`coral segment SERIES --out rs.dcm --rt-struct` writes the labels as an RT structure set on the series'
    images, its ROIs named after the model's classes, which `coral evaluate` and `coral finetune` read back as the
    labels written to NIfTI; `--out-dir --rt-struct` writes one per DICOM input. Misuse: one sentence, nothing run."""
    import pydicom

    from helpers import write_dicom_series

    img, _ = make_phantom(11, n_slices=6)
    uid = "1.2.826.0.1.3680043.2.1125.1.4243"
    series = write_dicom_series(tmp_path / "sax", np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8),
                                series_uid=uid)
    done = json.loads(coral("segment", series, "--out", tmp_path / "rs.dcm", "--rt-struct", "--json").stdout)
    assert done["labels"] == str(tmp_path / "rs.dcm")
    coral("segment", series, "--out", tmp_path / "pred.nii.gz")
    rs = pydicom.dcmread(tmp_path / "rs.dcm")
    assert rs.Modality == "RTSTRUCT" and [r.ROIName for r in rs.StructureSetROISequence] == ["RV", "myocardium", "LV"]
    assert {i.ReferencedSOPInstanceUID for roi in rs.ROIContourSequence for c in roi.ContourSequence
            for i in c.ContourImageSequence} <= {f"{uid}.{k + 1}" for k in range(6)}
    scores = json.loads(coral("evaluate", tmp_path / "rs.dcm", tmp_path / "pred.nii.gz", "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0}
    run = json.loads(coral("finetune", series, "--labels", tmp_path / "rs.dcm", "--steps", 2, *TINY,
                           "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert run["slices"] == [k for k in range(6) if load_volume(tmp_path / "pred.nii.gz").array[k].any()]
    coral("segment", series, tmp_path / "pred.nii.gz", "--out-dir", tmp_path / "out", "--rt-struct")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["pred_labels.nii.gz", "sax_labels.dcm"]
    assert pydicom.dcmread(tmp_path / "out" / "sax_labels.dcm").Modality == "RTSTRUCT"
    user_error(coral("segment", series, "--out", tmp_path / "x.nii.gz", "--rt-struct", check=False),
               "x.nii.gz: --rt-struct writes a DICOM RT structure set; end the output's name with .dcm")
    user_error(coral("segment", series, "--out-dir", tmp_path / "y", "--rt-struct", "--dicom-seg", check=False),
               "give --dicom-seg or --rt-struct, not both")
    user_error(coral("segment", tmp_path / "pred.nii.gz", "--out", tmp_path / "x.dcm", "--rt-struct", check=False),
               "x.dcm: a DICOM RT structure set refers to the DICOM images it labels")
    assert not list(tmp_path.glob("x.*")) and not (tmp_path / "y").exists()


def test_a_cine_dicom_series_segments_into_dicom_labels_that_evaluate_and_train_frame_by_frame(tmp_path):
    """`coral segment CINE --out x.dcm` (or --rt-struct) writes every frame's labels on the images of that frame, as
    an independent reader (highdicom) sees them; `coral evaluate` scores them against the 4-D NIfTI given the cine
    with --image (without it, one sentence), and `coral finetune CINE --labels x.dcm` trains on each labelled frame."""
    hd = pytest.importorskip("highdicom")
    from helpers import write_dicom_series

    img, _ = make_phantom(11, n_slices=5)
    frames = np.stack([img.array, np.roll(img.array, 4, axis=-1)])  # the heart moved in the second phase
    uid = "1.2.826.0.1.3680043.2.1125.1.4246"
    cine = write_dicom_series(tmp_path / "cine", np.round(frames * 1000), spacing_zyx=(10.0, 1.8, 1.8), series_uid=uid)
    done = json.loads(coral("segment", cine, "--out", tmp_path / "pred.dcm", "--json").stdout)
    assert done["shape"] == [2, 5, 128, 128]
    coral("segment", cine, "--out", tmp_path / "pred.nii.gz")
    labels = load_frames(tmp_path / "pred.nii.gz")
    labels = np.stack([frame.array for frame in labels])
    assert labels.shape == (2, 5, 128, 128) and set(np.unique(labels)) == {0, 1, 2, 3}
    by_source = hd.seg.segread(tmp_path / "pred.dcm").get_pixels_by_source_instance(
        [f"{uid}.{n + 1}" for n in range(10)], combine_segments=True)  # file n: frame n // 5, slice n % 5
    np.testing.assert_array_equal(by_source, labels.reshape(10, 128, 128))
    scores = json.loads(coral("evaluate", tmp_path / "pred.dcm", tmp_path / "pred.nii.gz", "--image", cine,
                              "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0} and len(scores["frames"]) == 2
    user_error(coral("evaluate", tmp_path / "pred.dcm", tmp_path / "pred.nii.gz", check=False),
               "pred.dcm: DICOM labels of a cine series name the DICOM image of each frame, which",
               "pred.nii.gz is not; give the series they were drawn on with --image IMAGE")
    coral("segment", cine, "--out", tmp_path / "rs.dcm", "--rt-struct")
    scores = json.loads(coral("evaluate", tmp_path / "rs.dcm", tmp_path / "pred.dcm", "--image", cine,
                              "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0}
    run = json.loads(coral("finetune", cine, "--labels", tmp_path / "rs.dcm", "--steps", 2, *TINY,
                           "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert run["images"] == [f"{cine} frame 0", f"{cine} frame 1"]
    assert run["slices"] == [[k for k in range(5) if labels[t, k].any()] for t in range(2)]
    coral("segment", cine, "--out-dir", tmp_path / "out", "--dicom-seg")  # one SEG per DICOM input, a cine's too
    again = hd.seg.segread(tmp_path / "out" / "cine_labels.dcm")
    np.testing.assert_array_equal(again.get_pixels_by_source_instance([f"{uid}.{n + 1}" for n in range(10)],
                                                                      combine_segments=True), by_source)
    # a dataset folder of the cine and its 4-D labels: each case's SEG is placed on its own cine's frames
    (tmp_path / "ds").mkdir()
    cine.rename(tmp_path / "ds" / "cine")
    (tmp_path / "pred.nii.gz").rename(tmp_path / "ds" / "cine_labels.nii.gz")
    scores = json.loads(coral("evaluate", tmp_path / "out", tmp_path / "ds", "--json").stdout)
    assert scores["dice"] == {"RV": 1.0, "myocardium": 1.0, "LV": 1.0}


def test_a_dataset_case_without_a_structure_is_left_out_with_one_line(tmp_path):
    """In a dataset folder, a case whose labels lack one of --structures (not contoured in that patient) is left out
    of fine-tuning and of evaluation with one warning line each, as a case without labels is; none left: exit 2. A
    label file named with --labels must hold them all."""
    root = tmp_path / "rt"
    root.mkdir()
    for k in range(3):
        img, lab = make_phantom(40 + k, n_slices=5)
        save_volume(root / f"ct_100{k + 1}_image.nii.gz", img.array, np.eye(4))
        names = ["background", "RV", "myocardium", "LV" if k != 1 else "Aorta"]  # case 2 has no LV
        save_volume(root / f"ct_100{k + 1}_label.nii.gz", lab.array, np.eye(4), names)
    missing = root / "ct_1002_label.nii.gz"
    proc = coral("finetune", root, "--structures", "LV,RV", "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors",
                 "--json")
    res = json.loads(proc.stdout)
    assert [Path(p).name for p in res["images"]] == ["ct_1001_image.nii.gz", "ct_1003_image.nii.gz"]
    assert res["skipped_without_structures"] == [str(missing)]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")] == [
        f"warning: {missing}: holds no structure named 'LV'; it holds RV, myocardium, Aorta (names are matched "
        "without regard to case); the case is left out"]
    text = coral("finetune", root, "--structures", "LV,RV", "--steps", 1, *TINY, "--out", tmp_path / "m.safetensors").stdout
    assert "(1 case without every structure left out)" in text
    user_error(coral("finetune", root, "--structures", "Lung", "--steps", 1, *TINY, "--out", tmp_path / "x.safetensors",
                     check=False), "ct_1001_label.nii.gz: holds no structure named 'Lung'",
               "(names are matched without regard to case), nor does any other case; give names that every case holds")
    user_error(coral("finetune", root / "ct_1002_image.nii.gz", "--labels", missing, "--structures", "LV", "--steps", 1,
                     *TINY, "--out", tmp_path / "x.safetensors", check=False), "holds no structure named 'LV'")
    assert not (tmp_path / "x.safetensors").exists()
    coral("segment", root, "--model", tmp_path / "m.safetensors", "--out-dir", tmp_path / "seg")
    proc = coral("evaluate", tmp_path / "seg", root, "--structures", "LV,RV", "--json")
    res = json.loads(proc.stdout)
    assert len(res["cases"]) == 2 and res["without_structures"] == [str(missing)]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")] == [
        f"warning: {missing}: holds no structure named 'LV'; it holds RV, myocardium, Aorta (names are matched "
        "without regard to case); the case is not scored"]
    assert "not scored: 1 case(s) without every structure of --structures (ct_1002_label.nii.gz)" in coral(
        "evaluate", tmp_path / "seg", root, "--structures", "LV,RV").stdout


def test_structures_picked_by_name_for_finetune_and_evaluate(tmp_path):
    """`--structures LV,RV` takes those ROIs of an RT structure set (any others, here a body outline drawn first,
    left out) as classes 1, 2 in that order: `coral finetune` trains a model of those classes, named so, and `coral
    evaluate` scores its segmentation against the structure set by the same names. A name the file lacks, or
    --structures with --label-values: exit 2, one sentence, before any training."""
    import pydicom

    from coral_core.dicomlabels import save_rt_structure_set
    from helpers import write_dicom_series

    img, lab = make_phantom(13, n_slices=6)
    series = write_dicom_series(tmp_path / "ct", np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8))
    image = load_volume(series)
    rs = save_rt_structure_set(tmp_path / "rs.dcm", lab.array, image, ["background", "RV", "myocardium", "LV"])
    run = json.loads(coral("finetune", series, "--labels", rs, "--structures", "lv,RV", "--steps", 2, *TINY,
                           "--out", tmp_path / "m.safetensors", "--json").stdout)
    assert run["slices"] == [k for k in range(6) if (np.isin(lab.array[k], (1, 3))).any()]
    (model,) = json.loads(coral("info", tmp_path / "m.safetensors", "--json").stdout)["models"]
    assert model["classes"] == ["LV", "RV"] and model["training"]["structures"] == ["lv", "RV"]  # as the file spells
    assert model["trained"] == (f"fine-tuned for 2 steps on {len(run['slices'])} slices of ct (structures lv, RV), "
                                "from random weights")
    coral("segment", series, "--model", tmp_path / "m.safetensors", "--out", tmp_path / "pred.nii.gz")
    scores = json.loads(coral("evaluate", tmp_path / "pred.nii.gz", rs, "--structures", "lv,rv", "--json").stdout)
    assert list(scores["dice"]) == ["LV", "RV"]
    truth = np.select([lab.array == 3, lab.array == 1], [1, 2], 0)
    pred = load_volume(tmp_path / "pred.nii.gz").array
    expected = 2 * np.count_nonzero((pred == 1) & (truth == 1)) / (np.count_nonzero(pred == 1) + np.count_nonzero(truth == 1))
    assert scores["dice"]["LV"] == pytest.approx(expected)
    unnamed = coral("evaluate", tmp_path / "pred.nii.gz", rs, "--json")  # LV, RV against RV, myocardium, LV
    assert "warning: PRED names its classes LV, RV and TRUTH RV, myocardium, LV; they are compared by number (1 with " \
           "1, ...); give --structures NAME,... to compare them by name" in unnamed.stderr
    user_error(coral("finetune", series, "--labels", rs, "--structures", "LV,Aorta", "--steps", 2, *TINY,
                     "--out", tmp_path / "x.safetensors", check=False),
               "rs.dcm: holds no structure named 'Aorta'; it holds RV, myocardium, LV")
    user_error(coral("evaluate", tmp_path / "pred.nii.gz", rs, "--structures", "LV", "--label-values", "3",
                     check=False), "give --structures (by name) or --label-values (by value), not both")
    # NAME|OTHER: a structure named differently from file to file, the class named by the first name
    run = json.loads(coral("finetune", series, "--labels", rs, "--structures", "Left ventricle|lv,RV", "--steps", 1,
                           *TINY, "--out", tmp_path / "alt.safetensors", "--json").stdout)
    (model,) = json.loads(coral("info", tmp_path / "alt.safetensors", "--json").stdout)["models"]
    assert model["classes"] == ["Left ventricle", "RV"] and model["training"]["structures"] == ["Left ventricle|lv", "RV"]
    coral("segment", series, "--model", tmp_path / "alt.safetensors", "--out", tmp_path / "alt.nii.gz")
    scores = json.loads(coral("evaluate", tmp_path / "alt.nii.gz", rs, "--structures", "Left ventricle|LV,rv",
                              "--json").stdout)  # PRED's "Left ventricle", TRUTH's "LV"
    assert list(scores["dice"]) == ["Left ventricle", "RV"]
    user_error(coral("evaluate", tmp_path / "alt.nii.gz", rs, "--structures", "LV|rv,RV", check=False),
               "--structures LV|rv,RV: a name is listed twice; give each structure once")
    assert not (tmp_path / "x.safetensors").exists() and pydicom.dcmread(rs).Modality == "RTSTRUCT"


def test_a_study_of_dicom_series_with_seg_labels_as_a_dataset(tmp_path):
    """A folder of DICOM series with DICOM SEG files referring to them (one in a SEG series' folder, as TCIA exports
    it): `coral finetune FOLDER` trains on the labelled series, `coral segment FOLDER --out-dir` segments the series
    (the SEG folder is no image), also into SEG files (--dicom-seg) and RT structure sets (--rt-struct), and `coral
    evaluate` scores each prediction against its series' SEG, a SEG or structure set prediction as the same labels in
    NIfTI."""
    from coral_core.dicomlabels import save_dicom_seg
    from helpers import write_dicom_series

    study = tmp_path / "study"
    for n, name in enumerate(("ct_a", "ct_b", "ct_c")):
        img, lab = make_phantom(20 + n, n_slices=5)
        image = load_volume(write_dicom_series(study / name, np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8),
                                               series_uid=f"1.2.826.0.1.3680043.9.8.{n}"))
        if name == "ct_a":
            (study / "300-Segmentation").mkdir()
            save_dicom_seg(study / "300-Segmentation" / "1-1.dcm", lab.array, image, ["bg", "RV", "myocardium", "LV"])
        elif name == "ct_b":
            save_dicom_seg(study / "ct_b_annotation.dcm", lab.array, image, ["bg", "RV", "myocardium", "LV"])
    run = json.loads(coral("finetune", study, "--steps", 2, *TINY, "--out", tmp_path / "m.safetensors",
                           "--json").stdout)
    assert [Path(p).name for p in run["images"]] == ["ct_a", "ct_b"] and run["slices"] == [[0, 1, 2, 3, 4]] * 2
    assert [Path(p).name for p in run["skipped_without_labels"]] == ["ct_c"]
    coral("segment", study, "--out-dir", tmp_path / "pred")
    assert sorted(f.name for f in (tmp_path / "pred").iterdir()) == [f"ct_{c}_labels.nii.gz" for c in "abc"]
    scores = json.loads(coral("evaluate", tmp_path / "pred", study, "--json").stdout)
    assert sorted(case["name"] for case in scores["cases"]) == ["ct_a", "ct_b"]
    coral("segment", study, "--out-dir", tmp_path / "seg", "--dicom-seg")  # the same labels, as SEG files
    assert sorted(f.name for f in (tmp_path / "seg").iterdir()) == [f"ct_{c}_labels.dcm" for c in "abc"]
    as_seg = json.loads(coral("evaluate", tmp_path / "seg", study, "--json").stdout)  # SEG against SEG: on the image
    assert [(c["name"], c["dice"]) for c in as_seg["cases"]] == [(c["name"], c["dice"]) for c in scores["cases"]]
    coral("segment", study, "--out-dir", tmp_path / "rs", "--rt-struct")  # and as RT structure sets
    assert sorted(f.name for f in (tmp_path / "rs").iterdir()) == [f"ct_{c}_labels.dcm" for c in "abc"]
    as_rs = json.loads(coral("evaluate", tmp_path / "rs", study, "--json").stdout)
    assert [(c["name"], c["dice"]) for c in as_rs["cases"]] == [(c["name"], c["dice"]) for c in scores["cases"]]
    user_error(coral("segment", study / "ct_a", "--out", tmp_path / "x.nii.gz", "--dicom-seg", check=False),
               "--dicom-seg goes with --out-dir")


def test_main_in_process_gives_warnings_and_ctrl_c_back(tmp_path, capsys):
    """A program calling `coral_core.cli.main` gets one-line warnings and Ctrl-C handling only while the command
    runs: its own warning printer and SIGINT handler are back afterwards, whether the command ended well or not."""
    import signal
    import warnings

    from coral_core.cli import main
    from helpers import write_dicom_series

    labels = np.zeros((6, 8, 8), np.int16)
    labels[:, 2:5, 2:5] = 1
    gap = write_dicom_series(tmp_path / "gap", labels, skip=(2,))
    showwarning, sigint = warnings.showwarning, signal.getsignal(signal.SIGINT)
    assert main(["evaluate", str(gap), str(gap), "--json"]) == 0
    assert capsys.readouterr().err.startswith(f"warning: {gap}: DICOM slices slice001.dcm and slice003.dcm")
    assert main(["finetune", str(tmp_path / "absent.nii.gz"), "--labels", str(tmp_path / "absent_gt.nii.gz"),
                 "--out", str(tmp_path / "m.safetensors")]) == 2  # after pretrain/finetune took Ctrl-C over
    assert capsys.readouterr().err.startswith("error: ")
    assert warnings.showwarning is showwarning and signal.getsignal(signal.SIGINT) is sigint


def test_segment_a_cine_series_frame_by_frame(tmp_path):
    """A 4-D cine file is segmented frame by frame into one 4-D label file of its geometry, each frame
    labelled as segmenting that frame alone labels it; MHA and NRRD hold a series' labels as NIfTI does."""
    from helpers import oblique_affine, write_nifti_ijk

    movie = [make_phantom(80 + t, n_slices=5)[0].array for t in range(3)]
    affine = oblique_affine()
    write_nifti_ijk(tmp_path / "cine.nii.gz", np.stack([f.transpose(2, 1, 0) for f in movie], -1), affine)
    res = json.loads(coral("segment", tmp_path / "cine.nii.gz", "--out", tmp_path / "cine_labels.nii.gz",
                           "--json").stdout)
    assert res["shape"] == [3, *movie[0].shape]
    import nibabel as nib

    written = nib.load(str(tmp_path / "cine_labels.nii.gz"))
    assert written.shape == (*movie[0].shape[::-1], 3) and np.allclose(written.affine, affine, atol=1e-5)
    for t in (0, 2):
        save_volume(tmp_path / "frame.nii.gz", movie[t], affine)
        coral("segment", tmp_path / "frame.nii.gz", "--out", tmp_path / "frame_labels.nii.gz")
        alone = load_volume(tmp_path / "frame_labels.nii.gz").array
        np.testing.assert_array_equal(np.asarray(written.dataobj)[..., t].transpose(2, 1, 0), alone)
    text = coral("segment", tmp_path / "cine.nii.gz", "--out", tmp_path / "cine_labels.nii.gz").stdout
    assert "(3 frames of 5 slices)" in text
    # scored frame by frame against a series of the same shape: each frame as coral evaluate scores it alone
    truth = np.stack([make_phantom(80 + t, n_slices=5)[1].array.astype(np.uint8) for t in range(3)])
    write_nifti_ijk(tmp_path / "cine_truth.nii.gz", np.stack([f.transpose(2, 1, 0) for f in truth], -1), affine)
    series = json.loads(coral("evaluate", tmp_path / "cine_labels.nii.gz", tmp_path / "cine_truth.nii.gz",
                              "--json").stdout)
    alone = []
    for t in range(3):
        save_volume(tmp_path / "p.nii.gz", np.asarray(written.dataobj)[..., t].transpose(2, 1, 0), affine)
        save_volume(tmp_path / "t.nii.gz", truth[t], affine)
        alone.append(json.loads(coral("evaluate", tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", "--json").stdout))
    assert [f["mean_dice"] for f in series["frames"]] == [a["mean_dice"] for a in alone]
    assert np.isclose(series["mean_dice"], np.mean([a["mean_dice"] for a in alone]))
    assert np.isclose(series["dice"]["RV"], np.mean([a["dice"]["1"] for a in alone]))  # the series names its classes
    assert "3 frames; each number is the mean over the frames" in coral(
        "evaluate", tmp_path / "cine_labels.nii.gz", tmp_path / "cine_truth.nii.gz").stdout
    assert series["hd95_missed"] == {"RV": 0, "myocardium": 0, "LV": 0}
    # frame 1's RV left out of the prediction: its infinite HD95 is counted, not silently dropped from the mean
    pred = np.asarray(written.dataobj).copy()
    pred[..., 1][pred[..., 1] == 1] = 0
    write_nifti_ijk(tmp_path / "cine_missed.nii.gz", pred, affine)
    series = json.loads(coral("evaluate", tmp_path / "cine_missed.nii.gz", tmp_path / "cine_truth.nii.gz",
                              "--json").stdout)
    assert series["hd95_missed"] == {"1": 1, "2": 0, "3": 0}
    assert np.isclose(series["hd95"]["1"], np.mean([alone[t]["hd95"]["1"] for t in (0, 2)]))
    assert "HD95 leaves out 1 frame-class pair(s) with an infinite distance" in coral(
        "evaluate", tmp_path / "cine_missed.nii.gz", tmp_path / "cine_truth.nii.gz").stdout
    user_error(coral("evaluate", tmp_path / "cine_labels.nii.gz", tmp_path / "t.nii.gz", check=False),
               "3 frames of (5, 128, 128)", "differs from")
    coral("segment", tmp_path / "cine.nii.gz", "--out", tmp_path / "cine_labels.mha")  # the same labels, as MHA
    as_mha = load_frames(tmp_path / "cine_labels.mha")
    assert len(as_mha) == 3 and np.allclose(as_mha[0].affine, affine, atol=1e-5)
    for t, frame in enumerate(as_mha):
        np.testing.assert_array_equal(frame.array, np.asarray(written.dataobj)[..., t].transpose(2, 1, 0))
    assert read_class_names(tmp_path / "cine_labels.mha") == read_class_names(tmp_path / "cine_labels.nii.gz")
    import SimpleITK as sitk  # a cine in an ITK format: --out-dir writes its labels in that format

    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.stack(movie), isVector=False), str(tmp_path / "in" / "cine2.nrrd"))
    coral("segment", tmp_path / "in", "--out-dir", tmp_path / "out")
    assert [f.name for f in (tmp_path / "out").iterdir()] == ["cine2_labels.nrrd"]
    assert frame_count(tmp_path / "out" / "cine2_labels.nrrd") == 3
    from helpers import write_dicom_series  # a cine as a scanner exports it: one DICOM series, 3 images per slice

    dicom = write_dicom_series(tmp_path / "cine3", np.round(np.stack(movie) * 1000), spacing_zyx=(8.0, 1.5, 1.5))
    proc = coral("segment", dicom, "--out", tmp_path / "cine3_labels.nii.gz")
    assert "(3 frames of 5 slices)" in proc.stdout and not proc.stderr.strip(), proc.stderr
    assert nib.load(str(tmp_path / "cine3_labels.nii.gz")).shape == (*movie[0].shape[::-1], 3)


def test_bench_embedding_draws_both_methods(tmp_path):
    res = json.loads(coral("bench", "embedding", "--out", tmp_path / "fig.png", "--phantom", 3, "--epochs", 1,
                           "--show", 2, "--json", "--device", "cpu").stdout)
    assert set(res["scores"]) == {"pcl", "coral"}
    assert all(-1 <= s["pooled"] <= 1 and len(s["subjects"]) == 2 for s in res["scores"].values())
    assert (tmp_path / "fig.png").stat().st_size > 20_000


def test_pretraining_inputs_are_prepared_as_they_are_read(tmp_path):
    """A wide volume (in-plane over the automatic size's 256 cap) is normalised and resampled as
    soon as it is read, so full-resolution volumes never sit in memory together; the slices the
    model sees are those of reading everything first."""
    import torch

    from coral_core.cli import _read_inputs
    from coral_core.data import PretrainSlices
    from coral_core.volume import load_volume
    from helpers import write_nifti_ijk

    rng = np.random.default_rng(0)
    wide = write_nifti_ijk(tmp_path / "wide.nii.gz", rng.random((280, 272, 3)).astype(np.float32), np.eye(4))
    small = write_nifti_ijk(tmp_path / "small.nii.gz", rng.random((48, 40, 4)).astype(np.float32), np.eye(4))
    arrays = [load_volume(path).array for path in (small, wide)]  # discovery order: by name

    volumes, names, shapes, size = _read_inputs([str(tmp_path)], 0, 0)
    assert names == ["small", "wide"] and shapes == [a.shape for a in arrays] and size == 256
    assert isinstance(volumes[0], np.ndarray) and isinstance(volumes[1], torch.Tensor)
    assert volumes[1].shape == (arrays[1].shape[0], 1, 256, 256)
    assert torch.equal(PretrainSlices(volumes, size).images, PretrainSlices(arrays, size).images)

    volumes, _, _, size = _read_inputs([str(tmp_path)], 0, 0, requested_size=32)
    assert size == 32 and all(v.shape[1:] == (1, 32, 32) for v in volumes)
    assert torch.equal(PretrainSlices(volumes, 32).images, PretrainSlices(arrays, 32).images)


def test_pretraining_can_hold_its_slices_in_float16(tmp_path):
    """--slices-float16 halves the slice set's memory; the checkpoint records it, and the slices
    are those of float32 to float16's precision."""
    import torch

    from coral_core.checkpoint import load_checkpoint
    from coral_core.data import PretrainSlices

    out = tmp_path / "p16.safetensors"
    proc = coral("pretrain", "--phantom", 2, "--epochs", 1, "--batch-size", 8, *TINY, "--slices-float16", "--out", out,
                 "--json", "--device", "cpu")
    assert json.loads(proc.stdout)["checkpoint"] == str(out)
    _, meta = load_checkpoint(out)
    assert meta["training"]["slices"] == "float16"
    from coral_core.levers import cpu_has_amx

    assert meta["training"]["compute"] == ("bf16" if cpu_has_amx() else "float32")  # the CPU's default
    proc = coral("pretrain", "--phantom", 2, "--epochs", 1, "--batch-size", 8, *TINY, "--no-cpu-bf16", "--out", out,
                 "--json", "--device", "cpu")
    assert load_checkpoint(out)[1]["training"]["compute"] == "float32"
    volumes = [make_phantom(3)[0].array]
    half = PretrainSlices(volumes, 32, dtype=torch.float16)
    assert half.images.dtype == torch.float16
    torch.testing.assert_close(half.images.float(), PretrainSlices(volumes, 32).images, atol=1e-3, rtol=0)


def test_a_one_slice_image_is_segmented_and_embedded_and_said_so(tmp_path):
    """A single 2-D slice: one slice, and no ordinal consistency (it needs two), in words and in JSON."""
    img, _ = make_phantom(5, n_slices=8)
    save_volume(tmp_path / "one.nii.gz", img.array[3:4], img.affine)
    seg = coral("segment", tmp_path / "one.nii.gz", "--out", tmp_path / "seg.nii.gz").stdout
    assert "(1 slice)" in seg and load_volume(tmp_path / "seg.nii.gz").shape == (1, *img.shape[1:])
    text = coral("embed", tmp_path / "one.nii.gz", "--out", tmp_path / "e.csv").stdout
    assert "embedded 1 volume; no ordinal consistency" in text and "nan" not in text
    res = json.loads(coral("embed", tmp_path / "one.nii.gz", "--out", tmp_path / "e.csv", "--json").stdout)
    assert res["ordinal_consistency"] is None
