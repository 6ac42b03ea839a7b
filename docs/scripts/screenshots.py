"""Take the user guide's screenshots in a real napari window.

    xvfb-run -a -s "-screen 0 1800x1100x24" python docs/scripts/screenshots.py

Opens the phantom sample with the four widgets, segments it with the bundled model,
paints three slices from the ground truth, fine-tunes briefly, embeds the volume, and saves
docs/images/{segment,finetune,embedding}.png.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "images"


def wait(condition, timeout=600.0):
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.time() + timeout
    while not condition():
        if time.time() > end:
            raise TimeoutError("the widget did not finish in time")
        app.processEvents()
        time.sleep(0.01)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.01)


def main() -> None:
    os.environ.setdefault("NAPARI_CORAL_HOME", tempfile.mkdtemp())
    OUT.mkdir(exist_ok=True)
    from napari_coral.__main__ import open_viewer
    from napari_coral._widgets._common import class_colormap

    viewer = open_viewer(show=True)
    viewer.window._qt_window.resize(1750, 1050)
    docks = viewer.window.dock_widgets
    segment, finetune, embedding = docks["Segment (napari-coral)"], docks["Fine-tune (napari-coral)"], docks["Embedding (napari-coral)"]
    truth = viewer.layers["phantom ground truth"]
    truth.visible = False
    mid = viewer.layers["phantom"].data.shape[0] // 2
    viewer.dims.set_point(0, viewer.layers["phantom"].data_to_world((mid, 0, 0))[0])

    segment.segment()
    wait(lambda: "phantom labels" in viewer.layers)
    viewer.window.screenshot(str(OUT / "segment.png"), canvas_only=False)

    annotations = viewer.add_labels(np.zeros_like(truth.data), name="my annotations", scale=truth.scale, metadata=dict(truth.metadata))
    annotations.colormap = class_colormap(4)
    finetune.labels_picker.setCurrentText("my annotations")
    finetune.image_picker.setCurrentText("phantom")
    n = truth.data.shape[0]
    for k in (1, mid, n - 2):
        idx = np.nonzero(truth.data[k])
        annotations.data_setitem((np.full_like(idx[0], k), *idx), truth.data[k][idx])
    finetune.update_touched()
    for k in (mid + 1,):  # one more annotated slice, held out for validation
        idx = np.nonzero(truth.data[k])
        annotations.data_setitem((np.full_like(idx[0], k), *idx), truth.data[k][idx])
    finetune.update_touched()
    finetune.validation_slices.setText(str(mid + 1))
    finetune.steps.setValue(60)
    runner = finetune.finetune()
    wait(lambda: not runner.running)
    wait(lambda: finetune.segment_worker is not None and not finetune.segment_worker.is_running)
    viewer.layers["phantom labels"].visible = True
    viewer.dims.set_point(0, viewer.layers["phantom"].data_to_world((mid + 3, 0, 0))[0])  # a slice nobody painted
    viewer.window.screenshot(str(OUT / "finetune.png"), canvas_only=False)

    viewer.layers.remove("phantom ground truth")
    worker = embedding.embed()
    wait(lambda: not worker.is_running and embedding.trajectories)
    embedding.suggest()
    embedding.go_to("phantom", 2)
    wait(lambda: True)
    viewer.window.screenshot(str(OUT / "embedding.png"), canvas_only=False)
    viewer.close()
    print("wrote", *sorted(p.name for p in OUT.glob("*.png")))


if __name__ == "__main__":
    main()
