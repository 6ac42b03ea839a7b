"""How responsive napari stays while the Fine-tune widget trains: child process vs thread.

    xvfb-run -a python benchmarks/gui_responsiveness.py [--steps 150] [--repeats 2]

A QTimer fires every 20 ms on the GUI thread during fine-tuning; the gaps between its ticks
are the event loop's pauses (a frozen viewer shows as a long gap), from pressing
Fine-tune until the re-segmented labels are in the viewer. Same sample, model, slices and
steps for both modes; prints a table of the longest pause, the 99th percentile pause and
the training wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def run(mode: str, steps: int) -> dict:
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from coral_core.model import UNetConfig, build_model
    from napari_coral._session import session_for

    viewer = napari.Viewer(show=False)
    viewer.open_sample("napari-coral", "phantom")
    session_for(viewer).set_model(build_model(UNetConfig(base_filters=16, image_size=128)), {"training": {}}, "fresh")
    _, widget = viewer.window.add_plugin_dock_widget("napari-coral", "Fine-tune")
    truth = viewer.layers["phantom ground truth"].data
    layer = viewer.add_labels(np.zeros_like(truth), name="paint")
    widget.labels_picker.setCurrentText("paint")
    widget.image_picker.setCurrentText("phantom")
    for k in (1, truth.shape[0] // 2, truth.shape[0] - 2):
        layer.data[k] = truth[k]
    widget.update_touched()
    widget.steps.setValue(steps)
    beats = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    app = QApplication.instance()
    timer.start()
    t0 = time.perf_counter()
    runner = widget.finetune(mode=mode)
    while runner.running:
        app.processEvents()
        time.sleep(0.002)
    wall = time.perf_counter() - t0
    while widget.segment_worker is None or widget.segment_worker.is_running:  # the re-segmentation
        app.processEvents()
        time.sleep(0.002)
    timer.stop()
    gaps = np.diff(beats) * 1000
    viewer.close()
    return {"mode": mode, "max_ms": float(gaps.max()), "p99_ms": float(np.percentile(gaps, 99)), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("NAPARI_CORAL_HOME", tempfile.mkdtemp())
    rows = [run(mode, args.steps) for _ in range(args.repeats) for mode in ("process", "thread")]
    print(f"fine-tuning {args.steps} steps (base 16, 128 px, batch 8), {os.cpu_count()} CPU cores")
    print("| mode | longest pause ms | p99 pause ms | wall s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['max_ms']:.0f} | {r['p99_ms']:.0f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
