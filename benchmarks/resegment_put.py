"""How long putting a segmentation into its Labels layer holds napari's thread, with the edits kept.

    xvfb-run -a python benchmarks/resegment_put.py [--slices 200] [--size 512] [--repeats 3]

``napari_coral._widgets.segment.put_labels`` runs on napari's thread when a segmentation is done: it adds the
Labels layer the first time and, from the second time on, hashes every slice of the layer as it is now against the
digests kept when it was written, keeps the slices edited since (two here) and replaces the layer's data. The
digests of the new labels are computed by the segmentation's worker thread, and so are given here, as there. Each
repeat times the first put (a new layer), a second one after two slices were edited, and, for comparison, replacing
the layer's data alone (what a second put did before edits were kept).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import napari

    from napari_coral._layers import slice_digests
    from napari_coral._widgets.segment import put_labels

    s, n = args.slices, args.size
    viewer = napari.Viewer(show=False)
    rng = np.random.default_rng(0)
    image = viewer.add_image(rng.random((s, n, n), dtype=np.float32), name="scan")
    names = ["background", "RV", "myocardium", "LV"]
    rows = []
    for _ in range(args.repeats):
        if "scan labels" in viewer.layers:
            viewer.layers.remove("scan labels")
        labels = rng.integers(0, 4, (s, n, n), dtype=np.uint8)
        t0 = time.perf_counter()
        hashed = slice_digests(labels)  # the worker's part
        t1 = time.perf_counter()
        layer, _ = put_labels(viewer, image, labels, names, hashed)
        t2 = time.perf_counter()
        layer.data[3, :20, :20] = 1  # edited by hand
        layer.data[7] = 0
        again = rng.integers(0, 4, (s, n, n), dtype=np.uint8)
        hashed = slice_digests(again)
        t3 = time.perf_counter()
        _, kept = put_labels(viewer, image, again, names, hashed)
        t4 = time.perf_counter()
        assert kept == 2
        third = rng.integers(0, 4, (s, n, n), dtype=np.uint8)
        t5 = time.perf_counter()
        layer.data = third  # what a second put did before edits were kept: replace the data alone
        t6 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t4 - t3, t6 - t5))
    print(f"# {s} x {n} x {n} uint8 labels; {platform.processor() or platform.machine()}, napari {napari.__version__}")
    print("| repeat | digests (worker thread) s | first put, new layer (napari's thread) s | second put, 2 edits kept "
          "(napari's thread) s | replacing the data alone s |")
    print("|---|---|---|---|---|")
    for i, (hashing, first, second, plain) in enumerate(rows):
        print(f"| {i} | {hashing:.3f} | {first:.3f} | {second:.3f} | {plain:.3f} |")
    viewer.close()


if __name__ == "__main__":
    main()
