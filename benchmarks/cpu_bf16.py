"""What bfloat16 autocast on the CPU (``Levers.cpu_bf16``) does to results and time: the demo's
whole chain, once in float32 and once in bf16, paired by seed.

    python benchmarks/cpu_bf16.py                 # seeds 0-3
    python benchmarks/cpu_bf16.py --seeds 0 --no-cross

Per seed, as ``coral demo`` does: CORAL pretraining on 16 + 2 phantom subjects (6 epochs), then
200 fine-tuning steps on every labelled slice of the 2 labelled subjects (the CORAL loss keeping
the embedding, the default), each stage and the scoring in the precision of the row. Scores as
in keep_embedding.py: mean Dice on 4 held-out subjects, ordinal consistency of 8 unseen subjects
(mean, minimum). "cross" scores the float32 model with bf16 inference: its Dice, and the share of
held-out voxels whose label is the float32 inference's. bf16 is fast only on a CPU with AMX
tiles; elsewhere it is emulated, so the seconds say little there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keep_embedding import HELD_OUT, consistency, dice  # noqa: E402

from coral_core.finetune import FinetuneConfig, annotated_from_labels, finetune  # noqa: E402
from coral_core.infer import segment_volume  # noqa: E402
from coral_core.levers import Levers, cpu_has_amx  # noqa: E402
from coral_core.model import UNetConfig  # noqa: E402
from coral_core.phantom import LABEL_NAMES, make_cohort  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402

PRECISIONS = {"float32": Levers(cpu_bf16=False), "bf16": Levers(cpu_bf16=True)}


def label_agreement(model, a: Levers, b: Levers) -> float:
    """Share of held-out voxels labelled alike by inference under levers ``a`` and ``b``."""
    same = total = 0
    for image, _ in HELD_OUT:
        la, lb = (segment_volume(model, image.array, "cpu", levers=lv) for lv in (a, b))
        same, total = same + int((la == lb).sum()), total + la.size
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--no-cross", action="store_true", help="skip scoring the float32 model with bf16 inference")
    args = ap.parse_args()
    print(f"CPU has AMX tiles: {cpu_has_amx()}")
    print("| seed | precision | pretrain s | fine-tune s | Dice | consistency mean | min |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for seed in args.seeds:
        unlabelled = make_cohort(16, seed=seed * 100)
        labelled = make_cohort(2, seed=seed * 100 + 1000)
        models = {}
        for name, levers in PRECISIONS.items():
            cfg = PretrainConfig(method="coral", epochs=6, seed=seed, device="cpu", levers=levers,
                                 model=UNetConfig(base_filters=16, image_size=128, class_names=list(LABEL_NAMES)))
            t = time.perf_counter()
            pre = pretrain(cfg, [image.array for image, _ in unlabelled + labelled]).model
            t_pre = time.perf_counter() - t
            t = time.perf_counter()
            model = finetune(FinetuneConfig(steps=200, seed=seed, device="cpu", levers=levers), pre,
                             [image.array for image, _ in labelled], [lab.array for _, lab in labelled],
                             [annotated_from_labels(lab.array) for _, lab in labelled]).model
            t_ft = time.perf_counter() - t
            models[name] = model
            mean, low = consistency(model, "cpu", levers)
            print(f"| {seed} | {name} | {t_pre:.0f} | {t_ft:.0f} | {dice(model, 'cpu', levers):.3f} | {mean:.3f} "
                  f"| {low:.3f} |", flush=True)
        if not args.no_cross:
            fp32 = models["float32"]
            agree = label_agreement(fp32, PRECISIONS["float32"], PRECISIONS["bf16"])
            mean, low = consistency(fp32, "cpu", PRECISIONS["bf16"])
            print(f"| {seed} | cross: float32 model, bf16 inference (labels agree on {100 * agree:.2f}% of voxels) "
                  f"| - | - | {dice(fp32, 'cpu', PRECISIONS['bf16']):.3f} | {mean:.3f} | {low:.3f} |", flush=True)


if __name__ == "__main__":
    main()
