"""Field of view: does a model with a physical scale keep its Dice on scans of another field of view?

    python benchmarks/field_of_view.py                       # 6 labelled phantoms, 6 held-out ones
    python benchmarks/field_of_view.py --labelled 2 --test 2 --steps 20    # a quick look

A model without a pixel spacing (the default) resizes each slice whole to its input, so a scan acquired
with a wider field of view shows it a smaller heart; a model with one (``coral finetune --pixel-spacing``,
``UNetConfig.pixel_spacing``) sees the same square of millimetres of every scan
(:class:`coral_core.data.FieldOfView`). Scanners and protocols set the field of view, not the anatomy, so
a cohort's scans can differ in it (ACDC's come from two scanners).

Each labelled phantom (seeds 1000, 1001, ...) is fine-tuned from random init at the product's settings
(``coral finetune``: 16 filters, 128 x 128, 200 steps, lr 3e-3, three annotated slices) twice: on the scan
as generated (128 pixels of 1.8 mm: 230.4 mm across) and on the same scan with a 1.5 times wider field of
view (192 pixels of 1.8 mm: the slices padded by 32 pixels on every side with background drawn from the
scan's own corners). Every held-out phantom (seeds 2000, 2001, ...) is scored at fields of view of 0.75,
1, 1.5 and 2 times its own (the centre cut to 96 pixels, or padded to 192 or 256, all at 1.8 mm), by mean
foreground Dice, two ways: resized whole, and at a pixel spacing of 1.8 mm (the central 230.4 mm). At that
spacing the model trained on the wider scan trains on its central 230.4 mm, the scan as generated, so its
weights are those of the first model (tests/test_cli.py checks that equality): it is scored as that model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import segment_volume  # noqa: E402
from coral_core.lowlabel import sign_test_p  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNetConfig, build_model  # noqa: E402
from coral_core.phantom import make_phantom  # noqa: E402

NAMES = ["background", "RV", "myocardium", "LV"]
FACTORS = (0.75, 1.0, 1.5, 2.0)
MM = 1.8  # the phantoms' in-plane spacing


def at_field_of_view(image: np.ndarray, labels: np.ndarray, factor: float, rng: np.random.Generator):
    """The scan as acquired with ``factor`` times its field of view at the same spacing: the centre cut
    out, or the slices padded with background drawn from their 8 x 8 corners."""
    n = image.shape[1]
    side = int(round(n * factor))
    if side <= n:
        start = (n - side) // 2
        return image[:, start : start + side, start : start + side], labels[:, start : start + side, start : start + side]
    before = (side - n) // 2
    corners = np.concatenate([image[:, :8, :8], image[:, :8, -8:], image[:, -8:, :8], image[:, -8:, -8:]], axis=1)
    wide = np.empty((image.shape[0], side, side), image.dtype)
    for z in range(image.shape[0]):
        wide[z] = rng.choice(corners[z].ravel(), size=(side, side))
    wide[:, before : before + n, before : before + n] = image
    wide_labels = np.zeros((labels.shape[0], side, side), labels.dtype)
    wide_labels[:, before : before + n, before : before + n] = labels
    return wide, wide_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=6, help="labelled phantoms (seeds 1000, 1001, ...)")
    parser.add_argument("--test", type=int, default=6, help="held-out phantoms (seeds 2000, 2001, ...)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every pair's Dice there")
    args = parser.parse_args()
    t_all = time.perf_counter()
    rng = np.random.default_rng(0)
    tests = []
    for i in range(args.test):
        image, labels = (v.array for v in make_phantom(2000 + i))
        tests.append([at_field_of_view(image, labels, f, rng) for f in FACTORS])
    # dice[(training field of view, preprocessing)][test factor] = one value per (labelled, test) pair
    dice = {key: {f: [] for f in FACTORS} for key in ((1.0, "whole"), (1.5, "whole"), (1.0, "at 1.8 mm"), (1.5, "at 1.8 mm"))}
    for k in range(args.labelled):
        image, labels = (v.array for v in make_phantom(1000 + k))
        slices = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
        models = {}
        for factor in (1.0, 1.5):
            scan, scan_labels = at_field_of_view(image, labels, factor, rng)
            torch.manual_seed(k)
            init = build_model(UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES))
            cfg = FinetuneConfig(steps=args.steps, lr=3e-3, seed=k, device=args.device, validate_every=0)
            models[factor] = finetune(cfg, init, [scan], [scan_labels], [slices]).model
        scaled = dataclasses.replace(models[1.0].config, pixel_spacing=MM)
        for factor, model in models.items():
            for way in ("whole", "at 1.8 mm"):
                net = models[1.0] if way != "whole" else model  # at 1.8 mm both train on the same 230.4 mm
                net.config = scaled if way != "whole" else dataclasses.replace(net.config, pixel_spacing=None)
                for views in tests:
                    for f, (img, lab) in zip(FACTORS, views):
                        pred = segment_volume(net, img, args.device, spacing=(10.0, MM, MM))
                        dice[(factor, way)][f].append(
                            evaluate_segmentation(pred, lab, 4, (10.0, MM, MM))["mean_dice"])
            models[1.0].config = dataclasses.replace(models[1.0].config, pixel_spacing=None)
        print(f"labelled phantom {1000 + k} done ({time.perf_counter() - t_all:.0f} s)", flush=True)

    pairs = args.labelled * args.test
    print(f"\nMean foreground Dice over {args.labelled} labelled x {args.test} held-out phantoms ({pairs} pairs), "
          f"{args.steps} fine-tuning steps; columns: the held-out scan's field of view, times its own 230.4 mm")
    print(f"{'trained on':<14}{'model sees':<12}" + "".join(f"{f'{f:g}x':>16}" for f in FACTORS))
    for (factor, way), row in dice.items():
        print(f"{f'{factor:g}x ({128 * factor * MM:.0f} mm)':<14}{way:<12}"
              + "".join(f"{np.mean(v):>9.3f} ± {np.std(v):.3f}" for v in row.values()))
    print("\nat 1.8 mm minus whole, same training scan (higher in, sign-test p)")
    for factor in (1.0, 1.5):
        cells = []
        for f in FACTORS:
            d = np.array(dice[(factor, "at 1.8 mm")][f]) - np.array(dice[(factor, "whole")][f])
            wins, losses = int((d > 0).sum()), int((d < 0).sum())
            cells.append(f"{d.mean():+.3f} ({wins}/{len(d)}, {sign_test_p(wins, losses):.2g})")
        print(f"{f'{factor:g}x':<26}" + "".join(f"{c:>24}" for c in cells))
    if args.json:
        rows = [{"trained_on": factor, "model_sees": way, "test_field_of_view": f, "dice": values}
                for (factor, way), row in dice.items() for f, values in row.items()]
        Path(args.json).write_text(json.dumps({"labelled": args.labelled, "test": args.test, "steps": args.steps,
                                               "rows": rows}, indent=1))
    print(f"\n{time.perf_counter() - t_all:.0f} s on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
