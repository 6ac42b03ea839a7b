"""Fine-tuning a fine-tuned model for other classes: keep the head rows of the classes it has, or draw a new head?

    python benchmarks/new_classes.py                      # 4 seeds, 200 steps, both tasks
    python benchmarks/new_classes.py --seeds 0 1 --steps 50

When the plugin's Fine-tune panel's **Classes** lists classes other than the model's, the model gets a new
segmentation head (`coral_core.model.for_classes`, seeded): "fresh", what the product does. "keep" is that head with
the rows of the classes the model has (by name, background included) set to their trained weights, the lever tried
on 2026-12-06 and dropped on this benchmark's result (docs/results.md, "Other classes from a fine-tuned model"). The start is the bundled demo model (RV,
myocardium, LV). Two tasks a user could ask of it, on three annotated slices of one phantom subject (the plugin's
defaults: 200 steps of batch 8, the embedding kept in slice order):

* ``LV+myo``: classes LV and myocardium only (two of the three it has: "keep" starts from their rows and the
  background's);
* ``heart``: one new class, the whole heart (RV, myocardium and LV together: "keep" keeps only the background's row).

Scored by mean foreground Dice on three held-out subjects and on the annotated subject's other slices ("own").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.checkpoint import bundled_model_path, load_checkpoint  # noqa: E402
from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import segment_volume  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import for_classes  # noqa: E402
from coral_core.phantom import make_phantom  # noqa: E402

# phantom labels: 1 RV, 2 myocardium, 3 LV
TASKS = {
    "LV+myo": (["background", "LV", "myocardium"], np.array([0, 0, 2, 1], np.uint8)),
    "heart": (["background", "heart"], np.array([0, 1, 1, 1], np.uint8)),
}


def keep_known_rows(new, old) -> None:
    """Set the head rows of ``new``'s classes that ``old`` has (by name, without regard to case) to ``old``'s."""
    had = [name.casefold() for name in old.config.class_names]
    with torch.no_grad():
        for row, name in enumerate(new.config.class_names):
            if name.casefold() in had:
                new.decoder.head.weight[row] = old.decoder.head.weight[had.index(name.casefold())]
                new.decoder.head.bias[row] = old.decoder.head.bias[had.index(name.casefold())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=3000, help="phantom seed of the annotated subject")
    parser.add_argument("--test-from", type=int, default=3100, help="phantom seeds of the 3 held-out subjects")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="fine-tuning seeds (and head draws)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    demo, _ = load_checkpoint(bundled_model_path())
    image, labels = (v.array for v in make_phantom(args.labelled))
    annotated = sorted(set(np.linspace(1, image.shape[0] - 2, 3).round().astype(int).tolist()))
    rest = [k for k in range(image.shape[0]) if k not in annotated]
    test = [(img.array, lab.array) for img, lab in (make_phantom(args.test_from + i) for i in range(3))]
    print(f"bundled demo model; labelled phantom {args.labelled} (slices {annotated}), held out "
          f"{args.test_from}..{args.test_from + 2}, {args.steps} steps, seeds {args.seeds}")
    print(f"{'task':<8}{'head':<7}{'seed':>5}{'held-out Dice':>15}{'own':>8}{'seconds':>9}")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for task in args.tasks:
        names, lut = TASKS[task]
        for seed in args.seeds:
            for head in ("keep", "fresh"):
                init = for_classes(demo, names, seed=seed)
                if head == "keep":
                    keep_known_rows(init, demo)
                cfg = FinetuneConfig(steps=args.steps, seed=seed, device=args.device)
                t = time.perf_counter()
                model = finetune(cfg, init, [image], [lut[labels]], [annotated]).model
                seconds = time.perf_counter() - t
                held = float(np.mean([evaluate_segmentation(segment_volume(model, img, args.device), lut[lab],
                                                            len(names))["mean_dice"] for img, lab in test]))
                own = evaluate_segmentation(segment_volume(model, image, args.device)[rest], lut[labels][rest],
                                            len(names))["mean_dice"]
                results.setdefault((task, head), []).append((held, own))
                print(f"{task:<8}{head:<7}{seed:>5}{held:>15.3f}{own:>8.3f}{seconds:>9.1f}", flush=True)
    print()
    print(f"{'task':<8}{'keep - fresh, held-out':>24}{'own':>20}   (mean +- std over seeds; keep ahead in)")
    for task in args.tasks:
        keep, fresh = (np.array(results[(task, head)]) for head in ("keep", "fresh"))
        diff = keep - fresh
        cells = [f"{diff[:, j].mean():+.3f} +- {diff[:, j].std(ddof=1) if len(diff) > 1 else 0:.3f} "
                 f"({int((diff[:, j] > 0).sum())}/{len(diff)})" for j in (0, 1)]
        print(f"{task:<8}{cells[0]:>24}{cells[1]:>20}")


if __name__ == "__main__":
    main()
