"""How long pressing Fine-tune holds napari's thread for a large scan, and what writing its annotations costs.

    xvfb-run -a python benchmarks/finetune_press.py [--slices 200] [--size 512] [--repeats 3]

A (slices, size, size) float32 image and a uint8 Labels layer of its shape with three painted slices (a disc each)
are open in a napari viewer with a small model (16 base filters, 128 px). Each repeat presses Fine-tune (thread mode)
and times the call, from the press until it returns to the event loop (everything the panel does on napari's
thread before the job takes over), then cancels the job and waits for it. Beside it, the time ``write_labels`` takes
for the same layer: the annotations' save, which ran on napari's thread at the press until the tenth session and
now runs in the job's thread before it trains.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import os

    os.environ["NAPARI_CORAL_HOME"] = tempfile.mkdtemp(prefix="coral-press-")
    import napari
    from qtpy.QtWidgets import QApplication

    from coral_core.model import UNetConfig, build_model
    from napari_coral._session import session_for
    from napari_coral._writer import write_labels

    s, n = args.slices, args.size
    viewer = napari.Viewer(show=False)
    image = viewer.add_image(np.random.default_rng(0).random((s, n, n), dtype=np.float32), name="scan")
    session_for(viewer).set_model(build_model(UNetConfig(base_filters=16, image_size=128)), {"training": {}}, "fresh")
    _, widget = viewer.window.add_plugin_dock_widget("napari-coral", "Fine-tune")
    labels = np.zeros(image.data.shape, np.uint8)
    yy, xx = np.mgrid[:n, :n]
    for k in (s // 4, s // 2, 3 * s // 4):
        labels[k][(yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 5) ** 2] = 1
    layer = viewer.add_labels(labels, name="paint")
    widget.image_picker.setCurrentText("scan")
    widget.labels_picker.setCurrentText("paint")
    widget.update_touched()
    widget.steps.setValue(1000)
    app = QApplication.instance()
    press, write = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        runner = widget.finetune(mode="thread")
        press.append(time.perf_counter() - t0)
        assert runner is not None, widget.status.text()
        widget.cancel()
        while runner.running:
            app.processEvents()
            time.sleep(0.01)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_labels(f"{tmp}/paint.nii.gz", layer.data, {"metadata": layer.metadata, "scale": layer.scale,
                                                            "features": layer.features})
            write.append(time.perf_counter() - t0)
    viewer.close()
    print(f"{platform.machine()}, {platform.processor() or 'CPU'}; image {s} x {n} x {n} float32, labels uint8 "
          f"(3 painted slices); {args.repeats} runs")
    print(f"| {'what':<50} | {'runs (s)':<20} | {'median s':>8} |")
    print(f"|{'-' * 52}|{'-' * 22}|{'-' * 10}|")
    for what, seconds in (("Fine-tune press, on napari's thread", press),
                          ("write_labels of the layer (the old press's save)", write)):
        print(f"| {what:<50} | {', '.join(f'{t:.2f}' for t in seconds):<20} | {np.median(seconds):8.2f} |")


if __name__ == "__main__":
    main()
