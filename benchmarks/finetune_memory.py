"""Peak memory of `coral finetune DATASET_DIR` on many large labelled scans.

    python benchmarks/finetune_memory.py                          # 8 scans of 100 x 512 x 512, this tree
    python benchmarks/finetune_memory.py --volumes 24 --source /tmp/old --source .

Writes an imagesTr/labelsTr folder of CT-sized scans (int16 images, uint8 label maps with a
labelled disc on every fifth slice) as gzipped NIfTI, as datasets such as ACDC and the Medical
Segmentation Decathlon ship them (an uncompressed file is memory-mapped, not copied), then runs `coral finetune` on the
folder, as a user would, once per source tree given (each in its own process, with that tree
first on PYTHONPATH), and reports each run's peak resident memory (the child's ru_maxrss) and
time. Fine-tuning itself is kept short (2 steps of 2 slices, 4 base filters, no embedding loss):
what is measured is how the scans are held while training. Before 2026-11-28 every labelled scan
was held at full resolution until fine-tuning ended; now a scan whose model size is known as it
is read (wider than the automatic size's cap of 256, or --image-size, or --init) is kept only at
that size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_dataset(folder: Path, volumes: int, slices: int, side: int) -> None:
    import nibabel as nib
    import numpy as np

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:side, :side]
    disc = (y - side / 2) ** 2 + (x - side / 2) ** 2 < (side / 6) ** 2
    for i in range(volumes):
        image = rng.integers(-1000, 1000, (side, side, slices), dtype=np.int16)
        labels = np.zeros((side, side, slices), np.uint8)
        labels[disc, ::5] = 1
        image[labels == 1] += 1500
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / "imagesTr" / f"case{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(folder / "labelsTr" / f"case{i:03d}.nii.gz"))


def run(source: Path, folder: Path, out: Path) -> dict:
    """One `coral finetune` run from ``source``: its peak RSS (GB) and wall time (s)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    cmd = [sys.executable, "-m", "coral_core.cli", "finetune", str(folder), "--steps", "2", "--batch-size", "2",
           "--base-filters", "4", "--embedding-weight", "0", "--device", "cpu", "--out", str(out)]
    t = time.perf_counter()
    # run from the tree itself: `python -m` puts the working folder first on the path
    proc = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"coral finetune from {source} failed:\n{proc.stderr.read()}")
    check = subprocess.run([sys.executable, "-c", "import coral_core; print(coral_core.__file__)"], env=env, cwd=source,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(check).resolve().is_relative_to(source):
        raise SystemExit(f"coral_core came from {check}, not from {source}")
    return {"peak_gb": usage.ru_maxrss * 1024 / 1e9, "seconds": seconds}


def revision(source: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--source", type=Path, action="append",
                    help="a source tree to run coral from (repeatable; default: this one)")
    args = ap.parse_args()
    sources = args.source or [ROOT]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        write_dataset(folder, args.volumes, args.slices, args.side)
        raw_gb = args.volumes * args.slices * args.side**2 * 3 / 1e9
        print(f"{args.volumes} labelled scans of {args.slices} x {args.side} x {args.side} (int16 image + uint8 labels, "
              f"{raw_gb:.2f} GB uncompressed); coral finetune DIR --steps 2 --batch-size 2 --base-filters 4 "
              "--embedding-weight 0")
        print("| source | revision | peak RSS GB | seconds |")
        print("|---|---|---:|---:|")
        for source in sources:
            r = run(source.resolve(), folder, Path(tmp) / "m.safetensors")
            print(f"| {source} | {revision(source)} | {r['peak_gb']:.2f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
