"""Does fine-tuning keep a CORAL model's embedding in slice order? Dice and ordinal consistency
with and without the CORAL loss riding along (``FinetuneConfig.embedding_weight``).

    python benchmarks/keep_embedding.py                              # weights 0 and 0.1, seeds 0-3
    python benchmarks/keep_embedding.py --weights 0.1 --seeds 0 3 --batch 4
    python benchmarks/keep_embedding.py --weights 0.1 --every 1 2     # the loss on every step, or every other
    python benchmarks/keep_embedding.py --weights 0.1 --views 2 1     # two augmented views per slice, or one

Per seed, as ``coral demo`` does: CORAL pretraining on 16 + 2 phantom subjects (6 epochs), then
200 fine-tuning steps on every labelled slice of the 2 labelled subjects, once per weight from
the same pretrained model. Scores: mean Dice on 4 held-out subjects, and the ordinal consistency
(Spearman's rho of the projection on the model's canonical direction against slice position,
what the plugin's embedding panel shows) on 8 unseen subjects, mean and minimum.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_core.data import slice_positions  # noqa: E402
from coral_core.embedding import ordinal_consistency  # noqa: E402
from coral_core.finetune import FinetuneConfig, annotated_from_labels, finetune  # noqa: E402
from coral_core.infer import embed_volume, segment_volume  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNetConfig  # noqa: E402
from coral_core.phantom import LABEL_NAMES, make_cohort, make_phantom  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402

EMBED_SUBJECTS = (0, 1, 2, 3, 4, 5, 777, 4242)
HELD_OUT = [make_phantom(2000 + i) for i in range(4)]


def consistency(model, device, levers=None) -> tuple[float, float]:
    direction = model.canonical_direction.cpu().numpy()
    direction = direction / np.linalg.norm(direction)
    scores = []
    for seed in EMBED_SUBJECTS:
        volume = make_phantom(seed)[0].array
        along = embed_volume(model, volume, device, levers=levers) @ direction
        scores.append(ordinal_consistency(along, slice_positions(len(volume)).numpy()))
    return float(np.mean(scores)), float(np.min(scores))


def dice(model, device, levers=None) -> float:
    return float(np.mean([
        evaluate_segmentation(segment_volume(model, image.array, device, levers=levers), labels.array, 4, image.spacing,
                              list(LABEL_NAMES))["mean_dice"]
        for image, labels in HELD_OUT
    ]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=FinetuneConfig.embedding_batch, help="slices per step for the loss")
    ap.add_argument("--every", type=int, nargs="+", default=[FinetuneConfig.embedding_every],
                    help="the loss on every k-th step only, at k times the weight (one row per k)")
    ap.add_argument("--views", type=int, nargs="+", default=[FinetuneConfig.embedding_views],
                    help="augmented views per slice for the loss (one row per count)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print("| seed | pretrained consistency | weight | every | views | Dice | consistency mean | min | fine-tune s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        unlabelled = make_cohort(16, seed=seed * 100)
        labelled = make_cohort(2, seed=seed * 100 + 1000)
        cfg = PretrainConfig(method="coral", epochs=6, seed=seed, device=args.device,
                             model=UNetConfig(base_filters=16, image_size=128, class_names=list(LABEL_NAMES)))
        pre = pretrain(cfg, [image.array for image, _ in unlabelled + labelled]).model
        before = consistency(pre, args.device)[0]
        runs = [(w, k, v) for w in args.weights for k in (args.every if w > 0 else [1])
                for v in (args.views if w > 0 else [FinetuneConfig.embedding_views])]
        for weight, every, views in runs:
            t = time.perf_counter()
            ft_cfg = FinetuneConfig(steps=200, seed=seed, device=args.device, embedding_weight=weight,
                                    embedding_batch=args.batch, embedding_every=every,
                                    embedding_views=views)
            model = finetune(ft_cfg, pre, [image.array for image, _ in labelled], [lab.array for _, lab in labelled],
                             [annotated_from_labels(lab.array) for _, lab in labelled]).model
            seconds = time.perf_counter() - t
            mean, low = consistency(model, args.device)
            print(f"| {seed} | {before:.2f} | {weight:g} | {every} | {views} | {dice(model, args.device):.3f} | {mean:.2f} "
                  f"| {low:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
