"""Does keeping each class's largest connected piece (`coral segment --largest-component`) help on phantoms?

    python benchmarks/largest_component.py                  # 30 test subjects, the bundled model and two weak ones
    python benchmarks/largest_component.py --subjects 10 --weak-seeds 0

Models:

* ``demo``: the bundled demo model (CORAL-pretrained, fine-tuned on two whole phantom subjects);
* ``3 slices, seed S``: what a user gets from painting three slices of one scan: a U-Net from random init at the
  product's settings (16 filters, 128 x 128) fine-tuned for 200 steps on slices 1, middle and last but one of
  phantom subject 1000 + S (the engine's defaults otherwise).

Each segments the same test subjects (phantom seeds 500, 501, ...). Every segmentation is scored as it is (``raw``)
and after ``coral_core.infer.keep_largest_components`` (pieces joined through faces, edges or corners: ``26``), and
after the same with pieces joined through faces only (``6``, scipy's default, for comparison). The table gives the
mean foreground Dice and HD95 (mm; infinite ones left out, as `coral evaluate` does) and, for each way of keeping
pieces, its difference from ``raw`` paired by subject, with the standard error over subjects, how many subjects
it made better and worse, and the voxels it turned to background per subject.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from coral_core.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import keep_largest_components, segment_volume  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNet, UNetConfig  # noqa: E402
from coral_core.phantom import make_phantom  # noqa: E402


def weak_model(seed: int, steps: int) -> UNet:
    import torch

    torch.manual_seed(seed)
    image, labels = make_phantom(1000 + seed)
    n = image.shape[0]
    painted = [1, n // 2, n - 2]
    cfg = FinetuneConfig(steps=steps, seed=seed, device="cpu")
    return finetune(cfg, UNet(UNetConfig()), [image.array], [labels.array], [painted]).model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=30, help="test subjects (default 30)")
    parser.add_argument("--weak-seeds", type=int, nargs="*", default=[0, 1], help="seeds of the 3-slice models")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of the 3-slice models")
    args = parser.parse_args()

    loaded = load_checkpoint(bundled_model_path())
    models = {"demo": loaded[0] if isinstance(loaded, tuple) else loaded.model}
    for seed in args.weak_seeds:
        t0 = time.perf_counter()
        models[f"3 slices, seed {seed}"] = weak_model(seed, args.steps)
        print(f"# fine-tuned the 3-slice model of seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    tests = [make_phantom(500 + k) for k in range(args.subjects)]

    print(f"\n{args.subjects} phantom test subjects (seeds 500-{499 + args.subjects}); differences from raw paired by "
          "subject, +- the standard error over subjects\n")
    head = "| model | kept | Dice | diff | better/worse | HD95 mm | diff | voxels removed |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, model in models.items():
        rows = {"raw": [], "26": [], "6": []}
        for image, truth in tests:
            seg = segment_volume(model, image.array)
            ways = (("raw", (seg, 0)), ("26", keep_largest_components(seg)),
                    ("6", keep_largest_components(seg, connectivity=1)))
            for kept, (labels, removed) in ways:
                scored = evaluate_segmentation(labels, truth.array, 4, image.spacing)
                rows[kept].append((scored["mean_dice"], scored["mean_hd95"], removed))
        raw = np.array(rows["raw"], dtype=float)
        for kept, values in rows.items():
            v = np.array(values, dtype=float)
            line = f"| {name} | {kept} | {np.mean(v[:, 0]):.4f} | "
            if kept == "raw":
                line += f"| | {np.nanmean(v[:, 1]):.2f} | | |"
            else:
                d, h = v[:, 0] - raw[:, 0], v[:, 1] - raw[:, 1]
                se = d.std(ddof=1) / np.sqrt(len(d))
                hse = np.nanstd(h, ddof=1) / np.sqrt(np.sum(np.isfinite(h)))
                line += (f"{d.mean():+.4f} +- {se:.4f} | {int(np.sum(d > 0))}/{int(np.sum(d < 0))} | "
                         f"{np.nanmean(v[:, 1]):.2f} | {np.nanmean(h):+.2f} +- {hse:.2f} | {np.mean(v[:, 2]):.0f} |")
            print(line, flush=True)


if __name__ == "__main__":
    main()
