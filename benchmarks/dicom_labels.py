"""How long DICOM label objects take: writing a DICOM SEG, reading it back onto the image's grid, filling an RT
structure set's contours, writing labels as an RT structure set and filling that one.

    python benchmarks/dicom_labels.py                 # a 200-slice 512 x 512 CT-like series
    python benchmarks/dicom_labels.py --slices 50 --size 256
    python benchmarks/dicom_labels.py --frames 25 --slices 12 --size 256   # a cardiac cine: 25 phases x 12 slices

The series is written once (not timed) with the tests' DICOM writer. The labels: three nested boxes over 160
slices (label 1), 100 (label 3) and 80 (label 2); the SEG holds one frame per label and slice it covers. The RT
structure set: ten round ROIs of 100-point contours on 90 slices each, and an EXTERNAL body outline on every slice.
Its filled labels (the round ROIs cut into one another) are then written as an RT structure set of our own, and that
one filled again (checked to give the same labels). Each step runs ``--repeats`` times; every read starts from the file (the readers' per-file caches are cleared). The
first write of a process also pays for pydicom's imports and the source headers' first read.

With ``--frames T``, the series is a cine of T phases (several images at each position; the boxes move a voxel per
phase) and the labels are the cine's (t, z, y, x): the SEG is written and read back frame by frame, and the labels
are written as an RT structure set and filled again (no foreign structure set: the tests' writer names no images).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from coral_core import dicomlabels  # noqa: E402
from coral_core.volume import Volume, load_frames, load_labels_like  # noqa: E402
from helpers import write_dicom_series, write_rt_structure_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=1, help="phases of a cine series (default 1: a 3-D series)")
    args = parser.parse_args()
    s, n, t = args.slices, args.size, args.frames
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = (t, s, n, n) if t > 1 else (s, n, n)
        series = write_dicom_series(tmp / "ct", np.zeros(shape, np.int16), spacing_zyx=(2.0, 0.8, 0.8))
        frame = load_frames(series)[0]
        image = Volume(np.broadcast_to(np.uint8(0), shape), frame.affine, series) if t > 1 else frame
        one = np.zeros((s, n, n), np.uint8)
        middle = slice(s // 10, s // 10 + s * 8 // 10)
        one[middle, n // 5:n * 3 // 5, n * 3 // 10:n * 7 // 10] = 1
        one[s // 4:s // 4 + s // 2, n * 2 // 5:n // 2, n * 2 // 5:n // 2] = 3
        one[s * 3 // 10:s * 3 // 10 + s * 2 // 5, n // 4:n // 3, n // 3:n // 2] = 2
        labels = np.stack([np.roll(one, phase, axis=-1) for phase in range(t)]) if t > 1 else one
        rows = []

        def timed(what: str, run) -> None:
            seconds = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run()
                seconds.append(time.perf_counter() - t0)
            rows.append((what, seconds))

        seg = tmp / "seg.dcm"
        timed("write SEG", lambda: dicomlabels.save_dicom_seg(seg, labels, image, ["bg", "a", "b", "c"]))

        def read_seg():
            dicomlabels._seg_frames.cache_clear()
            assert (load_labels_like(seg, image).array == labels).all()

        timed("read SEG onto the grid", read_seg)
        filled = []
        if t > 1:  # a cine: our own structure set of its labels only
            filled[:] = [labels]
            rois = [(name, "ORGAN", []) for name in ("a", "b", "c")]
        else:
            rois = _foreign_structure_set(tmp, image, s, n, timed, filled)
        ours = tmp / "ours.dcm"
        names = ["bg", *(roi[0] for roi in rois)]
        timed("write its labels as an RT structure set",
              lambda: dicomlabels.save_rt_structure_set(ours, filled[0], image, names))
        import pydicom

        written = pydicom.dcmread(ours, stop_before_pixels=True)
        our_contours = sum(len(roi.get("ContourSequence", [])) for roi in written.ROIContourSequence)
        our_points = sum(int(c.NumberOfContourPoints) for roi in written.ROIContourSequence
                         for c in roi.get("ContourSequence", []))

        def read_ours():
            dicomlabels._structures.cache_clear()
            assert (load_labels_like(ours, image).array == filled[0]).all()

        timed(f"fill that one ({our_contours} contours)", read_ours)
        frames = int(pydicom.dcmread(seg, stop_before_pixels=True).NumberOfFrames)
    what = f"cine of {t} phases x {s} x {n} x {n}" if t > 1 else f"series {s} x {n} x {n}"
    print(f"{platform.machine()}, {platform.processor() or 'CPU'}; {what}; SEG of {frames} frames; "
          f"our RT structure set: {our_contours} contours, {our_points} points; {args.repeats} runs each")
    print(f"| {'step':<40} | {'runs (s)':<22} | {'median s':>8} |")
    print(f"|{'-' * 42}|{'-' * 24}|{'-' * 10}|")
    for what, seconds in rows:
        print(f"| {what:<40} | {', '.join(f'{t:.2f}' for t in seconds):<22} | {np.median(seconds):8.2f} |")


def _foreign_structure_set(tmp: Path, image, s: int, n: int, timed, filled: list) -> list:
    """Ten round ROIs of 100-point contours on 90 slices and a body outline on every slice, written by the tests'
    writer and filled (timed) into ``filled``; its ROIs."""
    rng = np.random.default_rng(0)
    rois = []
    for r in range(10):
        cx, cy, radius = *rng.uniform(n * 0.3, n * 0.7, 2), rng.uniform(n / 25, n / 8)
        angles = np.linspace(0, 2 * np.pi, 100, endpoint=False)
        outline = list(zip(cx + radius * np.cos(angles), cy + radius * np.sin(angles)))
        rois.append((f"organ {r}", "ORGAN", [(k, outline) for k in range(s // 5, s // 5 + min(90, s - s // 5))]))
    body = [(n / 50, n / 50), (n * 0.98, n / 50), (n * 0.98, n * 0.98), (n / 50, n * 0.98)]
    rois.append(("body", "EXTERNAL", [(k, body) for k in range(s)]))
    rs = write_rt_structure_set(tmp / "rs.dcm", image.affine, tuple(rois))
    contours = sum(len(roi[2]) for roi in rois)

    def read_rs():
        dicomlabels._structures.cache_clear()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the round ROIs overlap: one warning, not the subject here
            filled[:] = [load_labels_like(rs, image).array]

    timed(f"fill RT structure set ({contours} contours)", read_rs)
    return rois


if __name__ == "__main__":
    main()
