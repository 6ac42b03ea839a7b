"""A rough stand-in for the brain-MRI acceptance run, on a synthetic brain-like volume.

    python benchmarks/brain_check.py [--size 192] [--slices 120]

Makes an axial T1-like volume (folded grey-matter ribbon around white matter, CSF, skull and
scalp, a smooth bias field, Rician noise) with labels 0 background, 1 GM, 2 WM; runs the CLI
exactly as a user would (pretrain 3 epochs -> finetune on three annotated slices ->
segment) and scores the unannotated slices against a per-voxel intensity classifier
(each intensity bin labelled with its majority class on the same three slices). This is NOT real MRI:
it checks that the pipeline learns a GM/WM task from three slices and how long it takes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from coral_core.metrics import dice_per_class
from coral_core.volume import load_volume, save_volume


def synthetic_brain(size: int, n_slices: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n_slices, 0:size, 0:size].astype(np.float32)
    zc, yc, xc = (z - n_slices / 2) / (n_slices / 2), (y - size / 2) / (size / 2), (x - size / 2) / (size / 2)
    r = np.sqrt((xc / 0.78) ** 2 + (yc / 0.92) ** 2 + (zc / 0.95) ** 2)
    theta, phi = np.arctan2(yc, xc), np.arctan2(zc, np.sqrt(xc**2 + yc**2))
    folds = 0.05 * np.sin(9 * theta + 3 * np.sin(4 * phi)) * np.cos(7 * phi) + 0.03 * np.sin(17 * theta - 5 * phi)
    brain_edge = 0.82 + folds
    wm_edge = brain_edge - 0.10 - 0.02 * np.sin(11 * theta + 2 * phi)
    labels = np.zeros(r.shape, np.uint8)
    labels[r < brain_edge] = 1
    labels[r < wm_edge] = 2
    ventricles = ((xc / 0.12) ** 2 + (yc / 0.3) ** 2 + (zc / 0.35) ** 2) < 1
    labels[ventricles] = 0
    image = np.zeros(r.shape, np.float32)
    image[(r < 1.0) & (r >= 0.9)] = 0.9  # scalp fat
    image[(r < 0.9) & (r >= brain_edge)] = 0.15  # CSF / skull
    image[labels == 1] = 0.55
    image[labels == 2] = 0.8
    image[ventricles] = 0.15
    image = ndimage.gaussian_filter(image, 1.0)
    bias = np.exp(0.25 * (xc * 0.8 - yc * 0.5 + 0.4 * zc * xc))
    sigma = 0.05
    image = np.sqrt((image * bias + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return (image * 1000).astype(np.float32), labels


def intensity_classifier(image, labels, slices, test, bins: int = 128):
    """The best per-voxel rule that sees intensity only: each intensity bin gets the class
    most frequent in that bin on the annotated ``slices`` (nearest filled bin if empty)."""
    edges = np.quantile(image[slices], np.linspace(0, 1, bins + 1)[1:-1])
    train_bin = np.digitize(image[slices].ravel(), edges)
    counts = np.zeros((bins, 3))
    np.add.at(counts, (train_bin, labels[slices].ravel()), 1)
    filled = np.flatnonzero(counts.sum(1))
    nearest = filled[np.abs(np.arange(bins)[:, None] - filled[None]).argmin(1)]
    rule = counts[nearest].argmax(1)
    return rule[np.digitize(image[test], edges)]


def coral(*args):
    proc = subprocess.run([sys.executable, "-m", "coral_core.cli", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="passed to every command (default: the commands' own default)")
    args = ap.parse_args()
    precision = [] if args.cpu_bf16 is None else ["--cpu-bf16" if args.cpu_bf16 else "--no-cpu-bf16"]
    d = Path(tempfile.mkdtemp())
    image, labels = synthetic_brain(args.size, args.slices)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    save_volume(d / "t1.nii.gz", image, affine)
    save_volume(d / "gt.nii.gz", labels, affine)
    n = args.slices
    annotated = [n // 4, n // 2, 3 * n // 4]
    test = [k for k in range(n) if k not in annotated and labels[k].any()]
    t0 = time.perf_counter()
    pre = coral("pretrain", d / "t1.nii.gz", "--epochs", 3, "--out", d / "pre.safetensors", "--json", *precision)
    t1 = time.perf_counter()
    coral("finetune", d / "t1.nii.gz", "--labels", d / "gt.nii.gz", "--slices", ",".join(map(str, annotated)),
               "--init", d / "pre.safetensors", "--class-names", "GM,WM", "--out", d / "ft.safetensors", "--json",
          *precision)
    t2 = time.perf_counter()
    coral("segment", d / "t1.nii.gz", "--model", d / "ft.safetensors", "--out", d / "seg.nii.gz", "--json", *precision)
    t3 = time.perf_counter()
    seg = load_volume(d / "seg.nii.gz").array
    ours = dice_per_class(seg[test], labels[test], 3)
    base = dice_per_class(intensity_classifier(image, labels, annotated, test), labels[test], 3)
    print(f"synthetic brain {n} x {args.size} x {args.size}, annotated {annotated}, scored on {len(test)} slices")
    print(f"pretrain {t1 - t0:.0f} s ({pre['steps']} steps), finetune {t2 - t1:.0f} s, segment {t3 - t2:.0f} s")
    print("| method | GM Dice | WM Dice | mean |")
    print("|---|---:|---:|---:|")
    for name, d_ in (("coral pretrain + finetune", ours), ("intensity classifier", base)):
        print(f"| {name} | {d_[1]:.3f} | {d_[2]:.3f} | {(d_[1] + d_[2]) / 2:.3f} |")


if __name__ == "__main__":
    main()
