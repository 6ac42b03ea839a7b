"""Fine-tuning learning rate at the product's settings: which default serves users best?

    python benchmarks/finetune_lr.py                                  # labelled phantom 1000, seed 0
    python benchmarks/finetune_lr.py --labelled 1001 --test-from 2010 --seed 1 --lrs 1e-3 3e-3
    python benchmarks/finetune_lr.py --lrs 3e-3 --balance 0 1     # plain and class-balanced cross-entropy
    python benchmarks/finetune_lr.py --lrs 3e-3 --zooms 0.85,1.15 0.7,1.4   # the augmentation's zoom range
    python benchmarks/finetune_lr.py --lrs 3e-3 --layouts 1x3 1x6 2x3  # where to spend the annotated slices
    python benchmarks/finetune_lr.py --lrs 3e-3 --cohort-weights 0 0.1 # semi-supervised: the 16 unlabelled phantoms
    python benchmarks/finetune_lr.py --lrs 3e-3 --encoder-lr-scales 1 0.1  # the encoder at a tenth of the rate
    python benchmarks/finetune_lr.py --lrs 3e-3 --shifts 0.08 0.25     # the augmentation's largest shift
    python benchmarks/finetune_lr.py --lrs 3e-3 --shifts 0.25 --frozen-steps 0 67 --encoder-lr-scales 1 0.1 --pairs  # LP-FT

What `coral finetune` and the plugin's Fine-tune button do by default: a U-Net with 16 base
filters at 128 x 128, three annotated slices of one phantom subject, 200 steps of batch 8.
The model starts from random init and from a CORAL encoder pretrained on 16 other phantoms
(6 epochs, as `coral demo`), and is scored by mean foreground Dice on three held-out subjects
and (last column, "own") on the annotated subject's other slices, what a user segments next.

``--layouts SxK``: K annotated slices in each of S subjects (the first is ``--labelled``, the others
``--labelled`` + 100, + 200, ...), so 1x6 and 2x3 annotate the same number of slices, in one scan or
in two. "own" is then scored on the first subject's slices that no layout annotates.

``--cohort-weights W``: fine-tune with the CORAL loss at weight W on the slices of the annotated subjects and
of the 16 unlabelled phantoms the encoder pretrained on (``finetune(unlabelled=...)``, for both inits; 0: off,
the default and the protocol of every other row).

``--encoder-lr-scales F``: the encoder fine-tuned at F times the learning rate, the decoder and head at the
full rate (``FinetuneConfig.encoder_lr_scale``; 1, the default, trains them alike).

``--shifts F``: the fine-tuning's augmentation shifts slices by up to F of the input (``AugmentConfig.translate``).
The script's default stays 0.08, what `coral finetune` used until 2026-12-04, so that the commands of earlier logs
give the same rows; the product now shifts by up to 0.25 (``coral_core.augment.FINETUNE_TRANSLATE``), so pass
``--shifts 0.25`` for what users get.

``--frozen-steps N``: the encoder kept frozen for the first N steps, then trained with the rest
(``FinetuneConfig.encoder_frozen_steps``: linear probing, then fine-tuning). With ``--encoder-lr-scales`` the
encoder trains at that fraction once unfrozen. ``--pairs`` takes these two lists side by side instead of crossed:
``--frozen-steps 0 67 --encoder-lr-scales 1 0.1 --pairs`` gives the plain recipe and LP-FT with a slow encoder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.augment import AugmentConfig  # noqa: E402
from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import segment_volume  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNetConfig, build_model, resize_head  # noqa: E402
from coral_core.phantom import make_cohort, make_phantom  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402

NAMES = ["background", "RV", "myocardium", "LV"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=1000, help="phantom seed of the annotated subject")
    parser.add_argument("--test-from", type=int, default=2000, help="phantom seeds of the 3 held-out subjects")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--balance", type=int, nargs="+", default=[0], choices=[0, 1],
                        help="FinetuneConfig.balance_classes off (0) and/or on (1), one row each")
    parser.add_argument("--zooms", nargs="+", default=["0.85,1.15"], metavar="LOW,HIGH",
                        help="AugmentConfig.scale of the fine-tuning, one row each (default: the engine's 0.85,1.15)")
    parser.add_argument("--layouts", nargs="+", default=["1x3"], metavar="SxK",
                        help="K annotated slices in each of S subjects, one row each (default: 1x3, the product's)")
    parser.add_argument("--cohort-weights", type=float, nargs="+", default=[0.0], metavar="W",
                        help="weight of the CORAL loss on the unlabelled phantoms while fine-tuning, one row each")
    parser.add_argument("--encoder-lr-scales", type=float, nargs="+", default=[1.0], metavar="F",
                        help="the encoder's learning rate as a fraction of the rest's, one row each")
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.08], metavar="F",
                        help="AugmentConfig.translate of the fine-tuning, one row each (default 0.08, the engine's "
                             "until 2026-12-04; the product's is now 0.25)")
    parser.add_argument("--frozen-steps", type=int, nargs="+", default=[0], metavar="N",
                        help="FinetuneConfig.encoder_frozen_steps, one row each (default 0)")
    parser.add_argument("--pairs", action="store_true",
                        help="pair --frozen-steps with --encoder-lr-scales element by element instead of crossing them")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.pairs and len(args.frozen_steps) != len(args.encoder_lr_scales):
        parser.error("--pairs needs as many --frozen-steps as --encoder-lr-scales")

    model_cfg = UNetConfig(base_filters=16, image_size=128)
    unlabelled = [img.array for img, _ in make_cohort(16)]
    pre = pretrain(PretrainConfig(method="coral", epochs=6, batch_size=32, seed=0, device=args.device, model=model_cfg),
                   unlabelled).model
    layouts = [tuple(int(x) for x in layout.lower().split("x")) for layout in args.layouts]
    subjects = [[v.array for v in make_phantom(args.labelled + 100 * i)] for i in range(max(s for s, _ in layouts))]
    image, labels = subjects[0]

    def spread(volume: np.ndarray, k: int) -> list[int]:  # k slices evenly from the second to the last but one
        return sorted(set(np.linspace(1, volume.shape[0] - 2, k).round().astype(int).tolist()))

    test = [make_phantom(args.test_from + i) for i in range(3)]
    print(f"labelled phantom {args.labelled} (slices {spread(image, 3)}), held out {args.test_from}..{args.test_from + 2}, "
          f"seed {args.seed}, {args.steps} steps")
    zooms = [tuple(float(x) for x in z.split(",")) for z in args.zooms]
    used = set().union(*(spread(image, k) for _, k in layouts))
    rest = [k for k in range(image.shape[0]) if k not in used]  # the labelled subject's unannotated slices
    scales = args.encoder_lr_scales != [1.0]  # the encoder's column only when asked for, as the older logs were written
    encoder_column = f"{'encoder':>8}" if scales else ""
    shifts = args.shifts != [0.08]  # likewise the shift's column
    encoder_column += f"{'shift':>7}" if shifts else ""
    frozen = args.frozen_steps != [0]  # and the frozen steps'
    encoder_column += f"{'frozen':>7}" if frozen else ""
    recipes = (list(zip(args.frozen_steps, args.encoder_lr_scales)) if args.pairs else
               [(n, f) for n in args.frozen_steps for f in args.encoder_lr_scales])
    print(f"{'init':<8}{'lr':>8}{'balance':>8}{'zoom':>11}{'layout':>7}{'cohort':>7}{encoder_column}"
          f"{'mean Dice':>11}  per subject          seconds  own")
    for init_name in ("random", "coral"):
        for lr, balance, zoom, (n_subjects, k), weight, (n_frozen, scale), shift in [
                (lr, b, z, lay, w, rec, sh) for lr in args.lrs for b in args.balance for z in zooms for lay in layouts
                for w in args.cohort_weights for rec in recipes for sh in args.shifts]:
            torch.manual_seed(0)
            if init_name == "random":
                init = build_model(UNetConfig(base_filters=16, image_size=128, n_classes=4, class_names=NAMES))
            else:
                init = resize_head(pre, 4, NAMES)
            t = time.perf_counter()
            # embedding_weight 0 unless --cohort-weights: the protocol the lr study was measured with (and the
            # same for both inits)
            cfg = FinetuneConfig(steps=args.steps, lr=lr, seed=args.seed, device=args.device, validate_every=0,
                                 embedding_weight=weight, balance_classes=bool(balance),
                                 augment=AugmentConfig(scale=zoom, translate=shift),
                                 encoder_lr_scale=scale, encoder_frozen_steps=n_frozen)
            chosen = subjects[:n_subjects]
            model = finetune(cfg, init, [im for im, _ in chosen], [lab for _, lab in chosen],
                             [spread(im, k) for im, _ in chosen], unlabelled=unlabelled if weight else None).model
            dice = [evaluate_segmentation(segment_volume(model, img.array, args.device), lab.array, 4,
                                          img.spacing)["mean_dice"] for img, lab in test]
            per = ", ".join(f"{d:.3f}" for d in dice)
            seconds = time.perf_counter() - t
            own = evaluate_segmentation(segment_volume(model, image, args.device)[rest], labels[rest], 4)["mean_dice"]
            print(f"{init_name:<8}{lr:>8g}{balance:>8}{f'{zoom[0]:g}-{zoom[1]:g}':>11}{f'{n_subjects}x{k}':>7}{weight:>7g}"
                  f"{f'{scale:>8g}' if scales else ''}{f'{shift:>7g}' if shifts else ''}{f'{n_frozen:>7d}' if frozen else ''}"
                  f"{np.mean(dice):>11.3f}  {per:<20} {seconds:>5.0f}  {own:.3f}", flush=True)


if __name__ == "__main__":
    main()
