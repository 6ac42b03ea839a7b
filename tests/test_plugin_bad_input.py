"""The bad-input catalog through the plugin: its reader, writer and widgets in a real viewer.

Each bad input ends in a sound result or one clear sentence, and leaves no partial file.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest

pytest.importorskip("napari")

from coral_core.errors import UserError  # noqa: E402
from coral_core.model import UNetConfig, build_model  # noqa: E402
from coral_core.volume import load_volume, save_volume  # noqa: E402
from helpers import oblique_affine, write_dicom_series, write_nifti_ijk  # noqa: E402
from napari_coral._reader import get_reader, read_volume  # noqa: E402
from napari_coral._session import session_for  # noqa: E402
from napari_coral._writer import write_labels  # noqa: E402


@pytest.fixture(autouse=True)
def coral_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_CORAL_HOME", str(tmp_path / "home"))


def one_sentence(message: str, *fragments: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for f in fragments:
        assert f in message, message


# --------------------------------------------------------------------------- reader


def _bad_files(tmp_path):
    """(name, file, words the message must hold) for files the reader must refuse."""
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "text.nii.gz").write_text("this is not an image")
    write_nifti_ijk(tmp_path / "good.nii.gz", np.random.rand(16, 16, 8).astype(np.float32), np.eye(4))
    raw = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    write_nifti_ijk(tmp_path / "complex.nii.gz", np.ones((16, 16, 8), np.complex64), np.eye(4))
    write_nifti_ijk(tmp_path / "nan.nii.gz", np.full((16, 16, 8), np.nan, np.float32), np.eye(4))
    save_volume(tmp_path / "good.mha", np.random.rand(8, 16, 16).astype(np.float32), np.eye(4))
    raw = (tmp_path / "good.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(raw[: len(raw) - 10])
    return [
        ("missing", tmp_path / "missing.nii.gz", ["missing.nii.gz", "no such file"]),
        ("empty", tmp_path / "empty.nii.gz", ["empty.nii.gz", "empty"]),
        ("text", tmp_path / "text.nii.gz", ["text.nii.gz"]),
        ("truncated", tmp_path / "truncated.nii.gz", ["truncated.nii.gz"]),
        ("complex", tmp_path / "complex.nii.gz", ["complex.nii.gz", "complex numbers", "magnitude"]),
        ("nan", tmp_path / "nan.nii.gz", ["nan.nii.gz", "every voxel is NaN or infinite"]),
        ("cut", tmp_path / "cut.mha", ["cut.mha: file is truncated (holds"]),
    ]


def test_reader_refuses_bad_files_with_one_sentence(tmp_path, make_napari_viewer):
    for _, path, words in _bad_files(tmp_path):
        reader = get_reader(str(path))
        assert reader is not None  # the suffix is ours: napari must show our message, not "no reader"
        with pytest.raises(ValueError) as info:
            reader(str(path))
        one_sentence(str(info.value), *words)
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(str(tmp_path / "truncated.nii.gz"), plugin="napari-coral")
    assert "truncated.nii.gz" in str(info.value)
    assert len(viewer.layers) == 0


def test_reader_opens_odd_but_valid_volumes(tmp_path):
    cases = {
        "flat.nii.gz": np.random.rand(12, 10).astype(np.float32),  # 2-D: one slice
        "one.nii.gz": np.random.rand(12, 10, 1).astype(np.float32),  # a single slice
        "constant.nii.gz": np.full((12, 10, 4), 7.0, np.float32),
        "nan.nii.gz": np.where(np.random.rand(12, 10, 4) > 0.9, np.nan, 1.0).astype(np.float32),
    }
    for name, data in cases.items():
        write_nifti_ijk(tmp_path / name, data, oblique_affine())
        (layer_data, kwargs, kind), = read_volume(str(tmp_path / name))
        assert kind == "image" and layer_data.ndim == 3, name
        assert layer_data.shape[1:] == (10, 12) and len(kwargs["scale"]) == 3, name


def test_header_and_voxel_file_pairs_open_and_a_missing_voxel_file_is_named(tmp_path, make_napari_viewer):
    """MetaImage (.mhd + .raw) and detached NRRD (.nhdr + .raw) open through File > Open like one-file volumes; a
    header whose voxel file was left behind is refused naming that file."""
    import SimpleITK as sitk

    viewer = make_napari_viewer()
    data = np.random.rand(4, 10, 12).astype(np.float32)
    for name in ("pair.mhd", "pair.nhdr"):
        sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / name))
        layer = viewer.open(str(tmp_path / name), plugin="napari-coral")[0]
        np.testing.assert_array_equal(layer.data, data)
        (tmp_path / "pair.raw").unlink()
        with pytest.raises(Exception) as info:
            viewer.open(str(tmp_path / name), plugin="napari-coral")
        one_sentence(str(info.value).splitlines()[-1], name, "voxel file pair.raw is missing")
    assert len(viewer.layers) == 2


def test_one_or_all_slice_files_of_a_dicom_series_open_the_series_once(tmp_path, make_napari_viewer):
    """A slice file dropped or picked in File > Open opens its whole series (the files of its folder with its Series
    Instance UID, as dropping the folder does); picking all of a series' files opens it once, not once per file;
    napari's stacked open of several slice files reads those slices; files of two series together are refused; a cine
    series, an enhanced multi-frame DICOM file of a cine, and a file of a cine exported one series per slice position,
    open as one layer of frames."""
    from coral_core.volume import load_volume

    rng = np.random.default_rng(0)
    ct, mr = (rng.integers(0, 2000, (n, 10, 12)).astype(np.int16) for n in (6, 4))
    folder = write_dicom_series(tmp_path / "study", ct, extra={"0020|0011": "3"})
    write_dicom_series(folder, mr, spacing_zyx=(2.0, 0.8, 0.8), series_uid="1.2.826.0.1.3680043.2.1125.1.999",
                       prefix="mr", extra={"0008|103e": "cine SAX"})  # a second series in the same folder
    viewer = make_napari_viewer()
    layer, = viewer.open(str(folder / "slice003.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(layer.data, ct)
    np.testing.assert_allclose(layer.scale, (4.0, 0.8, 0.8))
    # two series of one folder are told apart by name: a description where the header has one, else the number
    assert layer.name == "study series 3" and layer.metadata["source_path"] == str(folder.resolve())
    mr_files = sorted(str(f) for f in folder.glob("mr*.dcm"))
    added = viewer.open(mr_files[::-1], plugin="napari-coral")  # all of the second series' files, one by one
    assert len(added) == 1 and len(viewer.layers) == 2 and added[0].name == "study cine SAX"
    np.testing.assert_array_equal(added[0].data, mr)
    np.testing.assert_allclose(added[0].scale, (2.0, 0.8, 0.8))
    assert viewer.open(str(folder / "slice000.dcm"), plugin="napari-coral") == []  # shown already: nothing added
    viewer.layers.clear()
    stacked, = viewer.open(mr_files[1:3], stack=True, plugin="napari-coral")  # those two slices, in slice order
    np.testing.assert_array_equal(stacked.data, mr[1:3])
    with pytest.raises(ValueError) as info:  # files of both series at once
        read_volume([str(folder / "slice000.dcm"), mr_files[0]])
    one_sentence(str(info.value), "slice000.dcm", "2 DICOM series", "one series at a time")
    assert get_reader([str(folder / "slice000.dcm"), str(tmp_path / "other.nii.gz")]) is None
    import SimpleITK as sitk  # a multi-frame DICOM file holds a volume: it opens as one

    sitk.WriteImage(sitk.GetImageFromArray(ct.astype(np.uint16)), str(tmp_path / "multiframe.dcm"))
    np.testing.assert_array_equal(viewer.open(str(tmp_path / "multiframe.dcm"), plugin="napari-coral")[0].data, ct)
    from helpers import write_enhanced_dicom  # an enhanced multi-frame cine: one layer of its phases

    cine = rng.integers(0, 2000, (3, 4, 10, 12)).astype(np.int16)
    write_enhanced_dicom(tmp_path / "cine.dcm", cine, np.diag([0.8, 0.8, 8.0, 1.0]), frame_order=range(11, -1, -1))
    layer, = viewer.open(str(tmp_path / "cine.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(layer.data, cine)
    assert layer.metadata["frames"] == 3 and tuple(layer.scale) == pytest.approx((1.0, 8.0, 0.8, 0.8))
    # the CLI keeps to the folder: a single slice file is refused there, naming the folder
    with pytest.raises(UserError, match="a single slice of a series; give the folder"):
        load_volume(folder / "slice000.dcm")
    # a cine series (3 phases at each of 4 slice positions), by one of its files: one (t, z, y, x) layer
    cine = rng.integers(0, 2000, (3, 4, 10, 12)).astype(np.int16)
    write_dicom_series(tmp_path / "cine", cine, spacing_zyx=(8.0, 0.8, 0.8))
    movie, = viewer.open(str(tmp_path / "cine" / "slice005.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(movie.data, cine)
    np.testing.assert_allclose(movie.scale, (1.0, 8.0, 0.8, 0.8))
    assert movie.metadata["frames"] == 3 and movie.name == "cine"
    # the same cine exported one series per slice position: a file of any of its series opens the whole stack, once
    for k in range(4):
        write_dicom_series(tmp_path / "sax", cine[:, k:k + 1], spacing_zyx=(8.0, 0.8, 0.8), first_slice=k,
                           series_uid=f"1.2.3.{k}", prefix=f"s{k}_")
    stack, = viewer.open(str(tmp_path / "sax" / "s2_001.dcm"), plugin="napari-coral")
    np.testing.assert_array_equal(stack.data, cine)
    assert stack.name == "sax" and stack.metadata["frames"] == 3
    assert viewer.open(str(tmp_path / "sax" / "s0_002.dcm"), plugin="napari-coral") == []  # shown already
    viewer.layers.remove(stack)
    picked = sorted(str(f) for f in (tmp_path / "sax").glob("s[13]_*.dcm"))  # files of two of its series, one by one
    assert len(viewer.open(picked, plugin="napari-coral")) == 1 and viewer.layers[-1].name == "sax"
    # a folder opened whole records its series as a file of it does: a file of it then adds nothing
    viewer.layers.clear()
    for name, series in (("cine", "1.2.826.0.1.3680043.2.1125.1.12345"), ("sax", [f"1.2.3.{k}" for k in range(4)])):
        whole, = viewer.open(str(tmp_path / name), plugin="napari-coral")
        assert whole.metadata["dicom_series"] == series
        assert viewer.open(str(next((tmp_path / name).glob("s*.dcm"))), plugin="napari-coral") == []


def test_a_dicom_seg_opens_on_the_image_it_was_drawn_on(tmp_path, make_napari_viewer, monkeypatch):
    """A DICOM SEG file opens as a Labels layer on the open image whose voxel grid its frames lie on (placed as that
    image, its segments' labels as the class names), and so does an RT structure set (its contours filled); with no
    such image open each says to open the image first."""
    from helpers import write_dicom_seg

    labels = np.zeros((5, 10, 12), np.uint8)
    labels[1:4, 2:6, 3:9], labels[2, 3:5, 4:6] = 1, 2
    affine = oblique_affine(spacing_xyz=(0.8, 0.9, 4.0))
    write_nifti_ijk(tmp_path / "img.nii.gz", np.random.default_rng(0).random((12, 10, 5)).astype(np.float32), affine)
    write_nifti_ijk(tmp_path / "other.nii.gz", np.zeros((12, 10, 5), np.float32),
                    oblique_affine(spacing_xyz=(1.0, 0.9, 4.0)))  # another grid: wider pixels
    write_dicom_seg(tmp_path / "heart.dcm", labels, affine, ["LV", "myocardium"])
    viewer = make_napari_viewer()
    with pytest.raises(ValueError) as info:
        read_volume(str(tmp_path / "heart.dcm"))
    one_sentence(str(info.value), "heart.dcm: a DICOM SEG segmentation", "open the image it was drawn on first")
    viewer.open(str(tmp_path / "other.nii.gz"), plugin="napari-coral")
    with pytest.raises(ValueError, match="none of the 1 open images has its voxel grid"):
        read_volume(str(tmp_path / "heart.dcm"))
    image, = viewer.open(str(tmp_path / "img.nii.gz"), plugin="napari-coral")
    seg, = viewer.open(str(tmp_path / "heart.dcm"), plugin="napari-coral")
    assert seg.__class__.__name__ == "Labels" and seg.name == "heart"
    np.testing.assert_array_equal(seg.data, labels)
    np.testing.assert_allclose(seg.scale, image.scale)
    assert list(seg.features["class"]) == ["background", "LV", "myocardium"]
    from helpers import write_rt_structure_set  # contours open the same way, filled on the image's grid

    box = [(2.5, 1.5), (8.5, 1.5), (8.5, 5.5), (2.5, 5.5)]  # voxels i 3..8, j 2..5
    write_rt_structure_set(tmp_path / "RS.dcm", affine, (("GTV", "GTV", [(2, box)]),))
    import napari.utils.notifications

    said = []
    monkeypatch.setattr(napari.utils.notifications, "show_info", said.append)
    contours, = viewer.open(str(tmp_path / "RS.dcm"), plugin="napari-coral")  # 'other' has its slices too
    assert said == [f"{tmp_path / 'RS.dcm'}: its contours lie in the slices of 2 open images; filled on the grid of "
                    "'img', the topmost in the layer list"]
    expected = np.zeros_like(labels)
    expected[2, 2:6, 3:9] = 1
    np.testing.assert_array_equal(contours.data, expected)
    assert list(contours.features["class"]) == ["background", "GTV"]
    viewer.layers.clear()
    with pytest.raises(ValueError) as info:
        read_volume(str(tmp_path / "RS.dcm"))
    one_sentence(str(info.value), "RS.dcm: a DICOM RT structure set, which holds only contours; open the image it "
                 "was drawn on first")


def test_class_names_too_few_for_a_label_files_labels_are_left_aside(tmp_path):
    """Names in a label file's header that leave a label unnamed would leave it uncoloured: the layer opens
    without them, in napari's own colours, as a file without names does."""
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:4, 2:4], labels[2, 2:4, 2:4] = 1, 4  # label 4 beyond the four names
    save_volume(tmp_path / "few.nii.gz", labels, np.eye(4), ["background", "RV", "myocardium", "LV"])
    (_, kwargs, kind), = read_volume(str(tmp_path / "few.nii.gz"))
    assert kind == "labels" and "features" not in kwargs and "colormap" not in kwargs
    save_volume(tmp_path / "five.nii.gz", labels, np.eye(4), ["background", "RV", "myocardium", "LV", "aorta"])
    (_, kwargs, _), = read_volume(str(tmp_path / "five.nii.gz"))
    assert kwargs["features"] == {"class": ["background", "RV", "myocardium", "LV", "aorta"]}


# --------------------------------------------------------------------------- writer


def test_writer_to_a_missing_or_read_only_folder_is_one_sentence_and_no_file(tmp_path):
    labels = np.zeros((4, 8, 8), np.uint8)
    with pytest.raises(Exception) as info:
        write_labels(str(tmp_path / "nowhere" / "x.nii.gz"), labels, {"metadata": {}, "scale": (1, 1, 1)})
    one_sentence(str(info.value), "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not _writable(locked):  # root can write anywhere; the check needs an ordinary user
            with pytest.raises(Exception) as info:
                write_labels(str(locked / "x.nii.gz"), labels, {"metadata": {}, "scale": (1, 1, 1)})
            one_sentence(str(info.value), "not writable")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def _writable(folder) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


def test_writer_names_classes_by_label_value_from_an_index_column(tmp_path):
    """napari's Labels features may map rows to label values by an "index" column: names follow the values, a
    value without a row is named by its number."""
    import pandas as pd

    from coral_core.volume import read_class_names

    features = pd.DataFrame({"index": [0, 2], "class": ["background", "LV"]})
    write_labels(str(tmp_path / "x.nii.gz"), np.zeros((2, 4, 4), np.uint8),
                 {"metadata": {}, "scale": (1, 1, 1), "features": features})
    assert read_class_names(tmp_path / "x.nii.gz") == ["background", "class 1", "LV"]


def test_writer_refuses_a_2d_layer_and_saves_a_cine_series_in_each_format(tmp_path):
    with pytest.raises(UserError) as info:
        write_labels(str(tmp_path / "x.nii.gz"), np.zeros((8, 8), np.uint8), {"metadata": {}, "scale": (1, 1)})
    one_sentence(str(info.value), "3-D")
    assert not list(tmp_path.iterdir())

    series = np.random.default_rng(0).integers(0, 3, (3, 4, 8, 8)).astype(np.uint8)  # a cine's labels: 3 frames
    for name in ("x.nii.gz", "x.mha", "x.nrrd"):  # each holds the frames on its fourth axis, and opens again as one
        write_labels(str(tmp_path / name), series, {"metadata": {}, "scale": (1, 2.0, 0.8, 0.8)})
        (data, kwargs, kind), = read_volume(str(tmp_path / name))
        np.testing.assert_array_equal(data, series)
        assert kind == "labels" and kwargs["metadata"]["frames"] == 3, name
        np.testing.assert_allclose(kwargs["scale"], (1, 2.0, 0.8, 0.8))


# --------------------------------------------------------------------------- widgets


def _dock(viewer, name):
    return viewer.window.add_plugin_dock_widget("napari-coral", name)[1]


def _small_model(viewer, n_classes=4):
    names = ["background"] + [f"c{i}" for i in range(1, n_classes)]
    model = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=n_classes, class_names=names))
    session_for(viewer).set_model(model, {"training": {}}, "tiny test model")


@pytest.mark.parametrize(
    "name, data",
    [
        ("nan", np.where(np.random.default_rng(0).random((5, 40, 40)) > 0.95, np.nan, 1.0).astype(np.float32)),
        ("inf", np.where(np.random.default_rng(1).random((5, 40, 40)) > 0.95, np.inf, 1.0).astype(np.float32)),
        ("constant", np.full((5, 40, 40), 3.0, np.float32)),
        ("single", np.random.default_rng(2).random((1, 40, 40)).astype(np.float32)),
    ],
)
def test_segment_widget_gives_a_labels_layer_for_odd_images(make_napari_viewer, qtbot, name, data):
    viewer = make_napari_viewer()
    viewer.add_image(data, name=name)
    _small_model(viewer)
    widget = _dock(viewer, "Segment")
    widget.segment()
    qtbot.waitUntil(lambda: f"{name} labels" in viewer.layers, timeout=60_000)
    labels = viewer.layers[f"{name} labels"].data
    assert labels.shape == data.shape and labels.max() < 4


def test_segment_leaves_a_layer_of_its_name_that_cannot_take_the_labels_and_writes_beside_it(
        make_napari_viewer, qtbot):
    """Found by benchmarks/fuzz_layers.py: a layer named "scan labels" that is an image, points, a multiscale Labels
    layer (each raised in napari's thread, and the Segment button stayed greyed out) or labels of another shape (the
    user's, replaced) is left as it is; the labels go to "scan labels 2" (or the next name free), which later runs
    update in place. A prediction of another shape (an earlier scan's of that name) is still replaced."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Segment")
    widget.image_picker.setCurrentText("scan")
    users = np.zeros((6, 32, 30), np.uint8)
    users[2, 4:9, 4:9] = 2
    for kind, add in [("Image", lambda: viewer.add_image(np.ones((6, 32, 32), np.float32), name="scan labels")),
                      ("Points", lambda: viewer.add_points(np.array([[1.0, 2.0, 3.0]]), name="scan labels")),
                      ("Labels", lambda: viewer.add_labels([np.ones((6, 32, 32), np.uint8), np.ones((6, 16, 16), np.uint8)],
                                                           multiscale=True,
                                                           name="scan labels")),
                      ("Labels", lambda: viewer.add_labels(users, name="scan labels"))]:
        add()
        widget.segment()
        qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=60_000)
        one_sentence(widget.status.text(), "Wrote scan labels 2 (tiny test model)")
        assert type(viewer.layers["scan labels"]).__name__ == kind
        written = viewer.layers["scan labels 2"]
        assert type(written).__name__ == "Labels" and written.data.shape == (6, 32, 32) and written.data.max() < 3
        viewer.layers.remove("scan labels")
        viewer.layers.remove("scan labels 2")
    np.testing.assert_array_equal(users[2, 4:9, 4:9], 2)  # not written into
    earlier = viewer.add_labels(np.ones((6, 20, 20), np.uint8), name="scan labels", metadata={"coral_prediction": True})
    widget.segment()
    qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=60_000)
    assert earlier.data.shape == (6, 32, 32) and "scan labels 2" not in viewer.layers
    viewer.layers.remove("scan labels")
    minus = np.zeros((6, 32, 32), np.int8)
    minus[3, 2:6, 2:6] = -1  # painted in an int8 layer of the user's: kept, where it came back as 255
    viewer.add_labels(minus, name="scan labels")
    widget.segment()
    qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=60_000)
    np.testing.assert_array_equal(viewer.layers["scan labels"].data[3], minus[3])


def test_2d_layers_are_not_offered_and_a_cine_series_segments_frame_by_frame(tmp_path, make_napari_viewer, qtbot):
    from unittest.mock import patch

    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(32, 32).astype(np.float32), name="photo")
    widget = _dock(viewer, "Segment")
    assert widget.image_picker.count() == 0
    with patch("napari.utils.notifications.show_error") as shown:
        assert widget.segment() is None
    one_sentence(shown.call_args.args[0], "No open image is a 3-D volume or a 4-D cine series ('photo' is 2-D)")
    viewer.add_image(np.random.rand(2, 2, 3, 8, 8).astype(np.float32), name="5d")
    viewer.add_image(np.random.rand(8, 8, 3).astype(np.float32), name="colour", rgb=True)
    embedding, model = _dock(viewer, "Embedding"), _dock(viewer, "Model")
    for press, status in [(widget.segment, widget.status), (embedding.embed, embedding.status),
                          (model.pretrain, model.pretrain_status)]:
        assert press() is None  # said in the status line too (napari's notification is patched out in no test here)
        assert status.text() == ("No open image is a 3-D volume or a 4-D cine series ('photo' is 2-D, '5d' is 5-D, "
                                 "'colour' is RGB); open one (File > Open, or File > Open Sample > Cardiac phantom).")
    viewer.layers.remove("5d")
    viewer.layers.remove("colour")
    # a cine series opens as one (t, z, y, x) image, a slider for its 5 frames, scaled like a frame; Segment
    # labels every frame into one 4-D Labels layer; Fine-tune offers it too (test_plugin.py fine-tunes a cine)
    write_nifti_ijk(tmp_path / "cine.nii.gz", np.random.rand(24, 20, 4, 5).astype(np.float32), np.diag([1.5, 1.5, 8, 1]))
    viewer.open(str(tmp_path / "cine.nii.gz"), plugin="napari-coral")
    cine = viewer.layers["cine"]
    assert cine.data.shape == (5, 4, 20, 24) and tuple(cine.scale) == (1.0, 8.0, 1.5, 1.5)
    assert cine.metadata["frames"] == 5
    assert [widget.image_picker.itemText(i) for i in range(widget.image_picker.count())] == ["cine"]
    finetune = _dock(viewer, "Fine-tune")
    assert [finetune.image_picker.itemText(i) for i in range(finetune.image_picker.count())] == ["cine"]
    widget.image_picker.setCurrentText("cine")
    widget.segment()
    qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=120_000)
    labels = viewer.layers["cine labels"]
    assert labels.data.shape == (5, 4, 20, 24) and tuple(labels.scale) == tuple(cine.scale), widget.status.text()
    from coral_core.infer import segment_volume
    from napari_coral._session import session_for

    np.testing.assert_array_equal(labels.data[3], segment_volume(session_for(viewer).model, np.asarray(cine.data[3])))
    # the writer (File > Save Selected Layers) keeps the series as one 4-D NIfTI with the cine's geometry
    from coral_core.volume import load_frames

    write_labels(str(tmp_path / "cine_labels.nii.gz"), labels.data,
                 {"metadata": labels.metadata, "scale": labels.scale, "features": labels.features})
    frames = load_frames(tmp_path / "cine_labels.nii.gz")
    assert len(frames) == 5 and frames[0].spacing == (8.0, 1.5, 1.5)
    np.testing.assert_array_equal(np.stack([f.array for f in frames]), labels.data)
    # opened again, the file is one 4-D Labels layer with its class names, which Fine-tune offers with the cine
    # (it opened as an image, which Fine-tune could not train on)
    reopened = viewer.open(str(tmp_path / "cine_labels.nii.gz"), plugin="napari-coral")[0]
    assert type(reopened).__name__ == "Labels" and reopened.data.shape == (5, 4, 20, 24)
    assert tuple(reopened.scale) == tuple(cine.scale) and list(reopened.features["class"]) == list(labels.features["class"])
    np.testing.assert_array_equal(reopened.data, labels.data)
    assert reopened.name in [finetune.labels_picker.itemText(i) for i in range(finetune.labels_picker.count())]


def test_a_device_this_computer_lacks_is_greyed_out_and_refused_in_one_sentence(make_napari_viewer):
    """Apple MPS is never available on Linux: its item is greyed out in every dock's device picker, and chosen all
    the same (as a setting carried over could be), each button says so in its status line and starts nothing."""
    import sys

    if sys.platform == "darwin":
        pytest.skip("MPS may be available on macOS")
    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(6, 32, 32).astype(np.float32), name="scan")
    labels = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="painted")
    labels.data[2, 5:10, 5:10] = 1
    _small_model(viewer, n_classes=3)
    docks = {name: _dock(viewer, name) for name in ("Segment", "Embedding", "Model", "Fine-tune")}
    fine = docks["Fine-tune"]
    fine.image_picker.setCurrentText("scan")
    fine.labels_picker.setCurrentText("painted")
    presses = {"Segment": ("segment", "status"), "Embedding": ("embed", "status"),
               "Model": ("pretrain", "pretrain_status"), "Fine-tune": ("finetune", "status")}
    for name, widget in docks.items():
        picker = widget.device_picker
        mps = picker.findText("mps")
        assert not picker.model().item(mps).isEnabled() and picker.model().item(picker.findText("cpu")).isEnabled()
        picker.setCurrentIndex(mps)
        press, status = presses[name]
        assert getattr(widget, press)() is None, name
        one_sentence(getattr(widget, status).text(), "Device mps: not available on this computer; choose auto or cpu")
    assert "scan labels" not in viewer.layers and not docks["Embedding"].trajectories


def test_finetune_widget_refuses_mismatched_or_out_of_range_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(6, 32, 32).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Fine-tune")
    other = viewer.add_labels(np.zeros((6, 30, 32), np.uint8), name="other shape")
    other.data[2, 5:10, 5:10] = 1
    widget.image_picker.setCurrentText("scan")
    widget.labels_picker.setCurrentText("other shape")
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "other shape", "(6, 30, 32)", "(6, 32, 32)")
    beyond = np.zeros((6, 32, 32), np.uint8)
    beyond[3, 4:12, 4:12] = 5
    viewer.add_labels(beyond, name="too many classes")
    widget.labels_picker.setCurrentText("too many classes")
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "label 5", "2 classes (c1, c2)", "under Classes")
    widget.classes.setText("a, b, c, d")  # named, but one short
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "label 5", "Classes names 4 classes (a, b, c, d)")
    widget.classes.setText("a, b, A")
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "Classes", "'A' is listed twice")
    widget.classes.setText("a|b, B")
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "Classes", "'B' is listed twice")
    assert not (session_for(viewer).meta.get("training") or {})  # the model was not touched


def test_a_layer_whose_scale_a_model_cannot_see_at_is_named_by_segment_and_fine_tune(make_napari_viewer, qtbot):
    """A layer of pixels 0.0015 mm wide (metres as millimetres) and a model at 1.5 mm: Segment and Embedding say so
    naming the layer (Segment asked for gigabytes to pad each slice to the model's square), and Fine-tune refuses it
    before anything is saved or trained."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((4, 24, 20)).astype(np.float32), name="metres",
                     scale=(3.0, 0.0015, 0.0015))
    model = build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=2,
                                   class_names=["background", "LV"], pixel_spacing=1.5))
    session_for(viewer).set_model(model, {"training": {}}, "tiny test model at 1.5 mm")
    finer = "metres: its pixels of 0.0015 x 0.0015 mm are 1e+03 times finer than the model's 1.5 mm"
    widget = _dock(viewer, "Segment")
    widget.segment()
    qtbot.waitUntil(lambda: "failed" in widget.status.text(), timeout=60_000)
    assert widget.status.text().startswith(f"Segmentation failed: {finer}")
    assert "metres labels" not in viewer.layers
    paint = np.zeros((4, 24, 20), np.uint8)
    paint[1, 5:10, 5:10] = 1
    viewer.add_labels(paint, name="paint", scale=(3.0, 0.0015, 0.0015))
    tune = _dock(viewer, "Fine-tune")
    tune.image_picker.setCurrentText("metres")
    tune.labels_picker.setCurrentText("paint")
    assert tune.finetune() is None
    one_sentence(tune.status.text(), finer, "check the spacing in its header")
    assert tune.runner is None  # nothing started
    embedding = _dock(viewer, "Embedding")
    qtbot.waitUntil(lambda: embedding.volumes.checked() == ["metres"], timeout=5_000)
    embedding.embed()
    qtbot.waitUntil(lambda: "failed" in embedding.status.text(), timeout=60_000)
    assert embedding.status.text().startswith(f"Embedding failed: {finer}")


def test_annotations_that_cannot_be_saved_stop_the_fine_tuning_before_it_trains(tmp_path, make_napari_viewer, qtbot):
    """The job saves the annotations before it trains; where they cannot be written (the annotations folder is a
    file here), it stops with one sentence naming the file, nothing is trained and the model is kept."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.rand(6, 32, 32).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    session = session_for(viewer)
    model = session.model
    labels = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="painted")
    labels.data[2, 5:10, 5:10] = 1
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "annotations").write_text("not a folder")
    widget = _dock(viewer, "Fine-tune")
    widget.image_picker.setCurrentText("scan")
    widget.labels_picker.setCurrentText("painted")
    widget.steps.setValue(2)
    runner = widget.finetune(mode="thread")
    with qtbot.waitSignal(runner.failed, timeout=60_000) as failed:
        pass
    one_sentence(failed.args[0], "could not save the annotations to", "painted-", "NAPARI_CORAL_HOME",
                 "nothing was trained")
    assert session.model is model and not widget.losses
    assert widget.status.text().endswith("nothing was trained. The previous model is kept.")  # two sentences
    assert widget.finetune_button.isEnabled()


def test_a_multiscale_labels_layer_with_a_long_name_fine_tunes_and_negative_labels_are_named(
        tmp_path, make_napari_viewer, qtbot):
    """Found by benchmarks/fuzz_layers.py: Fine-tune read a multiscale Labels layer's levels as one array (TypeError);
    a layer's name of 300 letters made the annotations' file name too long for the disk, said as "free some disk
    space"; label -1 was refused by the job as "values up to 1 but the model has 3 classes"."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    paint = np.zeros((6, 32, 32), np.uint8)
    paint[2, 5:12, 5:12] = 1
    viewer.add_labels([paint, paint[:, ::2, ::2]], multiscale=True, name="x" * 300)
    widget = _dock(viewer, "Fine-tune")
    widget.image_picker.setCurrentText("scan")
    widget.labels_picker.setCurrentText("x" * 300)
    widget.steps.setValue(2)
    runner = widget.finetune(mode="thread")
    with qtbot.waitSignal(runner.finished, timeout=60_000):
        pass
    assert widget.autosaved.name == f"{'x' * 100}{widget.autosaved.name[100:]}" and len(widget.autosaved.name) < 140
    np.testing.assert_array_equal(load_volume(widget.autosaved).array, paint)  # the full-resolution level
    negative = viewer.add_labels(paint.astype(np.int8) * -1, name="minus one")
    widget.labels_picker.setCurrentText("minus one")
    assert widget.finetune() is None
    one_sentence(widget.status.text(), "labels layer 'minus one' uses label -1", "paint those voxels with 0 or a class")
    assert negative.data.min() == -1


def test_gzip_bomb_like_header_is_refused(tmp_path):
    """A .nii.gz whose header claims a huge volume but holds no data: refused, not allocated."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as fh:
        fh.write(header.binaryblock + b"\x00" * 4)
    with pytest.raises(ValueError) as info:
        read_volume(str(tmp_path / "huge.nii.gz"))
    one_sentence(str(info.value), "huge.nii.gz", "header claims a 30000 x 30000 x 30000 volume")


@pytest.mark.parametrize("transform", [{"shear": (0.3, 0.0, 0.2)},
                                       {"affine": np.array([[0.9, 0.3, 0, 0], [-0.3, 0.9, 0, 0], [0, 0, 1, 0],
                                                            [0, 0, 0, 1.0]])},
                                       {"scale": (-2.0, 1.0, -1.0), "rotate": 30}])
def test_going_to_a_slice_shows_it_in_a_sheared_or_tilted_layer(make_napari_viewer, transform):
    """Found by benchmarks/fuzz_layers.py: a suggested slice of a sheared layer, clicked, showed slice 0 (the
    viewer was moved to where the slice's corner lies, and a shear out of the slices' plane puts the point shown
    elsewhere); where the layer is tilted so, the point keeps its place in the slice."""
    import warnings

    from napari_coral._layers import show_index, shown_index

    viewer = make_napari_viewer()
    layer = viewer.add_image(np.random.default_rng(0).random((6, 40, 40)).astype(np.float32), **transform)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # napari: non-orthogonal slicing is not fully supported
        for k in [5, 0, 3, 4]:
            show_index(viewer, layer, (k,))
            assert shown_index(viewer, layer) == (k,)


def test_torch_s_error_while_segmenting_is_said_and_the_panel_comes_back(make_napari_viewer, qtbot, monkeypatch,
                                                                         capsys):
    """A RuntimeError (torch's errors: out of memory, a device's failure) raised while segmenting: superqt takes a
    generator worker's RuntimeError for a deleted worker and emitted nothing, so the panel stayed at "Segmenting..."
    with its button greyed out for good. It is said in one line, type and first line, its traceback in the log."""
    import coral_core.infer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has a total capacity of 8 GiB")
        yield

    monkeypatch.setattr(coral_core.infer, "iter_segment_series", out_of_memory)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Segment")
    widget.segment()
    qtbot.waitUntil(lambda: widget.segment_button.isEnabled(), timeout=30_000)
    assert widget.status.text() == "Segmentation failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "Traceback" in capsys.readouterr().err and "scan labels" not in viewer.layers
    # Fine-tune's re-segmenting with the new model: its status stayed "Fine-tuned. Loading the model and
    # re-segmenting the volume..." when that failed
    paint = np.zeros((6, 32, 32), np.uint8)
    paint[2, 5:12, 5:12] = 1
    viewer.add_labels(paint, name="paint")
    tune = _dock(viewer, "Fine-tune")
    tune.image_picker.setCurrentText("scan")
    tune.labels_picker.setCurrentText("paint")
    tune.steps.setValue(2)
    tune.finetune(mode="thread")
    qtbot.waitUntil(lambda: "re-segmenting failed" in tune.status.text(), timeout=60_000)
    one_sentence(tune.status.text(), "Fine-tuned, but re-segmenting failed: RuntimeError: CUDA out of memory.",
                 "The model is kept in", "Press Segment in the Segment panel to try again.")
    assert session_for(viewer).source == "fine-tuned on scan" and tune.finetune_button.isEnabled()


def test_pretraining_names_the_layer_whose_spacing_a_model_in_millimetres_cannot_use(make_napari_viewer, qtbot):
    """The job's sentence named the image by its key in the job's file (`v0001: its pixel spacing ...`). A layer
    flipped by a negative scale has pixels of its scale's size (it was refused: "pixel spacing 1 x -1 mm is not a
    size")."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="flipped",
                     scale=(2.0, 1.0, -1.0))
    viewer.add_image(np.random.default_rng(1).random((6, 32, 32)).astype(np.float32), name="metres",
                     scale=(2.0, 0.001, 0.001))
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Model")
    widget.physical_scale.setChecked(True)
    widget.epochs.setValue(1)
    runner = widget.pretrain(mode="thread")
    with qtbot.waitSignal(runner.failed, timeout=60_000) as failed:
        pass
    one_sentence(failed.args[0], "metres: its pixels of 0.001 x 0.001 mm are 1e+03 times finer than the model's 1 mm")


@pytest.mark.parametrize("action", ["remove the scan", "replace its data", "load another model"])
def test_what_the_user_changes_while_segmenting_is_said_and_the_panel_comes_back(make_napari_viewer, qtbot,
                                                                                 monkeypatch, action):
    """Found by benchmarks/fuzz_midjob.py: the scan removed while it was segmented left the Segment panel at
    "Segmenting..." with its button greyed out for good (and Fine-tune's status at "re-segmenting" after it); labels of
    the old shape went into "scan labels" after the scan was given data of another shape; a model loaded meanwhile
    was named in the status as the one that segmented."""
    import threading

    import coral_core.infer

    go, real = threading.Event(), coral_core.infer.iter_segment_series

    def held(*args, **kwargs):  # the segmentation waits until the user has acted
        go.wait(30)
        yield from real(*args, **kwargs)

    monkeypatch.setattr(coral_core.infer, "iter_segment_series", held)
    viewer = make_napari_viewer()
    scan = viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Segment")
    assert widget.segment() is not None
    assert widget.segment() is None  # called again while it runs, as its greyed-out button cannot be
    if action == "remove the scan":
        viewer.layers.remove(scan)
    elif action == "replace its data":
        scan.data = np.zeros((4, 20, 20), np.float32)
    else:
        session_for(viewer).set_model(build_model(UNetConfig(base_filters=4, depth=2, image_size=32, n_classes=3,
                                                             class_names=["background", "x", "y"])), {}, "another")
    go.set()
    qtbot.waitUntil(widget.segment_button.isEnabled, timeout=60_000)
    text = widget.status.text()
    if action == "remove the scan":
        assert text == "Segmentation failed: layer 'scan' was closed while it was segmented, so nothing was written"
    elif action == "replace its data":
        assert text == ("Segmentation failed: layer 'scan' changed from 6 x 32 x 32 to 4 x 20 x 20 while it was "
                        "segmented, so nothing was written; segment it again")
    else:
        assert text == "Wrote scan labels (tiny test model)."
        assert list(viewer.layers["scan labels"].features["class"]) == ["background", "c1", "c2"]
    assert ("scan labels" in viewer.layers) == (action == "load another model")


def test_pretrain_called_again_while_it_runs_starts_nothing(make_napari_viewer, qtbot):
    """A second press while pretraining ran (its button is greyed out, so only by calling the panel) made a new job
    folder in place of the running job's, which removed it: that job then failed, saying "napari-coral-...: output
    folder does not exist; create it first" (benchmarks/fuzz_midjob.py)."""
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 32, 32)).astype(np.float32), name="scan")
    _small_model(viewer, n_classes=3)
    widget = _dock(viewer, "Model")
    widget.epochs.setValue(1)
    runner = widget.pretrain(mode="thread")
    assert runner is not None and widget.pretrain(mode="thread") is None
    with qtbot.waitSignal(runner.finished, timeout=120_000):
        pass
    assert widget.pretrain_status.text().startswith("Pretraining finished.")
