"""The plugin in a real napari viewer (pytest-qt; CI runs it under xvfb)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import torch
import pytest

pytest.importorskip("napari")
from qtpy.QtCore import Qt, QTimer  # noqa: E402

from coral_core.errors import UserError  # noqa: E402
from coral_core.metrics import dice_per_class  # noqa: E402
from coral_core.model import UNetConfig, build_model  # noqa: E402
from coral_core.volume import load_volume, read_class_names  # noqa: E402
from helpers import oblique_affine, write_nifti_ijk  # noqa: E402
from napari_coral._layers import has_spacing, layer_spacing_mm  # noqa: E402
from napari_coral._reader import get_reader  # noqa: E402
from napari_coral._session import session_for  # noqa: E402
from napari_coral._widgets._common import alive, class_colormap  # noqa: E402

WIDGETS = ("Model", "Segment", "Fine-tune", "Embedding")


@pytest.fixture(autouse=True)
def coral_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CORAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def viewer(make_napari_viewer):
    v = make_napari_viewer()
    v.open_sample("napari-coral", "phantom")
    return v


def dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget("napari-coral", name)
    return widget


def mean_dice(pred, truth, slices):
    d = dice_per_class(pred[slices], truth[slices], 4)
    return float(np.nanmean(list(d.values())))


# --------------------------------------------------------------------------- reader / writer / sample


def test_reader_keeps_anisotropic_spacing_and_opens_label_maps_as_labels(tmp_path, make_napari_viewer):
    affine = oblique_affine((0.7, 0.9, 3.5))
    write_nifti_ijk(tmp_path / "scan.nii.gz", np.random.rand(20, 16, 6).astype(np.float32), affine)
    write_nifti_ijk(tmp_path / "scan_seg.nii.gz", np.random.randint(0, 3, (20, 16, 6)).astype(np.uint8), affine)
    assert get_reader(str(tmp_path / "notes.txt")) is None
    data, kwargs, kind = get_reader(str(tmp_path / "scan.nii.gz"))(str(tmp_path / "scan.nii.gz"))[0]
    assert kind == "image" and data.shape == (6, 16, 20)
    assert kwargs["scale"] == pytest.approx((3.5, 0.9, 0.7), abs=1e-5)
    np.testing.assert_allclose(kwargs["metadata"]["affine"], affine, atol=1e-5)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "scan.nii.gz"), plugin="napari-coral")
    viewer.open(str(tmp_path / "scan_seg.nii.gz"), plugin="napari-coral")
    image, seg = viewer.layers
    assert image.scale == pytest.approx([3.5, 0.9, 0.7], abs=1e-5)
    assert type(seg).__name__ == "Labels"
    assert [str(u) for u in image.units] == ["pixel"] * 3  # the default (read as mm): napari warns while units differ


def test_a_layer_in_micrometres_is_read_and_written_in_mm(tmp_path, make_napari_viewer):
    """A layer whose axes say micrometres (napari's units) has its scale converted to mm, where the plugin
    reads it (a model's physical scale, the field of view) and where it writes a file; 'pixel', napari's default,
    is read as mm, and only a plain array's scale of 1 counts as no spacing."""
    from napari.layers import Image

    viewer = make_napari_viewer()
    labels = np.random.randint(0, 4, (5, 10, 12)).astype(np.uint8)
    layer = viewer.add_labels(labels, scale=(5000.0, 1100.0, 1200.0), units="um", name="in micrometres")
    assert layer_spacing_mm(layer) == pytest.approx((5.0, 1.1, 1.2))
    layer.save(str(tmp_path / "micro.nii.gz"), plugin="napari-coral")
    back = load_volume(tmp_path / "micro.nii.gz")
    np.testing.assert_array_equal(back.array, labels)
    assert back.spacing == pytest.approx((5.0, 1.1, 1.2))
    plain = Image(np.zeros((2, 4, 5)))  # not (..., 4): napari 0.5 takes a last axis of 3 or 4 as colour
    assert layer_spacing_mm(plain) == (1.0, 1.0, 1.0) and not has_spacing(plain)
    assert has_spacing(Image(np.zeros((2, 4, 5)), units="mm")) and has_spacing(Image(np.zeros((2, 4, 5)), scale=(1, 1.8, 1.8)))


def test_writer_round_trip_restores_source_geometry(tmp_path, make_napari_viewer):
    affine = oblique_affine((1.1, 1.1, 5.0))
    labels = np.random.randint(0, 4, (12, 10, 5)).astype(np.uint8)
    write_nifti_ijk(tmp_path / "lab_seg.nii.gz", labels, affine)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "lab_seg.nii.gz"), plugin="napari-coral")
    layer = viewer.layers[0]
    layer.data[0, 0, 0] = 3
    assert "class" not in layer.features  # a label file of another program names no classes
    names = ["background", "RV", "myocardium", "LV"]
    layer.features = {"class": names}  # as Segment names its layer's classes
    for name in ("saved.nii.gz", "saved.mha", "saved.nrrd"):  # the formats the reader opens, MHD's pair aside
        layer.save(str(tmp_path / name), plugin="napari-coral")
        back = load_volume(tmp_path / name)
        np.testing.assert_array_equal(back.array, layer.data)
        np.testing.assert_allclose(back.affine, affine, atol=1e-4)
        assert read_class_names(tmp_path / name) == names
        reopened = viewer.open(str(tmp_path / name), plugin="napari-coral")[0]  # with its names, in Segment's colours
        assert list(reopened.features["class"]) == names
        assert tuple(reopened.colormap.map(np.array([3]))[0]) == tuple(class_colormap(4).map(np.array([3]))[0])


def test_labels_drawn_on_a_dicom_series_save_as_a_dicom_seg(tmp_path, make_napari_viewer, qtbot):
    """A Labels layer on a DICOM series saves as a DICOM SEG on the series' images (.dcm) and opens again on it:
    Segment's layer, corrected by hand, with its classes as segments (SEMIAUTOMATIC); a label file opened over the
    series (MANUAL). Labels on no DICOM image are refused in one sentence."""
    hd = pytest.importorskip("highdicom")
    from coral_core.phantom import make_phantom
    from coral_core.volume import save_volume
    from helpers import write_dicom_series

    img, truth = make_phantom(11, n_slices=6)
    uid = "1.2.826.0.1.3680043.2.1125.1.4243"
    sources = [f"{uid}.{k + 1}" for k in range(6)]
    series = write_dicom_series(tmp_path / "sax", np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8),
                                series_uid=uid)
    viewer = make_napari_viewer()
    image, = viewer.open(str(series / "slice002.dcm"), plugin="napari-coral")  # the series, from one of its files
    dock(viewer, "Segment").segment()
    qtbot.waitUntil(lambda: f"{image.name} labels" in viewer.layers, timeout=60_000)
    layer = viewer.layers[f"{image.name} labels"]
    layer.data[2, :6, :6] = 3  # a correction painted
    layer.save(str(tmp_path / "pred.dcm"), plugin="napari-coral")
    seg = hd.seg.segread(tmp_path / "pred.dcm")
    assert [(s.SegmentLabel, s.SegmentAlgorithmType) for s in seg.SegmentSequence] == [
        ("RV", "SEMIAUTOMATIC"), ("myocardium", "SEMIAUTOMATIC"), ("LV", "SEMIAUTOMATIC")]
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(sources, combine_segments=True), layer.data)
    reopened, = viewer.open(str(tmp_path / "pred.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(reopened.data, layer.data)
    assert list(reopened.features["class"]) == ["background", "RV", "myocardium", "LV"]
    reopened.save(str(tmp_path / "again.dcm"), plugin="napari-coral")  # a SEG's layer: on the series it lies on
    again = hd.seg.segread(tmp_path / "again.dcm")
    np.testing.assert_array_equal(again.get_pixels_by_source_instance(sources, combine_segments=True), layer.data)

    save_volume(tmp_path / "truth.nii.gz", truth.array, np.asarray(image.metadata["affine"]),
                ["background", "RV", "myocardium", "LV"])
    drawn, = viewer.open(str(tmp_path / "truth.nii.gz"), plugin="napari-coral")
    drawn.save(str(tmp_path / "truth.dcm"), plugin="napari-coral")
    seg = hd.seg.segread(tmp_path / "truth.dcm")
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"MANUAL"}
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(sources, combine_segments=True), truth.array)
    viewer.layers.remove(image)
    with pytest.raises(UserError) as info:  # not a ValueError, which napari would take for "no writer here"
        drawn.save(str(tmp_path / "alone.dcm"), plugin="napari-coral")
    assert "alone.dcm: a DICOM SEG refers to the DICOM images it labels" in str(info.value)
    assert "truth.nii.gz is not a DICOM image series" in str(info.value) and not list(tmp_path.glob("*alone*"))


def test_labels_drawn_on_a_cine_dicom_series_save_as_a_dicom_seg_and_open_on_its_frames(tmp_path, make_napari_viewer,
                                                                                        qtbot):
    """Segment's labels of a cine DICOM series (one 4-D layer, its frames on the slider), corrected in one frame, save
    as a DICOM SEG whose frames lie on the images of their phases, and open again on the cine as the same 4-D layer;
    a structure set saved from it opens likewise."""
    hd = pytest.importorskip("highdicom")
    from coral_core.phantom import make_phantom
    from helpers import write_dicom_series
    from napari_coral._writer import write_rt_structure_set

    frames = np.stack([np.round(make_phantom(seed, n_slices=5)[0].array * 1000) for seed in (21, 21)])
    frames[1] = np.roll(frames[1], 3, axis=-1)  # the heart moved in the second phase
    uid = "1.2.826.0.1.3680043.2.1125.1.4245"
    series = write_dicom_series(tmp_path / "cine", frames, spacing_zyx=(10.0, 1.8, 1.8), series_uid=uid,
                                extra={"0020|0052": "1.2.826.0.1.3680043.2.1125.1.78"})
    viewer = make_napari_viewer()
    image, = viewer.open(str(series), plugin="napari-coral")
    assert image.data.shape[:2] == (2, 5)
    dock(viewer, "Segment").segment()
    qtbot.waitUntil(lambda: f"{image.name} labels" in viewer.layers, timeout=60_000)
    layer = viewer.layers[f"{image.name} labels"]
    assert layer.data.shape == image.data.shape
    layer.data[1, 2, :6, :6] = 3  # a correction painted in the second frame
    layer.save(str(tmp_path / "pred.dcm"), plugin="napari-coral")
    sources = [f"{uid}.{t * 5 + k + 1}" for t in range(2) for k in range(5)]  # write_dicom_series: file n, t-major
    seg = hd.seg.segread(tmp_path / "pred.dcm")
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(sources, combine_segments=True),
                                  np.asarray(layer.data).reshape(10, *layer.data.shape[2:]))
    reopened, = viewer.open(str(tmp_path / "pred.dcm"), plugin="napari-coral")
    assert reopened.data.shape == layer.data.shape and tuple(reopened.scale) == tuple(image.scale)
    np.testing.assert_array_equal(reopened.data, layer.data)
    assert list(reopened.features["class"]) == ["background", "RV", "myocardium", "LV"]
    write_rt_structure_set(str(tmp_path / "rs.dcm"), layer.data, {"metadata": layer.metadata, "scale": layer.scale,
                                                                 "features": layer.features})
    as_contours, = viewer.open(str(tmp_path / "rs.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(as_contours.data, layer.data)


def test_a_structure_set_of_a_cine_stack_opens_on_the_stack_it_refers_to(tmp_path, make_napari_viewer):
    """A cine stack exported one series per slice position opens from one of its files as one 4-D image; a structure
    set written on it refers to each of its series and opens on the stack, not on another open image whose slices
    its contours also lie in (the one on top)."""
    from coral_core.dicomlabels import save_rt_structure_set
    from coral_core.volume import Volume, load_frames
    from helpers import write_dicom_series

    stack = tmp_path / "stack"
    intensities = np.random.default_rng(0).integers(0, 900, (3, 4, 8, 10))
    for k in range(4):
        write_dicom_series(stack, intensities[:, k:k + 1], spacing_zyx=(8.0, 0.8, 0.8), first_slice=k,
                           series_uid=f"1.2.3.{k}", prefix=f"s{k}_")
    viewer = make_napari_viewer()
    image, = viewer.open(str(stack / "s2_000.dcm"), plugin="napari-coral")  # one of its files: the whole stack
    assert image.data.shape == (3, 4, 8, 10) and sorted(image.metadata["dicom_series"]) == [f"1.2.3.{k}" for k in range(4)]
    frame = load_frames(stack)[0]
    labels = np.zeros((3, 4, 8, 10), np.uint8)
    labels[0, 1, 2:5, 2:6] = 1
    labels[2, 1, 4:7, 5:9] = 1  # the structure moved by the third phase
    save_rt_structure_set(tmp_path / "RS.dcm", labels, Volume(labels, frame.affine, stack), ["background", "LV"])
    viewer.add_image(np.zeros((4, 8, 10), np.float32), name="one phase",
                     metadata={"affine": frame.affine.tolist()})  # on top, with the stack's slices
    rs, = viewer.open(str(tmp_path / "RS.dcm"), plugin="napari-coral")
    assert rs.data.shape == (3, 4, 8, 10)
    np.testing.assert_array_equal(rs.data, labels)


def test_labels_drawn_on_a_dicom_series_save_as_an_rt_structure_set_from_the_save_dialog(
        tmp_path, make_napari_viewer, qtbot, monkeypatch):
    """File > Save Selected Layers offers "RT structure set" for a Labels layer; chosen, with a .dcm name, it writes
    the layer (Segment's, corrected by hand) as an RT structure set on the series' images (ROIs named by class,
    SEMIAUTOMATIC), which opens again as the same labels; the plain choice for .dcm stays a DICOM SEG."""
    import pydicom
    from qtpy.QtWidgets import QFileDialog

    from coral_core.phantom import make_phantom
    from helpers import write_dicom_series

    img, _ = make_phantom(12, n_slices=5)
    series = write_dicom_series(tmp_path / "sax", np.round(img.array * 1000), spacing_zyx=(10.0, 1.8, 1.8),
                                series_uid="1.2.826.0.1.3680043.2.1125.1.4244")
    viewer = make_napari_viewer()
    image, = viewer.open(str(series), plugin="napari-coral")
    dock(viewer, "Segment").segment()
    qtbot.waitUntil(lambda: f"{image.name} labels" in viewer.layers, timeout=60_000)
    layer = viewer.layers[f"{image.name} labels"]
    layer.data[1, 4:12, 4:12] = 2  # a correction painted
    viewer.layers.selection = {layer}
    offered = []

    def choose(name, choice):
        def dialog(self, parent, caption, directory, filter, options):  # noqa: A002 - Qt's keyword
            offered.append(filter.split(";;"))
            return str(tmp_path / name), next(f for f in filter.split(";;") if f.startswith(choice))
        monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
        viewer.window._qt_viewer._save_layers_dialog(selected=True)

    choose("rs.dcm", "CORAL segmentation RT structure set")
    assert "CORAL segmentation RT structure set (*.dcm)" in offered[0]
    rs = pydicom.dcmread(tmp_path / "rs.dcm")
    assert rs.Modality == "RTSTRUCT"
    assert [(r.ROIName, r.ROIGenerationAlgorithm) for r in rs.StructureSetROISequence] == [
        ("RV", "SEMIAUTOMATIC"), ("myocardium", "SEMIAUTOMATIC"), ("LV", "SEMIAUTOMATIC")]
    reopened, = viewer.open(str(tmp_path / "rs.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(reopened.data, layer.data)
    assert list(reopened.features["class"]) == ["background", "RV", "myocardium", "LV"]
    viewer.layers.selection = {layer}
    choose("seg.dcm", "CORAL segmentation (")
    assert pydicom.dcmread(tmp_path / "seg.dcm", stop_before_pixels=True).Modality == "SEG"
    with pytest.raises(UserError, match=r"rs.nii.gz: an RT structure set is a DICOM file; end the name with .dcm"):
        choose("rs.nii.gz", "CORAL segmentation RT structure set")
    assert not (tmp_path / "rs.nii.gz").exists()


def test_sample_has_image_and_ground_truth(viewer):
    image, truth = viewer.layers
    assert image.data.ndim == 3 and truth.data.shape == image.data.shape
    assert type(truth).__name__ == "Labels" and set(np.unique(truth.data)) == {0, 1, 2, 3}
    assert list(truth.features["class"]) == ["background", "RV", "myocardium", "LV"]


def test_every_widget_opens_with_the_sample(viewer):
    for name in WIDGETS:
        assert dock(viewer, name) is not None
    docks = getattr(viewer.window, "dock_widgets", None) or viewer.window._dock_widgets  # napari 0.5.0: private
    assert len(docks) == 4


def test_a_renamed_layer_stays_chosen_and_checked_under_its_new_name(viewer, qtbot):
    """Renaming a layer in napari's layer list renames it in every panel: still the chosen image, still
    unchecked if it was; a plot point of a layer no longer open under its name says so."""
    segment, model, embedding = dock(viewer, "Segment"), dock(viewer, "Model"), dock(viewer, "Embedding")
    finetune = dock(viewer, "Fine-tune")  # watching the sample's labels
    viewer.add_image(viewer.layers["phantom"].data.copy(), name="other", scale=viewer.layers["phantom"].scale)
    segment.image_picker.setCurrentText("other")
    embedding.volumes.item(0).setCheckState(Qt.CheckState.Unchecked)  # phantom
    viewer.layers["other"].name = "second scan"
    viewer.layers["phantom"].name = "first scan"
    assert segment.image_picker.currentText() == "second scan"
    assert [segment.image_picker.itemText(i) for i in range(segment.image_picker.count())] == ["first scan", "second scan"]
    assert embedding.volumes.checked() == ["second scan"] and model.volumes.checked() == ["first scan", "second scan"]
    viewer.layers.move(1, 0)  # moved: the choice and the checks follow the layer, not its row
    assert segment.image_picker.currentText() == "second scan" and embedding.volumes.checked() == ["second scan"]
    embedding.go_to("phantom", 1)  # a trajectory embedded under the old name
    assert embedding.status.text() == "Layer 'phantom' is no longer open under that name; press Embed again."
    viewer.window.remove_dock_widget("all")  # closed docks: later events do not reach their deleted widgets
    for widget in (segment, model, embedding, finetune):
        widget.deleteLater()
    qtbot.waitUntil(lambda: not any(alive(w) for w in (segment, model, embedding, finetune)), timeout=5000)
    viewer.add_image(np.zeros((3, 8, 8)), name="after")  # napari 0.5.0 raised here, dropping a deleted widget's method
    viewer.layers["after"].name = "after, renamed"
    truth = viewer.layers["phantom ground truth"]
    truth.data_setitem((np.array([0]), np.array([0]), np.array([0])), np.array([2], np.uint8))  # painted
    truth.data = truth.data.copy()  # replaced
    viewer.dims.set_current_step(0, 1)  # the slice shown moved


# --------------------------------------------------------------------------- segment


def test_segment_adds_a_labels_layer_with_class_names(viewer, qtbot):
    widget = dock(viewer, "Segment")
    assert widget.image_picker.currentText() == "phantom"
    widget.segment()
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)
    layer = viewer.layers["phantom labels"]
    assert layer.data.shape == viewer.layers["phantom"].data.shape
    assert list(layer.features["class"]) == ["background", "RV", "myocardium", "LV"]
    assert tuple(layer.scale) == tuple(viewer.layers["phantom"].scale)
    truth = viewer.layers["phantom ground truth"].data
    assert mean_dice(layer.data, truth, list(range(truth.shape[0]))) > 0.6  # bundled demo model


def test_segment_can_keep_each_class_largest_piece(viewer, qtbot):
    """A second heart pasted into a corner of one slice: the model labels it, an island; with the box checked the
    same segmentation keeps each class's largest piece (as `coral segment --largest-component` does) and says how
    many voxels went."""
    from coral_core.infer import keep_largest_components

    widget = dock(viewer, "Segment")
    image, truth = viewer.layers["phantom"], viewer.layers["phantom ground truth"].data
    data = np.array(image.data)
    ys, xs = np.nonzero(truth[2])
    patch = data[2, ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()
    data[2, :patch.shape[0], -patch.shape[1]:] = patch
    viewer.add_image(data, name="two hearts", scale=image.scale, metadata=dict(image.metadata))
    widget.image_picker.setCurrentText("two hearts")
    assert not widget.largest_box.isChecked()  # off by default: every piece kept
    with qtbot.waitSignal(widget.segment().finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: "Wrote two hearts labels" in widget.status.text(), timeout=10_000)
    raw = np.array(viewer.layers["two hearts labels"].data)
    assert "smaller pieces" not in widget.status.text()
    widget.largest_box.setChecked(True)
    assert session_for(viewer).largest_component
    with qtbot.waitSignal(widget.segment().finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: "smaller pieces made background" in widget.status.text(), timeout=10_000)
    kept, removed = keep_largest_components(raw)
    assert removed > 100 and (raw[2, :patch.shape[0], -patch.shape[1]:] > 0).sum() > 100  # the pasted heart was labelled
    np.testing.assert_array_equal(viewer.layers["two hearts labels"].data, kept)
    assert f"{removed} voxels of smaller pieces made background" in widget.status.text()


# --------------------------------------------------------------------------- fine-tune


def _paint_from_truth(viewer, slices):
    """Paint the ground truth of ``slices`` into a new Labels layer, as a user would."""
    truth = viewer.layers["phantom ground truth"].data
    layer = viewer.add_labels(np.zeros_like(truth), name="my annotations", scale=viewer.layers["phantom"].scale,
                              metadata=dict(viewer.layers["phantom"].metadata))
    return layer, truth


def _check_only(checklist, name: str) -> None:
    """Check the layer ``name`` in a panel's list of images, and no other."""
    for i in range(checklist.count()):
        item = checklist.item(i)
        item.setCheckState(Qt.CheckState.Checked if item.text() == name else Qt.CheckState.Unchecked)


def _fresh_model(viewer):
    session = session_for(viewer)
    # A fixed init: the global generator's seed differs from run to run here, and one random init
    # (seen once) fine-tuned to a held-out Dice of 0 in the 120 steps below.
    torch.manual_seed(0)
    session.set_model(build_model(UNetConfig(base_filters=8, image_size=64)), {"training": {}}, "fresh test model")
    return session


def test_finetune_improves_unannotated_slices_and_keeps_the_gui_responsive(viewer, qtbot, coral_home, tmp_path,
                                                                            monkeypatch):
    from coral_core.infer import segment_volume

    session = _fresh_model(viewer)
    widget = dock(viewer, "Fine-tune")
    layer, truth = _paint_from_truth(viewer, [])
    layer.features = {"class": ["background", "RV", "myocardium", "LV"]}  # a layer that names its classes
    widget.labels_picker.setCurrentText("my annotations")
    widget.image_picker.setCurrentText("phantom")
    held_out = truth.shape[0] // 2 + 1
    annotated = [1, truth.shape[0] // 2, held_out, truth.shape[0] - 2]
    for k in annotated:
        idx = np.nonzero(truth[k])
        layer.data_setitem((np.full_like(idx[0], k), *idx), truth[k][idx])
    qtbot.waitUntil(lambda: widget.annotated_slices() == annotated, timeout=5000)
    viewer.add_image(np.zeros((2, 2, 2)), name="unrelated")  # the layer list changing keeps what was painted
    viewer.layers.remove("unrelated")
    assert widget.annotated_slices() == annotated
    widget.validation_slices.setText(str(held_out))
    unannotated = [k for k in range(truth.shape[0]) if k not in annotated]
    image = viewer.layers["phantom"].data
    before = mean_dice(segment_volume(session.model, image), truth, unannotated)

    widget.steps.setValue(120)
    assert widget.plot.hint is not None and "while fine-tuning" in widget.plot.hint.get_text()  # not bare axes
    beats = []
    heartbeat = QTimer()
    heartbeat.setInterval(20)
    heartbeat.timeout.connect(lambda: beats.append(time.perf_counter()))
    heartbeat.start()
    runner = widget.finetune()
    assert runner is not None
    qtbot.waitUntil(lambda: not runner.running, timeout=300_000)
    assert "failed" not in widget.status.text() and "stopped" not in widget.status.text(), widget.status.text()
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)  # re-segmented
    heartbeat.stop()
    # the job's files (a copy of the image, the start and result models) went once its model was loaded
    assert widget._tmp is None and not Path(runner.job.spec["out"]).parent.exists()

    longest_pause = max(np.diff(beats))
    assert longest_pause < 0.25, f"event loop paused {longest_pause * 1000:.0f} ms"
    assert widget.autosaved.is_file()  # annotations were saved before training
    np.testing.assert_array_equal(load_volume(widget.autosaved).array, layer.data)
    assert read_class_names(widget.autosaved) == ["background", "RV", "myocardium", "LV"]  # and their names
    assert widget.losses and widget.losses[-1][0] == 120
    assert len(widget.val_dice) == 10 and widget.val_dice[-1][1] > widget.val_dice[0][1]  # held-out slice scored
    assert widget.plot.hint is None and len(widget.plot.ax.get_xticks()) > 1  # the curves replaced the hint
    widget.plot.canvas.draw()  # the legend sits above the axes, where no curve can run under it
    assert widget.plot.ax.get_legend().get_window_extent().y0 >= widget.plot.ax.get_window_extent().y1 - 1
    after = mean_dice(viewer.layers["phantom labels"].data, truth, unannotated)
    assert after > before + 0.2, (before, after)
    assert session.source == "fine-tuned on phantom"
    assert session.history[-1][2] == "fresh test model"  # what Previous model goes back to
    # kept without asking, so that loading or training another model cannot lose it
    kept = list((coral_home / "models").glob("finetuned-phantom-*.safetensors"))
    assert len(kept) == 1 and f"The model is kept in {kept[0]}." in widget.status.text()
    from coral_core.checkpoint import load_checkpoint

    kept_model, _ = load_checkpoint(kept[0])
    assert all(torch.equal(a, b) for a, b in zip(kept_model.state_dict().values(), session.model.state_dict().values()))
    saved = widget.save_model_file(str(tmp_path / "mine.safetensors"))
    assert saved.is_file()
    # a folder that is missing: not saved, said in a notification, nothing raised into Qt's slot
    assert widget.save_model_file(str(tmp_path / "gone" / "m.safetensors")) is None
    # Save model: a name typed without a suffix gets .safetensors
    from qtpy.QtWidgets import QFileDialog

    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "typed"), "Models (*.safetensors)"))
    widget.save_button.click()
    assert load_checkpoint(tmp_path / "typed.safetensors")[1]["training"]["stage"] == "finetune"


def test_cancel_keeps_the_previous_model(viewer, qtbot, coral_home):
    session = _fresh_model(viewer)
    previous = session.model
    model_dock = dock(viewer, "Model")
    assert model_dock.discard_button.isHidden()
    widget = dock(viewer, "Fine-tune")
    layer, truth = _paint_from_truth(viewer, [])
    widget.labels_picker.setCurrentText("my annotations")
    k = truth.shape[0] // 2
    idx = np.nonzero(truth[k])
    layer.data_setitem((np.full_like(idx[0], k), *idx), truth[k][idx])
    widget.steps.setValue(100_000)
    widget.keep_embedding.setChecked(False)  # the faster fine-tuning, without the CORAL loss
    assert not widget.balance_classes.isChecked()  # plain cross-entropy by default, as coral finetune
    widget.balance_classes.setChecked(True)
    runner = widget.finetune()
    assert runner.job.spec["config"]["embedding_weight"] == 0.0
    assert runner.job.spec["config"]["balance_classes"] is True
    assert runner.job.spec["training"]["balance_classes"] is True
    assert tuple(runner.job.spec["config"]["augment"]["scale"]) == (0.85, 1.15)  # "For other scans" unchecked
    qtbot.waitUntil(lambda: len(widget.losses) > 0, timeout=120_000)
    with qtbot.waitSignal(runner.finished, timeout=60_000) as blocker:
        widget.cancel()
    assert blocker.args[1] is True  # stopped
    # the Model dock heard of the other dock's job: its progress file is listed, and may be discarded now
    assert "1 stopped training run(s) kept" in model_dock.stopped_runs.text()
    assert not model_dock.discard_button.isHidden() and model_dock.discard_button.isEnabled()
    assert session.model is previous
    assert "kept the previous model" in widget.status.text()
    assert widget.finetune_button.isEnabled()
    stopped_at = widget.losses[-1][0]
    assert "continue where it stopped" in widget.status.text()
    runner = widget.finetune()  # the same annotations and settings: it continues
    assert not model_dock.discard_button.isEnabled()  # a running job may be writing its file
    qtbot.waitUntil(lambda: len(widget.losses) > 0, timeout=120_000)
    assert widget.continued_from >= stopped_at and widget.losses[0][0] == widget.continued_from + 1
    assert f"Continued from step {widget.continued_from}" in widget.status.text()
    with qtbot.waitSignal(runner.finished, timeout=60_000):
        widget.cancel()
    assert session.model is previous and not Path(runner.job.spec["out"]).parent.exists()  # its files went
    assert not list(coral_home.glob("models/*"))  # a stopped fine-tuning's model is not kept as a model


def test_finetune_works_with_default_choices_on_the_sample(viewer, qtbot):
    widget = dock(viewer, "Fine-tune")
    truth = viewer.layers["phantom ground truth"].data
    assert widget.labels_picker.currentText() == "phantom ground truth"
    assert widget.annotated_slices() == list(range(truth.shape[0]))  # a label layer: its labelled slices
    widget.wider_zoom.setChecked(True)  # a model meant for other scans
    runner = widget.finetune()
    assert runner is not None
    assert tuple(runner.job.spec["config"]["augment"]["scale"]) == (0.7, 1.4)
    assert runner.job.spec["training"]["zoom"] == [0.7, 1.4] and runner.job.spec["training"]["shift"] == 0.25
    qtbot.waitUntil(lambda: len(widget.losses) > 0, timeout=120_000)  # the job took the setting and trains
    widget.cancel()
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    segment = dock(viewer, "Segment")
    segment.segment()
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)
    widget.labels_picker.setCurrentText("phantom labels")
    assert widget.annotated_slices() == []  # a prediction counts only where corrected


def test_finetune_trains_on_annotated_slices_of_other_scans_too(viewer, qtbot, coral_home, monkeypatch):
    import napari_coral._widgets.finetune as finetune_module
    from coral_core.phantom import make_phantom

    _fresh_model(viewer)
    widget = dock(viewer, "Fine-tune")
    second, second_truth = (v.array for v in make_phantom(5, n_slices=7))
    viewer.add_image(second, name="second")
    viewer.add_labels(np.zeros(second.shape, np.uint8), name="second labels")
    widget.image_picker.setCurrentText("second")
    widget.labels_picker.setCurrentText("second labels")
    assert widget.add_scan() is None and "paint at least one slice" in widget.status.text()
    labels = viewer.layers["second labels"]
    for k in (1, 4):
        idx = np.nonzero(second_truth[k])
        labels.data_setitem((np.full_like(idx[0], k), *idx), second_truth[k][idx].astype(np.uint8))
    assert widget.add_scan() == ("second", "second labels")
    assert widget.other_scans.count() == 1 and widget.other_scans.item(0).text() == "second / second labels: slices 1, 4"

    layer, truth = _paint_from_truth(viewer, [])  # now the first scan: one slice painted
    widget.image_picker.setCurrentText("phantom")
    widget.labels_picker.setCurrentText("my annotations")
    k = truth.shape[0] // 2
    idx = np.nonzero(truth[k])
    layer.data_setitem((np.full_like(idx[0], k), *idx), truth[k][idx])
    widget.steps.setValue(3)
    writers = []  # the threads that write the annotations: the job's, before it trains, never napari's
    write_labels = finetune_module.write_labels
    monkeypatch.setattr(finetune_module, "write_labels",
                        lambda *a: writers.append(threading.current_thread()) or write_labels(*a))
    pressed = layer.data.copy()
    runner = widget.finetune(mode="thread")
    assert runner is not None, widget.status.text()
    layer.data_setitem((np.array([0]), np.array([0]), np.array([0])), np.array([1], layer.data.dtype))  # painted on
    assert runner.job.spec["training"]["images"] == ["phantom", "second"]
    assert runner.job.spec["training"]["slices"] == [[k], [1, 4]]
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    assert len(writers) == 2 and threading.main_thread() not in writers
    np.testing.assert_array_equal(load_volume(widget.autosaved).array, pressed)  # as the layer was at the press
    assert "failed" not in widget.status.text(), widget.status.text()
    inputs = np.load(runner.job.spec["data"])
    assert inputs["image_1"].shape == second.shape and inputs["slices_1"].tolist() == [1, 4]
    np.testing.assert_array_equal(inputs["labels_1"][[1, 4]], second_truth[[1, 4]])
    assert not inputs["labels_1"][[0, 2, 3, 5, 6]].any()  # only the annotated slices travel
    assert widget.losses and widget.losses[-1][0] == 3
    saved = sorted(p.name.split("-")[0] for p in (coral_home / "annotations").iterdir())
    assert saved == ["my_annotations", "second_labels"]  # both scans' annotations saved before training

    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)  # re-segmented with the new model

    labels.data_setitem((np.array([2]), np.array([0]), np.array([0])), np.array([9], np.uint8))  # a label too many
    widget.image_picker.setCurrentText("second")
    widget.labels_picker.setCurrentText("second labels")
    assert widget.add_scan() == ("second", "second labels")  # added again, now with slice 2
    assert widget.other_scans.count() == 1 and widget.other_scans.item(0).text().endswith("slices 1, 2, 4")
    widget.image_picker.setCurrentText("phantom")
    widget.labels_picker.setCurrentText("my annotations")
    assert widget.finetune(mode="thread") is None
    assert "'second labels' uses label 9" in widget.status.text()
    viewer.layers["second"].name = "renamed"  # the pair follows its layer
    assert widget.other_scans.item(0).text() == "renamed / second labels: slices 1, 2, 4"
    assert widget.finetune(mode="thread") is None
    assert "'second labels' uses label 9" in widget.status.text()  # the renamed pair still trains
    viewer.layers.remove("second labels")  # a closed layer leaves the list
    assert widget.other_scans.count() == 0 and not widget.remove_scan_button.isEnabled()
    assert widget.add_scan() == ("phantom", "my annotations")
    assert widget.other_scans.count() == 1 and widget.remove_scan_button.isEnabled()
    widget.other_scans.item(0).setSelected(True)
    widget.remove_scan_button.click()  # removed by the user
    assert widget.other_scans.count() == 0 and not widget.remove_scan_button.isEnabled()


def test_finetune_can_learn_from_the_other_open_images_without_labels(viewer, qtbot):
    from coral_core.phantom import make_phantom

    session = _fresh_model(viewer)  # random init: no canonical direction before
    widget = dock(viewer, "Fine-tune")
    widget.use_unlabelled.setChecked(True)
    assert widget.finetune(mode="thread") is None
    assert "no other image is open" in widget.status.text()
    viewer.add_image(make_phantom(6, n_slices=6)[0].array, name="unlabelled scan")
    widget.keep_embedding.setChecked(False)
    assert widget.finetune(mode="thread") is None
    assert "check 'Keep the embedding in slice order' too" in widget.status.text()
    widget.keep_embedding.setChecked(True)
    widget.steps.setValue(2)
    runner = widget.finetune(mode="thread")
    assert runner is not None, widget.status.text()
    assert runner.job.spec["training"]["unlabelled"] == ["unlabelled scan"]
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    assert "failed" not in widget.status.text(), widget.status.text()
    assert np.load(runner.job.spec["data"])["unlabelled_0"].shape == (6, 128, 128)
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)
    assert session.model.has_direction  # the embedding loss trained, from random init


def test_finetune_trains_classes_named_in_the_panel_and_picks_a_layer_s_structures_by_name(viewer, qtbot):
    """The demo model knows RV, myocardium and LV; a researcher's own labels are other classes, or come named
    from a structure set with more in it than the model is to learn."""
    from coral_core.checkpoint import pretrained_only

    session = session_for(viewer)
    widget = dock(viewer, "Fine-tune")
    model = session.ensure_model()  # the bundled demo model
    truth = viewer.layers["phantom ground truth"].data
    assert widget.labels_picker.currentText() == "phantom ground truth"  # it names its classes as the model does
    assert widget.classes_label.text() == "1 RV, 2 myocardium, 3 LV (the model's classes)"
    k = [2, truth.shape[0] // 2]

    # A layer that names its labels otherwise (an RT structure set opened in napari): a body outline under them.
    rs = np.where(truth > 0, truth + 1, 0).astype(np.uint8)  # 2 RV, 3 myocardium, 4 LV
    rs[:, 4:-4, 4:-4][rs[:, 4:-4, 4:-4] == 0] = 1
    structures = viewer.add_labels(rs, name="RS", features={"class": ["background", "BODY", "rv", "Myocardium", "LV"]})
    widget.labels_picker.setCurrentText("RS")
    widget.image_picker.setCurrentText("phantom")
    # it holds the model's classes by name (in its own spelling and order): they are picked from it
    assert widget.classes_label.text() == ("picked by name from 'RS': RV (its label 2), myocardium (its label 3), LV "
                                           "(its label 4) as 1, 2, 3; its other labels are background (the model's "
                                           "classes)")
    structures.features = {"class": ["background", "BODY", "Right ventricle", "Myocardium", "LV"]}
    assert ("'RS' names its labels BODY, Right ventricle, Myocardium, LV, not the model's classes (RV, myocardium, LV)"
            in widget.classes_label.text())
    assert widget.finetune(mode="thread") is None and "list the classes to train under Classes" in widget.status.text()
    widget.classes.setText("LV, right ventricle")  # picked by name, in this order; BODY and the myocardium become background
    assert widget.classes_label.text() == ("picked by name from 'RS': LV (its label 4), Right ventricle (its label 2) as 1, "
                                           "2; its other labels are background; a new head for these classes")
    image, scans, _, start, _, _, plan = widget._inputs()
    assert start.config.class_names == ["background", "LV", "Right ventricle"] and model.config.n_classes == 4  # the session's kept
    lab = scans[0][2]
    np.testing.assert_array_equal(lab, np.select([truth == 3, truth == 1], [1, 2], 0))
    assert plan.picked() == ["LV", "Right ventricle"]  # the layer's spelling
    torch.testing.assert_close(start.encoder.blocks[0][0].weight, model.encoder.blocks[0][0].weight)  # encoder kept
    widget.steps.setValue(1)
    runner = widget.finetune(mode="thread")
    assert runner.job.spec["training"]["structures"] == ["LV", "Right ventricle"]  # as --structures records them
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=120_000)
    assert session.model.config.class_names == ["background", "LV", "Right ventricle"]
    assert "(structures LV, Right ventricle)" in dock(viewer, "Model").current.text()
    structures.data = rs  # as a user who only opened it: the structure set's labelled slices are its annotation
    widget.classes.setText("Lung")
    assert widget.finetune(mode="thread") is None
    assert "'RS' uses label 4 but Classes names 1 class (Lung); add a name for each label painted" in widget.status.text()
    widget.classes.setText("LV, Lung, BODY")  # its names under other labels, and one it does not have
    assert "'RS' holds 'LV' as label 4, not 1, and has no class named 'Lung'" in widget.classes_label.text()
    widget.classes.setText("Right ventricle, Myocardium, background")
    assert "label 0 is always background" in widget.classes_label.text()

    # Classes of one's own, painted by value in a new layer: a new head, trained; the segmentation names them.
    mine = viewer.add_labels(np.zeros_like(truth), name="mine")
    widget.labels_picker.setCurrentText("mine")
    for z in k:
        idx = np.nonzero(truth[z] == 3)
        mine.data_setitem((np.full_like(idx[0], z), *idx), np.full(idx[0].size, 1, truth.dtype))
    widget.classes.setText(" cavity ")
    assert widget.classes_label.text() == "1 cavity; a new head for these classes"
    qtbot.waitUntil(lambda: widget.annotated_slices() == k, timeout=5000)
    widget.steps.setValue(3)
    runner = widget.finetune(mode="thread")
    assert runner is not None, widget.status.text()
    assert "structures" not in runner.job.spec["training"]  # painted by value, not picked
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    assert "failed" not in widget.status.text(), widget.status.text()
    qtbot.waitUntil(lambda: list(viewer.layers["phantom labels"].features["class"]) == ["background", "cavity"],
                    timeout=60_000)  # re-segmented, named by the new model
    assert session.model.config.class_names == ["background", "cavity"]
    assert widget.classes_label.text() == "1 cavity"  # now the model's own classes: its head is kept
    widget.classes.setText("")
    assert widget.classes_label.text() == "1 cavity (the model's classes)"

    # A pretrained-only model has no classes yet: empty Classes take the layer's labels as painted.
    session.set_model(build_model(UNetConfig(base_filters=8, image_size=64)), {"training": {"stage": "pretrain"}},
                      "pretrained")
    assert pretrained_only(session.meta)
    widget.classes.setText("")
    assert widget.classes_label.text().startswith("The model is pretrained only: labels 1, 2, ... as painted")
    _, _, _, start, _, _, _ = widget._inputs()
    assert start.config.class_names == ["background", "class 1"]
    widget.labels_picker.setCurrentText("RS")  # named: its names, up to the largest label annotated
    _, _, _, start, _, _, _ = widget._inputs()
    assert start.config.class_names == ["background", "BODY", "Right ventricle", "Myocardium", "LV"]


def test_structures_picked_from_an_opened_structure_set_are_filled_alone_where_not_painted(
        tmp_path, make_napari_viewer, qtbot, monkeypatch, coral_home):
    """An RT structure set opened in napari is one Labels layer, where a PTV drawn over the heart has taken the
    heart's voxels. Picked by name under Classes, the heart is filled from the file on its own (as coral finetune
    --structures does) on the slices not painted since; a slice painted since trains as painted."""
    from helpers import write_rt_structure_set

    def box(i0, i1, j0, j1):
        return [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]

    affine = oblique_affine(spacing_xyz=(1.5, 1.5, 3.0))
    write_nifti_ijk(tmp_path / "ct.nii.gz", np.random.default_rng(0).random((12, 12, 4)).astype(np.float32), affine)
    write_rt_structure_set(tmp_path / "RS.dcm", affine, (
        ("Heart", "ORGAN", [(k, box(2, 7, 2, 7)) for k in (1, 2)]), ("PTV", "PTV", [(k, box(5, 10, 5, 10)) for k in (1, 2)]),
        ("BODY", "EXTERNAL", [(k, box(0, 11, 0, 11)) for k in range(4)])))
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "ct.nii.gz"), plugin="napari-coral")
    with pytest.warns(UserWarning, match="more than one ROI"):
        rs, = viewer.open(str(tmp_path / "RS.dcm"), plugin="napari-coral")
    heart = np.zeros((4, 12, 12), np.uint8)
    heart[1:3, 2:8, 2:8] = 1  # (z, j, i): the heart's box on slices 1 and 2
    assert rs.data[1, 6, 6] == 2 and rs.data[1, 3, 3] == 1  # in the layer, the PTV holds the boxes' overlap
    widget = dock(viewer, "Fine-tune")
    widget.image_picker.setCurrentText("ct")
    widget.labels_picker.setCurrentText("RS")
    widget.classes.setText("heart")
    assert widget.classes_label.text() == (
        "picked by name from 'RS': Heart (its label 1) as 1; its other labels are background; a new head for "
        "these classes; slices not painted since it was opened are filled from RS.dcm one structure at a time, so "
        "one drawn over another keeps its voxels")
    import coral_core.volume

    reads = []  # the threads that read the structure set: the job's, never napari's
    load_labels_like = coral_core.volume.load_labels_like
    monkeypatch.setattr(coral_core.volume, "load_labels_like",
                        lambda *a, **k: reads.append(threading.current_thread()) or load_labels_like(*a, **k))
    _, scans, _, model, _, _, _ = widget._inputs()
    assert model.config.class_names == ["background", "Heart"]
    assert not reads  # napari's thread only noted which slices are still as read
    under_ptv = heart.copy()
    under_ptv[1:3, 5:8, 5:8] = 0
    np.testing.assert_array_equal(scans[0][2].painted, under_ptv)  # as the layer shows it
    np.testing.assert_array_equal(scans[0][2].read(), heart)  # the whole heart, under the PTV too
    widget.classes.setText("Cardiac|heart")  # a class that scans name either way: the first name it has here
    assert widget.classes_label.text().startswith("picked by name from 'RS': Cardiac (its label 1) as 1;")
    _, scans, _, model, _, _, _ = widget._inputs()
    assert model.config.class_names == ["background", "Cardiac"]
    np.testing.assert_array_equal(scans[0][2].read(), heart)
    reads.clear()
    widget.steps.setValue(2)
    runner = widget.finetune(mode="thread")  # the job's thread fills the heart from the file before training
    assert runner.job.spec["training"]["structures"] == ["Cardiac"]
    with qtbot.waitSignal(runner.finished, timeout=120_000):
        pass
    assert reads and threading.main_thread() not in reads
    with np.load(runner.job.spec["data"]) as trained:
        np.testing.assert_array_equal(trained["labels"], heart)
    rs.data_setitem((np.array([2]), np.array([0]), np.array([0])), np.array([1], rs.data.dtype))  # slice 2 painted
    _, scans, _, _, _, _, _ = widget._inputs()
    assert widget.annotated_slices() == [2]  # once something is painted, the slices painted are the annotation
    painted = np.zeros_like(heart)
    painted[2, 2:8, 2:8] = 1
    painted[2, 5:8, 5:8] = 0  # the PTV's in the layer
    painted[2, 0, 0] = 1
    np.testing.assert_array_equal(scans[0][2], painted)


def test_structures_picked_from_a_cine_s_structure_set_are_filled_alone_in_their_frame(tmp_path, make_napari_viewer):
    """A structure set drawn on one phase of a cine DICOM series opens as a 4-D layer with the contours in that
    frame; picked by name under Classes, the heart is filled from the file on its own there too (the PTV over it in
    the layer notwithstanding)."""
    from coral_core.volume import load_frames
    from helpers import write_dicom_series, write_rt_structure_set

    def box(i0, i1, j0, j1):
        return [(i0 - 0.5, j0 - 0.5), (i1 + 0.5, j0 - 0.5), (i1 + 0.5, j1 + 0.5), (i0 - 0.5, j1 + 0.5)]

    uid = "1.2.826.0.1.3680043.2.1125.1.4247"
    cine = write_dicom_series(tmp_path / "cine", np.random.default_rng(0).integers(0, 500, (2, 3, 12, 12)),
                              spacing_zyx=(8.0, 1.5, 1.5), series_uid=uid)
    affine = load_frames(cine)[0].affine
    image_of = {(t, k): f"{uid}.{t * 3 + k + 1}" for t in range(2) for k in range(3)}  # file n: frame n // 3
    write_rt_structure_set(tmp_path / "RS.dcm", affine, (
        ("Heart", "ORGAN", [(k, box(2, 7, 2, 7), image_of[1, k]) for k in (1, 2)]),
        ("PTV", "PTV", [(k, box(5, 10, 5, 10), image_of[1, k]) for k in (1, 2)])))
    viewer = make_napari_viewer()
    viewer.open(str(cine), plugin="napari-coral")
    with pytest.warns(UserWarning, match="more than one ROI"):
        rs, = viewer.open(str(tmp_path / "RS.dcm"), plugin="napari-coral")
    assert rs.data.shape == (2, 3, 12, 12) and not rs.data[0].any()  # drawn on the second phase only
    assert rs.data[1, 1, 6, 6] == 2 and rs.data[1, 1, 3, 3] == 1
    widget = dock(viewer, "Fine-tune")
    widget.image_picker.setCurrentText("cine")
    widget.labels_picker.setCurrentText("RS")
    widget.classes.setText("heart")
    assert "are filled from RS.dcm one structure at a time" in widget.classes_label.text()
    _, scans, _, model, _, _, _ = widget._inputs()
    assert model.config.class_names == ["background", "Heart"] and [scan[0] for scan in scans] == ["cine frame 1"]
    heart = np.zeros((3, 12, 12), np.uint8)
    heart[1:3, 2:8, 2:8] = 1
    np.testing.assert_array_equal(scans[0][2].read(), heart)  # the whole heart of frame 1, under the PTV too


def test_finetune_without_annotations_says_what_to_do(viewer):
    widget = dock(viewer, "Fine-tune")
    viewer.add_labels(np.zeros_like(viewer.layers["phantom ground truth"].data), name="empty")
    widget.labels_picker.setCurrentText("empty")
    assert widget.finetune() is None
    assert "paint at least one slice" in widget.status.text()
    widget.extra_slices.setText("2")
    widget.validation_slices.setText("5")
    assert widget.finetune() is None
    assert "validation slice(s) 5 are not annotated" in widget.status.text()


def test_segmenting_again_keeps_the_slices_painted_in_the_labels_layer(viewer, qtbot):
    """Correcting the segmentation itself, then fine-tuning: the re-segmentation keeps the corrected slices
    as painted (they train the next fine-tuning again), and its predictions elsewhere do not count as
    painted. Segment does the same, also for a stroke made just before it writes."""
    _fresh_model(viewer)
    segment = dock(viewer, "Segment")
    segment.segment()
    qtbot.waitUntil(lambda: "phantom labels" in viewer.layers, timeout=60_000)
    widget = dock(viewer, "Fine-tune")
    widget.labels_picker.setCurrentText("phantom labels")
    layer = viewer.layers["phantom labels"]
    truth = viewer.layers["phantom ground truth"].data

    def paint(k):
        idx = np.nonzero(truth[k])
        layer.data_setitem((np.full_like(idx[0], k), *idx), truth[k][idx].astype(layer.data.dtype))

    paint(3)
    painted = layer.data[3].copy()
    first = layer.data.copy()
    qtbot.waitUntil(lambda: widget.annotated_slices() == [3], timeout=5000)
    widget.steps.setValue(30)
    runner = widget.finetune(mode="thread")
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    qtbot.waitUntil(lambda: "re-segmented" in widget.status.text(), timeout=60_000)
    assert "keeping the 1 annotated slice as painted" in widget.status.text()
    np.testing.assert_array_equal(layer.data[3], painted)
    others = [k for k in range(truth.shape[0]) if k != 3]
    assert (layer.data[others] != first[others]).any()  # the new model predicted other labels elsewhere
    qtbot.wait(400)  # past the count's pause
    assert widget.annotated_slices() == [3]
    paint(5)  # and Segment at once, before the count's pause: the stroke is counted as Segment writes
    painted5 = layer.data[5].copy()
    worker = segment.segment()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: "keeping the 2 annotated slices as painted" in segment.status.text(), timeout=10_000)
    np.testing.assert_array_equal(layer.data[3], painted)
    np.testing.assert_array_equal(layer.data[5], painted5)
    assert widget.annotated_slices() == [3, 5]


def test_a_model_at_a_pixel_spacing_sees_the_same_anatomy_in_a_wider_layer(viewer, qtbot):
    """A model with a physical scale reads each layer's spacing from its scale: the sample and the sample
    padded by 32 pixels on every side (a wider field of view at the same spacing) fine-tune to the same losses;
    the wider one is segmented in several windows of the model's square, which fine-tuning places on the paint."""
    session = session_for(viewer)
    torch.manual_seed(0)
    session.set_model(build_model(UNetConfig(base_filters=4, image_size=64, pixel_spacing=3.6)), {"training": {}},
                      "scaled test model")
    assert "input 64 px at 3.6 mm (a 230.4 mm square of a slice at a time)" in session.describe()
    phantom, truth = viewer.layers["phantom"], viewer.layers["phantom ground truth"].data
    assert tuple(phantom.scale[1:]) == pytest.approx((1.8, 1.8))
    pad = ((0, 0), (32, 32), (32, 32))
    viewer.add_image(np.pad(phantom.data, pad, constant_values=phantom.data.min()), name="wide", scale=phantom.scale)
    segment = dock(viewer, "Segment")
    for name in ("phantom", "wide"):
        segment.image_picker.setCurrentText(name)
        segment.segment()
        qtbot.waitUntil(lambda: f"{name} labels" in viewer.layers, timeout=60_000)
        qtbot.waitUntil(lambda: segment.status.text().startswith(f"Wrote {name} labels"), timeout=10_000)
        tiled = "Each 345.6 x 345.6 mm slice was segmented in 9 overlapping windows of the 230.4 mm square"
        assert (tiled in segment.status.text()) == (name == "wide")
    seg, wide = viewer.layers["phantom labels"].data, viewer.layers["wide labels"].data
    assert wide.shape == (truth.shape[0], 192, 192) and seg.shape == truth.shape
    # the same scan with its scale in micrometres: the same anatomy in the model's square
    viewer.add_image(phantom.data, name="micro", scale=[1000 * s for s in phantom.scale], units="um")
    segment.image_picker.setCurrentText("micro")
    segment.segment()
    qtbot.waitUntil(lambda: segment.status.text().startswith("Wrote micro labels"), timeout=60_000)
    assert "windows" not in segment.status.text() and "no spacing" not in segment.status.text()
    np.testing.assert_array_equal(viewer.layers["micro labels"].data, seg)
    assert [str(u) for u in viewer.layers["micro labels"].units] == ["micrometer"] * 3
    viewer.add_image(phantom.data, name="plain")  # a plain array: scale 1, read as 1 mm, and the status says so
    segment.image_picker.setCurrentText("plain")
    segment.segment()
    qtbot.waitUntil(lambda: segment.status.text().startswith("Wrote plain labels"), timeout=60_000)
    assert "plain has no spacing (scale 1), so its pixels were read as 1 mm." in segment.status.text()

    widget = dock(viewer, "Fine-tune")
    widget.steps.setValue(6)
    losses = {}
    for name, painted in (("phantom", truth), ("wide", np.pad(truth, pad))):
        layer = viewer.add_labels(np.zeros_like(painted), name=f"{name} painted", scale=phantom.scale)
        for k in (2, 5):
            idx = np.nonzero(painted[k])
            layer.data_setitem((np.full_like(idx[0], k), *idx), painted[k][idx])
        widget.image_picker.setCurrentText(name)
        widget.labels_picker.setCurrentText(f"{name} painted")
        qtbot.waitUntil(lambda: widget.annotated_slices() == [2, 5], timeout=5000)
        torch.manual_seed(0)  # the same start for both
        session.set_model(build_model(UNetConfig(base_filters=4, image_size=64, pixel_spacing=3.6)), {"training": {}},
                          "scaled test model")
        runner = widget.finetune(mode="thread")
        qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
        assert "failed" not in widget.status.text(), widget.status.text()
        losses[name] = [loss for _, loss in widget.losses]
        qtbot.waitUntil(lambda: "re-segmented" in widget.status.text(), timeout=60_000)
    assert len(losses["wide"]) == 6 and losses["wide"] == losses["phantom"]
    assert runner.job.spec["training"]["shift"] == 0.25  # anatomy anywhere in a square (FINETUNE_TRANSLATE)
    assert session.model.config.pixel_spacing == 3.6
    # paint far from the centre: the square the model trains on moves there, and paint beyond it is counted
    corner = viewer.add_labels(np.zeros((truth.shape[0], 192, 192), np.uint8), name="corner", scale=phantom.scale)
    corner.data_setitem((np.full(4, 2), np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])), np.full(4, 1))
    corner.data_setitem((np.full(2, 2), np.array([190, 191]), np.array([191, 191])), np.full(2, 2))
    widget.labels_picker.setCurrentText("corner")
    qtbot.waitUntil(lambda: widget.annotated_slices() == [2], timeout=5000)
    runner = widget.finetune(mode="thread")
    assert "a 230.4 mm square of each scan's slices, placed on its paint; 2 painted voxels lie beyond it" in \
        widget.status.text(), widget.status.text()
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    qtbot.waitUntil(lambda: "re-segmented" in widget.status.text(), timeout=60_000)
    # pretraining from such a model keeps its scale, and sees the same square of either layer
    panel = dock(viewer, "Model")
    panel.epochs.setValue(1)
    pretrained = {}
    for name in ("phantom", "wide"):
        torch.manual_seed(0)
        session.set_model(build_model(UNetConfig(base_filters=4, image_size=64, pixel_spacing=3.6)), {"training": {}},
                          "scaled test model")
        _check_only(panel.volumes, name)
        runner = panel.pretrain(mode="thread")
        qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
        assert "pretrained encoder" in session.source, panel.pretrain_status.text()
        pretrained[name] = session.model
    assert pretrained["wide"].config.pixel_spacing == 3.6
    for (key, a), b in zip(pretrained["phantom"].state_dict().items(), pretrained["wide"].state_dict().values()):
        assert torch.equal(a, b), key
    # Pretrain's "In millimetres" gives a model without a scale one: the widest checked image fills its input
    torch.manual_seed(0)
    session.set_model(build_model(UNetConfig(base_filters=4, image_size=64)), {"training": {}}, "fresh test model")
    panel.physical_scale.setChecked(True)
    _check_only(panel.volumes, "wide")
    runner = panel.pretrain(mode="thread")
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    assert session.model.config.pixel_spacing == pytest.approx(192 * 1.8 / 64)
    panel.physical_scale.setChecked(False)
    # "In millimetres" gives a model without a scale one: the annotated image's field of view fills its input
    torch.manual_seed(0)
    session.set_model(build_model(UNetConfig(base_filters=4, image_size=64)), {"training": {}}, "fresh test model")
    widget.image_picker.setCurrentText("phantom")
    widget.labels_picker.setCurrentText("phantom painted")
    qtbot.waitUntil(lambda: widget.annotated_slices() == [2, 5], timeout=5000)
    widget.physical_scale.setChecked(True)
    widget.steps.setValue(3)
    runner = widget.finetune(mode="thread")
    assert "in millimetres (a 230.4 mm square of each scan's slices, placed on its paint)" in widget.status.text(), \
        widget.status.text()
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    qtbot.waitUntil(lambda: "re-segmented" in widget.status.text(), timeout=60_000)
    assert session.model.config.pixel_spacing == pytest.approx(3.6)
    for name in ("phantom", "wide"):
        segment.image_picker.setCurrentText(name)
        worker = segment.segment()
        with qtbot.waitSignal(worker.finished, timeout=60_000):
            pass
    qtbot.wait(200)
    np.testing.assert_array_equal(viewer.layers["wide labels"].data[:, 32:160, 32:160], viewer.layers["phantom labels"].data)


def test_segmenting_into_a_label_file_keeps_its_labelled_slices_annotated(viewer, qtbot):
    """A Labels layer that is not a segmentation of ours counts its labelled slices as annotated; segmenting
    into it (its name is the image's Labels layer's) keeps them, and they stay annotated afterwards."""
    _fresh_model(viewer)
    truth = viewer.layers["phantom ground truth"].data
    partial = np.zeros_like(truth)
    partial[[2, 6]] = truth[[2, 6]]
    layer = viewer.add_labels(partial, name="phantom labels")
    widget = dock(viewer, "Fine-tune")
    widget.labels_picker.setCurrentText("phantom labels")
    assert widget.annotated_slices() == [2, 6]
    segment = dock(viewer, "Segment")
    worker = segment.segment()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: "keeping the 2 annotated slices as painted" in segment.status.text(), timeout=10_000)
    assert layer.metadata["coral_prediction"] and (layer.data[[0, 1, 3, 4, 5]] > 0).any()  # predicted there
    np.testing.assert_array_equal(layer.data[[2, 6]], truth[[2, 6]])
    qtbot.wait(400)
    assert widget.annotated_slices() == [2, 6]


def test_segmenting_again_keeps_the_slices_painted_since_without_a_fine_tune_panel(viewer, qtbot):
    """No Fine-tune panel watches the layer: the slices of Segment's layer edited by hand (one painted, one cleared)
    keep what the user made at the next Segment and at every one after; a label file opened under the layer's name
    keeps its labelled slices too."""
    segment = dock(viewer, "Segment")

    def run():
        worker = segment.segment()
        with qtbot.waitSignal(worker.finished, timeout=60_000):
            pass
        qtbot.waitUntil(lambda: segment.segment_button.isEnabled() and "Wrote" in segment.status.text(), timeout=10_000)
        return viewer.layers["phantom labels"]

    layer = run()
    predicted = layer.data.copy()
    layer.data[3] = 0
    layer.data[3, 10:20, 10:20] = 2  # painted
    layer.data[5] = 0  # cleared: background, as the user says
    edited = layer.data.copy()
    for _ in range(2):  # kept at the next run, and at the one after
        layer = run()
        assert "keeping the 2 annotated slices as painted" in segment.status.text()
        np.testing.assert_array_equal(layer.data[[3, 5]], edited[[3, 5]])
        others = [k for k in range(len(predicted)) if k not in (3, 5)]
        np.testing.assert_array_equal(layer.data[others], predicted[others])
    viewer.layers.remove(layer)  # deleted: a fresh prediction everywhere
    np.testing.assert_array_equal(run().data, predicted)
    viewer.layers.remove("phantom labels")
    truth = viewer.layers["phantom ground truth"].data
    partial = np.zeros_like(truth)
    partial[[1, 8]] = truth[[1, 8]]
    viewer.add_labels(partial, name="phantom labels")  # a label file of the user's, under that name
    layer = run()
    assert "keeping the 2 annotated slices as painted" in segment.status.text()
    np.testing.assert_array_equal(layer.data[[1, 8]], truth[[1, 8]])


# --------------------------------------------------------------------------- embedding


def test_embedding_plot_click_moves_the_viewer_and_follows_it(viewer, qtbot, tmp_path, monkeypatch):
    import csv

    import napari_coral._widgets.embedding as embedding_module
    from matplotlib.backend_bases import MouseEvent

    widget = dock(viewer, "Embedding")
    assert widget.plot.hint is not None  # says what will appear instead of showing empty axes
    viewer.layers.remove("phantom ground truth")
    assert not widget.save_button.isEnabled() and widget.save_results(tmp_path / "early.png") is None
    assert "press Embed first" in widget.status.text() and not (tmp_path / "early.png").exists()
    worker = widget.embed()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: len(widget.trajectories) == 1, timeout=10_000)
    t = widget.trajectories[0]
    assert t.xy.shape == (viewer.layers["phantom"].data.shape[0], 2)
    assert widget.score > 0.5  # the demo model was CORAL-pretrained
    # Save...: the figure, or the table as `coral embed --out` writes it (the name typed without a suffix takes the
    # file type chosen in the dialog)
    assert widget.save_button.isEnabled()
    monkeypatch.setattr(embedding_module.QFileDialog, "getSaveFileName",
                        lambda *a, **k: (str(tmp_path / "points"), "Table (*.csv)"))
    widget.save_button.click()
    rows = list(csv.DictReader((tmp_path / "points.csv").read_text().splitlines()))
    assert [r["volume"] for r in rows] == ["phantom"] * len(t.xy) and [int(r["slice"]) for r in rows] == list(range(len(t.xy)))
    np.testing.assert_allclose([[float(r["axis1"]), float(r["axis2"])] for r in rows], t.xy, atol=1e-6)
    assert float(rows[0]["volume_score"]) == pytest.approx(t.score, abs=1e-6)
    assert widget.save_results(tmp_path / "figure.png") == tmp_path / "figure.png"
    assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG" and "Saved" in widget.status.text()
    assert widget.save_results(tmp_path / "figure.pdf") is None and ".png for the figure or .csv" in widget.status.text()
    assert widget.save_results(tmp_path / "missing" / "f.png") is None and "does not exist" in widget.status.text()
    assert widget.plot.hint is None
    widget.plot.canvas.draw()
    name_box = next(a for a in widget.plot.ax.texts if a.get_text() == "phantom").get_window_extent()
    first = widget.plot.ax.transData.transform(t.xy[0])
    assert name_box.x0 > first[0] and name_box.y0 > first[1]  # the name sits beside the first point, not on it
    target = len(t.xy) - 2
    x, y = widget.plot.ax.transData.transform(t.xy[target])
    MouseEvent("button_press_event", widget.plot.canvas, x, y, button=1)._process()
    assert widget._current_slice("phantom") == target
    ring = widget._highlight[0]
    np.testing.assert_allclose([ring.get_xdata()[0], ring.get_ydata()[0]], t.xy[target])
    widget.go_to("phantom", 1)
    np.testing.assert_allclose([widget._highlight[0].get_xdata()[0]], [t.xy[1, 0]])

    session_for(viewer).annotated["phantom"] = [0]
    suggested = widget.suggest()
    assert len(suggested) == 3 and all(name == "phantom" and k != 0 for name, k in suggested)
    assert widget.suggestions.count() == 3
    assert any(k == len(t.xy) - 1 for _, k in suggested)  # the apex, farthest from the base painted
    assert "A first or last slice is among them" in widget.status.text()  # so the status says when to give a range
    # within the slices given (where the structures are, when the scan reaches past them): none outside
    n = len(t.xy)
    widget.suggest_within.setText(f"2-{n - 3}")
    within = [k for _, k in widget.suggest()]
    assert len(within) == 3 and all(2 <= k <= n - 3 for k in within)
    widget.suggest_within.setText(f"2-{n + 4}")  # beyond the volume: one sentence, the last suggestions kept
    assert widget.suggest() == [] and widget.suggestions.count() == 3
    assert f"outside the {n} slices" in widget.status.text() and "of phantom" in widget.status.text()
    widget.suggest_within.setText("1-99999999999")  # was listed (10**11 numbers) before it was checked
    assert widget.suggest() == [] and "slices [99999999999]: outside" in widget.status.text()
    widget.suggest_within.setText("0")  # only annotated slices left: said, not "Suggested 0 slice(s): click one"
    assert widget.suggest() == [] and widget.status.text() == (
        "Nothing to suggest: every slice listed under 'suggest within' is annotated already, or looks to the model "
        "just like one that is.")
    widget.suggest_within.setText("")


def test_a_blank_volume_embeds_without_a_score_of_rounding_noise(viewer, qtbot):
    """Its slices' features differ by float32 rounding alone: it shows no score, the phantom beside it keeps its."""
    widget = dock(viewer, "Embedding")
    viewer.layers.remove("phantom ground truth")
    viewer.add_image(np.zeros((6, 64, 64), np.float32), name="blank")
    qtbot.waitUntil(lambda: widget.volumes.checked() == ["phantom", "blank"], timeout=5_000)
    worker = widget.embed()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: len(widget.trajectories) == 2, timeout=10_000)
    scores = {t.name: t.score for t in widget.trajectories}
    assert np.isnan(scores["blank"]) and scores["phantom"] > 0.5
    assert "blank: none (one slice, or all alike)" in widget.status.text() and "nan" not in widget.status.text()


def test_no_button_hands_its_checked_state_to_a_method_that_takes_an_argument():
    """A QPushButton's clicked signal carries `checked` (False), which PyQt passes to a slot that takes an argument:
    the Model panel's Pretrain button ran `pretrain(mode=False)` and raised "mode must be 'process' or 'thread', got
    False", so pretraining never started from the button (the tests called `pretrain()`; found by
    benchmarks/fuzz_midjob.py clicking it). Every `.clicked.connect(self.method)` must name a method of no argument."""
    import ast

    import napari_coral._widgets as widgets

    folder = Path(widgets.__file__).parent
    checked = 0
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
            methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
            for call in [n for n in ast.walk(cls) if isinstance(n, ast.Call)]:
                f = call.func
                if not (isinstance(f, ast.Attribute) and f.attr == "connect" and isinstance(f.value, ast.Attribute)
                        and f.value.attr == "clicked" and call.args):
                    continue
                slot = call.args[0]
                if isinstance(slot, ast.Attribute) and isinstance(slot.value, ast.Name) and slot.value.id == "self":
                    method = methods[slot.attr]
                    args = method.args
                    assert len(args.args) == 1 and not args.vararg, (
                        f"{path.name}: {cls.name}.{slot.attr} takes arguments; connect clicked to a lambda")
                    checked += 1
                else:
                    assert isinstance(slot, ast.Lambda) and not slot.args.args, ast.dump(slot)
    assert checked >= 10


def test_pretrain_button_clicked_as_a_user_clicks_it_pretrains(viewer, qtbot):
    widget = dock(viewer, "Model")
    widget.epochs.setValue(1)
    widget.pretrain_button.click()  # clicked(False), as a mouse click emits it
    assert widget.runner is not None and widget.runner.running
    qtbot.waitUntil(lambda: widget.pretrain_status.text().startswith("Pretraining finished."), timeout=180_000)


def test_embedding_again_redraws_the_plot_and_its_current_slice_ring(viewer, qtbot):
    """Pressing Embed a second time raised "cannot remove artist" in napari's thread: the red ring of the slice
    shown had gone with the axes the new plot cleared, and was removed again (found by benchmarks/fuzz_midjob.py)."""
    widget = dock(viewer, "Embedding")
    for _ in range(2):
        with qtbot.waitSignal(widget.embed().finished, timeout=60_000):
            pass
        qtbot.waitUntil(lambda: widget.embed_button.isEnabled(), timeout=10_000)
    assert len(widget._highlight) == len(widget.trajectories) == 1
    assert widget._highlight[0] in widget.plot.ax.lines  # drawn on the new plot
    viewer.dims.set_current_step(0, 3)  # and it follows the viewer still
    assert widget._highlight[0] in widget.plot.ax.lines and len(widget._highlight) == 1


# --------------------------------------------------------------------------- model


def test_previous_model_goes_back_through_the_models_replaced(viewer, tmp_path):
    """Previous model restores the model the current one replaced, and again the one before it, down to the last
    five kept in memory; loading a checkpoint counts as a replacement."""
    from napari_coral._session import MODELS_REMEMBERED

    widget = dock(viewer, "Model")
    session = session_for(viewer)
    assert widget.previous_button.isEnabled() == bool(session.history)  # enabled only with a model to go back to
    widget.use_demo_model()
    session.history.clear()  # whatever the docks loaded before: the demo model is where this test starts
    for i in range(MODELS_REMEMBERED + 1):
        session.set_model(build_model(UNetConfig(base_filters=4, depth=2, image_size=32)), {"training": {}}, f"model {i}")
    widget.save_model_file(str(tmp_path / "saved.safetensors"))
    assert widget.load_checkpoint_file(str(tmp_path / "saved.safetensors"))
    assert session.source == "saved.safetensors" and len(session.history) == MODELS_REMEMBERED
    assert widget.previous_button.isEnabled() and "model 5" in widget.previous_button.toolTip()
    went = []
    while widget.previous_button.isEnabled():
        widget.previous_button.click()
        went.append(session.source)
        assert widget.current.text().startswith(f"Current model: {session.source}")
    assert went == ["model 5", "model 4", "model 3", "model 2", "model 1"]
    assert widget.use_previous_model() is False and session.source == "model 1"


def test_model_widget_pretrains_loads_and_saves(viewer, qtbot, tmp_path):
    from coral_core.pretrain import SUGGESTED_STEPS, pretraining_steps

    widget = dock(viewer, "Model")
    session = session_for(viewer)
    assert widget.volumes.checked() == ["phantom"]
    # the steps the epochs make of the checked slices, and the epochs that would reach the suggested steps
    z = viewer.layers["phantom"].data.shape[0]
    per_epoch = pretraining_steps(z, 32, 1)
    assert widget.budget.text().startswith(f"{3 * per_epoch} steps of {min(32, z)} slices ({z} checked): a quick look")
    assert f"(Epochs {-(-SUGGESTED_STEPS // per_epoch)} here" in widget.budget.text()
    viewer.add_image(np.zeros((5, 16, 16), np.float32), name="second")  # new layers start checked
    assert f"({z + 5} checked)" in widget.budget.text()
    widget.volumes.item(1).setCheckState(Qt.CheckState.Unchecked)
    assert f"({z} checked)" in widget.budget.text()
    widget.epochs.setValue(1000)
    assert widget.budget.text() == f"{1000 * per_epoch} steps of {min(32, z)} slices ({z} checked)."
    widget.volumes.item(0).setCheckState(Qt.CheckState.Unchecked)
    assert widget.budget.text() == ""
    widget.volumes.item(0).setCheckState(Qt.CheckState.Checked)
    viewer.layers.remove("second")
    widget.epochs.setValue(3)
    runner = widget.pretrain()  # default choices: CORAL, 3 epochs, the open image
    qtbot.waitUntil(lambda: not runner.running, timeout=300_000)
    assert "pretrained encoder" in session.source, widget.pretrain_status.text()
    assert session.model.has_direction and session.meta["training"]["method"] == "coral"
    # its segmentation head is untrained: the Model panel says so, and Segment refuses until it is fine-tuned
    assert session.pretrained_only and "pretrained only: fine-tune it before segmenting" in widget.current.text()
    assert "\nTrained: coral pretraining for 3 epochs on 1 volume." in widget.current.text()  # as coral info says
    segment = dock(viewer, "Segment")
    assert segment.segment() is None and "phantom labels" not in viewer.layers
    assert "is pretrained only" in segment.status.text() and segment.segment_button.isEnabled()
    assert runner.job.spec["resume_folder"] == str(tmp_path / "home" / "resume")  # progress kept there ...
    assert list((tmp_path / "home" / "resume").iterdir()) == []  # ... until the job is done
    kept = list((tmp_path / "home" / "models").glob("pretrained-coral-*.safetensors"))
    assert len(kept) == 1 and f"The model is kept in {kept[0]}." in widget.pretrain_status.text()
    assert widget._tmp is None and not Path(runner.job.spec["out"]).parent.exists()  # the job's files went
    saved = widget.save_model_file(str(tmp_path / "pre.safetensors"))
    widget.use_demo_model()
    assert session.source == "bundled demo model"
    assert "Trained: fine-tuned for 200 steps on 2 subjects by coral demo, from coral pretraining" in widget.current.text()
    assert widget.load_checkpoint_file(str(saved)) and session.source == "pre.safetensors"
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 40)
    before = session.model
    assert not widget.load_checkpoint_file(str(tmp_path / "broken.safetensors"))
    assert session.model is before  # a bad file changes nothing
    assert "Current model: pre.safetensors" in widget.current.text()


# --------------------------------------------------------------------------- lazy layers


class LazyVolume:
    """An array-like as a dask or zarr layer is: napari reads it slice by slice (``__getitem__``),
    reading it whole goes through ``__array__``, which records whether napari's GUI thread did it."""

    def __init__(self, array: np.ndarray) -> None:
        self._array, self.shape, self.dtype, self.ndim, self.size = array, array.shape, array.dtype, array.ndim, array.size
        self.whole_reads_on_gui_thread: list[bool] = []

    def __getitem__(self, key):
        return self._array[key]

    def __len__(self) -> int:
        return len(self._array)

    def __array__(self, dtype=None, copy=None):
        import threading

        self.whole_reads_on_gui_thread.append(threading.current_thread() is threading.main_thread())
        return self._array.astype(dtype) if dtype is not None else self._array


def test_lazy_layers_are_read_whole_only_off_napari_thread(viewer, qtbot):
    session = _fresh_model(viewer)
    phantom = viewer.layers["phantom"]
    lazy = LazyVolume(np.asarray(phantom.data))
    viewer.add_image(lazy, name="lazy", scale=phantom.scale, metadata=dict(phantom.metadata))
    lazy.whole_reads_on_gui_thread.clear()  # whatever napari itself did to show it is not ours to judge

    segment = dock(viewer, "Segment")
    segment.image_picker.setCurrentText("lazy")
    segment.segment()
    qtbot.waitUntil(lambda: "lazy labels" in viewer.layers, timeout=60_000)
    assert viewer.layers["lazy labels"].data.shape == lazy.shape

    embedding = dock(viewer, "Embedding")
    _check_only(embedding.volumes, "lazy")  # the lazy volume alone
    with qtbot.waitSignal(embedding.embed().finished, timeout=60_000):
        pass
    assert [t.xy.shape[0] for t in embedding.trajectories] == [lazy.shape[0]]

    finetune = dock(viewer, "Fine-tune")
    finetune.image_picker.setCurrentText("lazy")
    finetune.labels_picker.setCurrentText("phantom ground truth")
    finetune.steps.setValue(3)
    runner = finetune.finetune(mode="thread")
    qtbot.waitUntil(lambda: "re-segmented" in finetune.status.text(), timeout=120_000)  # model loaded, volume segmented
    assert session.source == "fine-tuned on lazy", finetune.status.text()

    model = dock(viewer, "Model")
    _check_only(model.volumes, "lazy")
    model.epochs.setValue(1)
    runner = model.pretrain(mode="thread")
    qtbot.waitUntil(lambda: not runner.running, timeout=300_000)
    assert "pretrained encoder" in session.source, model.pretrain_status.text()

    reads = lazy.whole_reads_on_gui_thread
    assert len(reads) >= 4 and not any(reads), reads  # segment, embed, fine-tune, pretrain: all off napari's thread


def test_pretraining_takes_every_frame_of_a_cine_layer(viewer, qtbot):
    """A 4-D cine layer (as the reader opens ACDC's _4d files) is offered to pretraining, each frame a
    volume."""
    from coral_core.phantom import make_phantom

    session = _fresh_model(viewer)
    frames = np.stack([make_phantom(70 + t, n_slices=4)[0].array for t in range(5)])  # (t, z, y, x)
    viewer.add_image(frames, name="cine")
    model = dock(viewer, "Model")
    assert "cine" in [model.volumes.item(i).text() for i in range(model.volumes.count())]
    assert [model.volumes.item(i).toolTip() for i in range(model.volumes.count())
            if model.volumes.item(i).text() == "cine"] == ["a series of 5 frames: each frame is a volume"]
    _check_only(model.volumes, "cine")
    model.epochs.setValue(1)
    runner = model.pretrain(mode="thread")
    qtbot.waitUntil(lambda: not runner.running, timeout=300_000)
    assert "pretrained encoder" in session.source, model.pretrain_status.text()
    assert session.meta["training"]["slices"] == 20 and session.meta["training"]["volumes"] == ["cine"]


def test_a_cine_fine_tunes_on_every_annotated_frame_and_embeds_the_frame_shown(viewer, qtbot, tmp_path):
    """A cine series and its 4-D Labels layer: each annotated frame trains as a scan; validation slices
    are those of the frame shown; re-segmenting labels every frame. Embedding takes the frame shown, and
    moving to a point's slice moves within it (a volume's slice too, while a cine is open)."""
    from coral_core.phantom import make_phantom
    from napari_coral._layers import show_index, shown_index

    session = _fresh_model(viewer)
    movie = [make_phantom(80 + t, n_slices=6) for t in range(3)]
    frames = np.stack([img.array for img, _ in movie])  # (t, z, y, x)
    truth = np.stack([lab.array.astype(np.uint8) for _, lab in movie])
    image = viewer.add_image(frames, name="cine")
    labels = viewer.add_labels(np.zeros_like(truth), name="cine annotations")
    widget = dock(viewer, "Fine-tune")
    widget.image_picker.setCurrentText("cine")
    widget.labels_picker.setCurrentText("cine annotations")
    for t, z in ((0, 1), (0, 3), (2, 2)):
        idx = np.nonzero(truth[t, z])
        labels.data_setitem((np.full_like(idx[0], t), np.full_like(idx[0], z), *idx), truth[t, z][idx])
    qtbot.waitUntil(lambda: widget.annotated_slices() == [(0, 1), (0, 3), (2, 2)], timeout=5000)
    qtbot.waitUntil(lambda: widget.annotated_label.text() == "frame 0: 1, 3; frame 2: 2", timeout=5000)
    show_index(viewer, image, (1, 0))
    assert shown_index(viewer, image) == (1, 0)
    widget.validation_slices.setText("2")  # slice 2 of frame 1, which holds no annotation
    assert widget.finetune(mode="thread") is None
    assert "validation slice(s) frame 1: 2 are not annotated" in widget.status.text()
    show_index(viewer, image, (2, 0))
    widget.steps.setValue(3)
    runner = widget.finetune(mode="thread")
    assert runner is not None, widget.status.text()
    training = runner.job.spec["training"]
    assert training["images"] == ["cine frame 2", "cine frame 0"] and training["slices"] == [[], [1, 3]]
    qtbot.waitUntil(lambda: not runner.running, timeout=120_000)
    assert "failed" not in widget.status.text(), widget.status.text()
    inputs = np.load(runner.job.spec["data"])
    np.testing.assert_array_equal(inputs["image"], frames[2])
    np.testing.assert_array_equal(inputs["image_1"], frames[0])
    assert inputs["val_slices"].tolist() == [2] and inputs["slices_1"].tolist() == [1, 3]
    np.testing.assert_array_equal(inputs["labels"][2], truth[2, 2])
    np.testing.assert_array_equal(inputs["labels_1"][[1, 3]], truth[0, [1, 3]])
    assert not inputs["labels_1"][[0, 2, 4, 5]].any() and not inputs["labels"][[0, 1, 3, 4, 5]].any()
    assert len(widget.val_dice) > 0  # scored on slice 2 of frame 2
    qtbot.waitUntil(lambda: "cine labels" in viewer.layers, timeout=60_000)
    assert viewer.layers["cine labels"].data.shape == truth.shape  # every frame re-segmented
    assert session.source == "fine-tuned on cine"

    embedding = dock(viewer, "Embedding")
    names = [embedding.volumes.item(i).text() for i in range(embedding.volumes.count())]
    assert "cine" in names
    for i in range(embedding.volumes.count()):
        item = embedding.volumes.item(i)
        item.setCheckState(Qt.CheckState.Checked if item.text() in ("cine", "phantom") else Qt.CheckState.Unchecked)
    show_index(viewer, image, (1, 0))
    worker = embedding.embed()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: len(embedding.trajectories) == 2, timeout=10_000)
    assert embedding.frames == {"cine": 1}
    cine = next(t for t in embedding.trajectories if t.name == "cine")
    assert cine.xy.shape == (6, 2) and "cine frame 1" in embedding.status.text()
    embedding.save_results(tmp_path / "cine.csv")  # the table names the frame embedded
    assert {line.split(",")[0] for line in (tmp_path / "cine.csv").read_text().splitlines()[1:]} == {"cine frame 1", "phantom"}
    embedding.go_to("cine", 4)
    assert shown_index(viewer, image) == (1, 4) and embedding._current_slice("cine") == 4
    embedding.go_to("phantom", 2)  # the volume's slice axis is the viewer's second while the cine is open
    assert shown_index(viewer, viewer.layers["phantom"]) == (2,) and shown_index(viewer, image)[0] == 1
    show_index(viewer, image, (0, 4))  # another frame than the one embedded: no ring on the cine's line
    assert embedding._current_slice("cine") is None and len(embedding._highlight) == 1
    session.annotated["cine"] = [(1, 0), (0, 3)]
    suggested = [k for name, k in embedding.suggest() if name == "cine"]
    assert len(suggested) == 3 and 0 not in suggested
    assert any(embedding.suggestions.item(i).text().startswith("cine frame 1: slice")
               for i in range(embedding.suggestions.count()))


def test_a_layer_that_cannot_be_read_fails_the_job_with_its_name(viewer, qtbot):
    class Unreadable(LazyVolume):
        def __array__(self, dtype=None, copy=None):
            raise FileNotFoundError("scan.zarr/0.0.0")

    _fresh_model(viewer)
    phantom = viewer.layers["phantom"]
    viewer.add_image(Unreadable(np.asarray(phantom.data)), name="gone", scale=phantom.scale)
    model = dock(viewer, "Model")
    _check_only(model.volumes, "gone")
    runner = model.pretrain(mode="thread")
    qtbot.waitUntil(lambda: not runner.running, timeout=60_000)
    text = model.pretrain_status.text()
    assert "could not read the data of layer 'gone'" in text and "scan.zarr/0.0.0" in text, text
    assert model.pretrain_button.isEnabled()
    segment = dock(viewer, "Segment")
    segment.image_picker.setCurrentText("gone")
    segment.segment()
    qtbot.waitUntil(lambda: segment.segment_button.isEnabled(), timeout=60_000)
    assert "Segmentation failed: could not read the data of layer 'gone'" in segment.status.text()
    assert "gone labels" not in viewer.layers
    embedding = dock(viewer, "Embedding")
    _check_only(embedding.volumes, "gone")
    embedding.embed()
    qtbot.waitUntil(lambda: embedding.embed_button.isEnabled(), timeout=60_000)
    assert "Embedding failed: could not read the data of layer 'gone'" in embedding.status.text()


def test_a_multiscale_layer_is_read_at_full_resolution(viewer):
    from napari_coral._layers import LayerArray

    full = np.asarray(viewer.layers["phantom"].data)
    layer = viewer.add_image([full, full[:, ::2, ::2]], multiscale=True, name="pyramid")
    assert layer.ndim == 3
    data = LayerArray(layer)
    assert data.shape == full.shape
    np.testing.assert_array_equal(data.read(), full)


def test_a_float64_layer_beyond_float32_is_read_for_training_and_saved_without_infinities(tmp_path):
    """Fine-tune reads image layers as float32: a float64 layer with values near 1e300 became infinite (a blank
    image to train on); it is read times a power of two instead. Saving such a layer keeps float64."""
    from napari.layers import Image

    from coral_core.volume import load_volume, normalise_intensity
    from napari_coral._layers import LayerArray
    from napari_coral._writer import write_image

    small = np.random.default_rng(0).random((3, 8, 8))
    layer = Image(small * 1e300, name="huge")
    read = LayerArray(layer, np.float32).read()
    assert read.dtype == np.float32 and np.isfinite(read).all()
    np.testing.assert_allclose(normalise_intensity(read), normalise_intensity(small), atol=1e-6)
    assert LayerArray(Image(small), np.float32).read().dtype == np.float32  # others as before
    write_image(str(tmp_path / "huge.nii.gz"), layer.data, {"scale": layer.scale, "metadata": {}})
    back = load_volume(tmp_path / "huge.nii.gz").array
    assert np.isfinite(back).all()
    np.testing.assert_allclose(back, layer.data, rtol=1e-12)


def test_model_widget_offers_to_discard_stopped_runs(make_napari_viewer, qtbot, coral_home, monkeypatch):
    import napari_coral._widgets.model as model_dock

    widget = dock(make_napari_viewer(show=True), "Model")  # shown: the dock looks again when shown again
    qtbot.waitUntil(widget.isVisible, timeout=10_000)
    assert widget.stopped_runs.isHidden() and widget.discard_button.isHidden()  # nothing kept yet
    folder = coral_home / "resume"
    folder.mkdir(parents=True)
    for kind in ("pretrain", "finetune"):
        (folder / f"{kind}-0123456789abcdef0123.resume.safetensors").write_bytes(b"\0" * 600_000)
    (folder / "notes.txt").write_text("not a progress file")
    widget.hide()
    widget.show()  # shown again, the dock looks again
    assert not widget.stopped_runs.isHidden() and widget.discard_button.isEnabled()
    assert "2 stopped training run(s) kept (1.2 MB" in widget.stopped_runs.text()
    monkeypatch.setattr(model_dock, "any_job_running", lambda: True)  # a job at work may be writing its own file
    assert widget.discard_stopped_runs() == 0 and len(list(folder.iterdir())) == 3
    assert "A training job is running" in widget.stopped_runs.text()
    monkeypatch.setattr(model_dock, "any_job_running", lambda: False)
    assert widget.discard_stopped_runs() == 2
    assert [f.name for f in folder.iterdir()] == ["notes.txt"]
    assert widget.stopped_runs.isHidden() and widget.discard_button.isHidden()


def test_a_closed_model_dock_stops_listening_for_jobs(make_napari_viewer, qtbot):
    from napari_coral._widgets._common import alive, job_events

    viewer = make_napari_viewer()
    widget = dock(viewer, "Model")
    calls = []
    widget._show_stopped_runs = lambda: calls.append(1)  # the dock's handler, as its listener calls it
    job_events().changed.emit()
    assert calls == [1]
    viewer.window.remove_dock_widget("all")  # closed: Qt deletes the dock and the widget in it
    widget.deleteLater()
    qtbot.waitUntil(lambda: not alive(widget), timeout=5000)
    job_events().changed.emit()  # no error from the deleted widget, and it is let go
    job_events().changed.emit()
    assert calls == [1]
