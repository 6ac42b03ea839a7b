"""Field of view: does a model with a physical scale keep its Dice on scans of another field of view?

    python benchmarks/field_of_view.py                       # 6 labelled phantoms, 6 held-out ones
    python benchmarks/field_of_view.py --labelled 2 --test 2 --steps 20    # a quick look

A model without a pixel spacing (the default) resizes each slice whole to its input, so a scan acquired
with a wider field of view shows it a smaller heart; a model with one (``coral finetune --pixel-spacing``,
``UNetConfig.pixel_spacing``) sees a square of the same millimetres of a slice at a time
(:class:`coral_core.data.FieldOfView`): fine-tuning places it where the labels are, segmentation covers a
wider slice in overlapping squares. Scanners and protocols set the field of view, not the anatomy, so a
cohort's scans differ in it (ACDC's come from two scanners), and the heart is not always at the centre.

Each labelled phantom (seeds 1000, 1001, ...) is fine-tuned from random init at the product's settings
(``coral finetune``: 16 filters, 128 x 128, 200 steps, lr 3e-3, three annotated slices) on three scans:
as generated (128 pixels of 1.8 mm: 230.4 mm across), with a 1.5 times wider field of view (192 pixels of
1.8 mm: the slices padded by 32 pixels on every side with background drawn from the scan's own corners),
and with that field of view off the centre (the phantom at a random place in the 192 pixels). Every
held-out phantom (seeds 2000, 2001, ...) is scored at fields of view of 0.75, 1, 1.5 and 2 times its own
(the centre cut to 96 pixels, or padded to 192 or 256, all at 1.8 mm), and at 2 times with the phantom
at a random place, by mean foreground Dice, three ways: resized whole; at 1.8 mm, the central 230.4 mm only
(background beyond it: how napari-coral segmented before 2026-12-04's second session); at 1.8 mm in
overlapping squares (the product now). At 1.8 mm the models fine-tune as ``coral finetune --pixel-spacing``
does, with shifts of up to 0.25 of the input (``--shift``; the others 0.08, as `coral finetune` shifted a model
without a scale when this was measured), on the square
of the scan that holds the most labels; the model trained on the centred wider scan then trains on its
central 230.4 mm, the scan as generated, so its weights are those of the model trained on that (tests/
test_cli.py checks that equality): it is scored as that model. With ``--shift 0.08`` that model is also
the one trained without a scale.
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

from coral_core.augment import FINETUNE_TRANSLATE, AugmentConfig  # noqa: E402
from coral_core.data import field_of_view  # noqa: E402
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
    return placed(image, labels, side, before, before, rng)


def placed(image: np.ndarray, labels: np.ndarray, side: int, top: int, left: int, rng: np.random.Generator):
    """The scan and its labels put at (``top``, ``left``) in slices of ``side`` x ``side`` pixels whose
    background is drawn from the scan's 8 x 8 corners."""
    n = image.shape[1]
    corners = np.concatenate([image[:, :8, :8], image[:, :8, -8:], image[:, -8:, :8], image[:, -8:, -8:]], axis=1)
    wide = np.empty((image.shape[0], side, side), image.dtype)
    for z in range(image.shape[0]):
        wide[z] = rng.choice(corners[z].ravel(), size=(side, side))
    wide[:, top : top + n, left : left + n] = image
    wide_labels = np.zeros((labels.shape[0], side, side), labels.dtype)
    wide_labels[:, top : top + n, left : left + n] = labels
    return wide, wide_labels


def off_centre(image: np.ndarray, labels: np.ndarray, factor: float, rng: np.random.Generator):
    """The scan as acquired with ``factor`` (above 1) times its field of view, the phantom at a random place
    in it (uniform over every place where it fits whole), background drawn from its 8 x 8 corners."""
    n = image.shape[1]
    side = int(round(n * factor))
    top, left = (int(v) for v in rng.integers(0, side - n + 1, size=2))
    return placed(image, labels, side, top, left, rng)


WAYS = ("whole", "central square", "squares")  # how a model sees a test scan (the module's text)


def segment_one_way(model, image: np.ndarray, way: str, device: str) -> np.ndarray:
    """``image`` (at 1.8 mm) segmented by ``model`` (whose config has pixel_spacing 1.8 mm) one of WAYS."""
    spacing = (10.0, MM, MM)
    plain = dataclasses.replace(model.config, pixel_spacing=None)
    if way == "squares":
        return segment_volume(model, image, device, spacing=spacing)
    scaled, model.config = model.config, plain
    try:
        if way == "whole":
            return segment_volume(model, image, device)
        fov = field_of_view(scaled, image.shape, spacing)
        return fov.paste(segment_volume(model, fov.crop(image), device))
    finally:
        model.config = scaled


# The fine-tuning shift of the whole-slice models, as when this was measured (2026-12-04; the product's fine-tuning
# shifts every model by up to FINETUNE_TRANSLATE since the next session).
UNSCALED_SHIFT = 0.08


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=6, help="labelled phantoms (seeds 1000, 1001, ...)")
    parser.add_argument("--test", type=int, default=6, help="held-out phantoms (seeds 2000, 2001, ...)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shift", type=float, default=FINETUNE_TRANSLATE,
                        help="fine-tuning shift range of the models at 1.8 mm (coral finetune --pixel-spacing's; "
                             "the models without a scale 0.08, UNSCALED_SHIFT, as when this was measured)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every pair's Dice there")
    args = parser.parse_args()
    t_all = time.perf_counter()
    rng = np.random.default_rng(0)
    tests = []
    for i in range(args.test):
        image, labels = (v.array for v in make_phantom(2000 + i))
        tests.append([at_field_of_view(image, labels, f, rng) for f in FACTORS] + [off_centre(image, labels, 2.0, rng)])
    columns = [*(f"{f:g}x" for f in FACTORS), "2x off centre"]
    trained_on = ("1x", "1.5x", "1.5x off centre")
    # At 1.8 mm the centred 1.5x scan trains as the 1x one (the same 230.4 mm): no rows of its own.
    keys = [(t, way) for t in trained_on for way in WAYS if way == "whole" or t != "1.5x"]
    # dice[(training scan, way)][test column] = one value per (labelled, test) pair
    dice = {key: {c: [] for c in columns} for key in keys}
    for k in range(args.labelled):
        image, labels = (v.array for v in make_phantom(1000 + k))
        slices = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
        scans = {"1x": (image, labels), "1.5x": at_field_of_view(image, labels, 1.5, rng),
                 "1.5x off centre": off_centre(image, labels, 1.5, rng)}
        models = {}  # (training scan, at 1.8 mm) -> a model whose config has pixel_spacing 1.8
        config = UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES, pixel_spacing=MM)
        for name, scaled in ((t, s) for t in trained_on for s in (False, True)):
            scan, scan_labels = scans[name]
            if scaled and name == "1.5x":
                continue
            if scaled:  # as coral finetune --pixel-spacing does: the square placed on the labels
                fov = field_of_view(config, scan.shape, (10.0, MM, MM)).around(scan_labels)
                scan, scan_labels = fov.crop(scan), fov.crop(scan_labels, 0)
                if name == "1x" and args.shift == UNSCALED_SHIFT:  # trains as the model without a scale
                    models[(name, scaled)] = models[(name, False)]
                    continue
            torch.manual_seed(k)  # fine-tuning reads no pixel spacing: the config's is for segmentation
            cfg = FinetuneConfig(steps=args.steps, lr=3e-3, seed=k, device=args.device, validate_every=0,
                                 augment=AugmentConfig(translate=args.shift if scaled else UNSCALED_SHIFT))
            models[(name, scaled)] = finetune(cfg, build_model(config), [scan], [scan_labels], [slices]).model
        for name, way in keys:
            model = models[(name, way != "whole")]
            for views in tests:
                for column, (img, lab) in zip(columns, views):
                    pred = segment_one_way(model, img, way, args.device)
                    dice[(name, way)][column].append(evaluate_segmentation(pred, lab, 4, (10.0, MM, MM))["mean_dice"])
        print(f"labelled phantom {1000 + k} done ({time.perf_counter() - t_all:.0f} s)", flush=True)

    pairs = args.labelled * args.test
    print(f"\nMean foreground Dice over {args.labelled} labelled x {args.test} held-out phantoms ({pairs} pairs), "
          f"{args.steps} fine-tuning steps, shift {args.shift:g} at 1.8 mm; columns: the held-out scan's field of "
          "view, times its own 230.4 mm")
    print(f"{'trained on':<18}{'model sees':<16}" + "".join(f"{c:>17}" for c in columns))
    for (name, way), row in dice.items():
        print(f"{name:<18}{way:<16}" + "".join(f"{np.mean(v):>10.3f} ± {np.std(v):.3f}" for v in row.values()))
    print("\nsquares minus the other ways, same model (higher in, sign-test p)")
    for name in ("1x", "1.5x off centre"):
        for other in ("whole", "central square"):
            cells = []
            for c in columns:
                d = np.array(dice[(name, "squares")][c]) - np.array(dice[(name, other)][c])
                wins, losses = int((d > 0).sum()), int((d < 0).sum())
                cells.append(f"{d.mean():+.3f} ({wins}/{len(d)}, {sign_test_p(wins, losses):.2g})")
            print(f"{name + ' vs ' + other:<34}" + "".join(f"{c:>24}" for c in cells))
    if args.json:
        rows = [{"trained_on": name, "model_sees": way, "test_field_of_view": c, "dice": values}
                for (name, way), row in dice.items() for c, values in row.items()]
        Path(args.json).write_text(json.dumps({"labelled": args.labelled, "test": args.test, "steps": args.steps,
                                               "shift": args.shift, "rows": rows}, indent=1))
    print(f"\n{time.perf_counter() - t_all:.0f} s on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
