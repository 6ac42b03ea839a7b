"""Which test subjects does a model fine-tuned on one labelled phantom miss, and does CORAL help on those?

The quick low-label setting (20 phantoms, 8-filter U-Net at 64 x 64, fine-tuning 300 steps at batch 8, lr 1e-2,
class-balanced, augmented), float32 on the CPU. For each of 10 labelled subjects (phantom0-9), fine-tune from
random init and from a CORAL encoder (pretrained once on all 20 subjects' images with the quick settings,
seed 0), then score every other subject on its own. Each subject is also described by measures read from its
labels and image: heart size (mean myocardium + LV area per slice, in pixels of the 128 x 128 phantom), slice
count, blood-to-myocardium contrast (median LV cavity over median myocardium) and noise (standard deviation
of the image outside the body, over the median LV cavity). Prints one line per (labelled, test) pair as JSON
and a summary: how the Dice falls with the difference in each measure, for each init.

    python benchmarks/results/cpu-2026-11-28b/subject_gap.py > subject_gap.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.finetune import FinetuneConfig, finetune  # noqa: E402
from coral_core.infer import segment_volume  # noqa: E402
from coral_core.levers import Levers  # noqa: E402
from coral_core.lowlabel import LowLabelConfig, load_labelled_cases  # noqa: E402
from coral_core.metrics import evaluate_segmentation  # noqa: E402
from coral_core.model import UNetConfig, build_model, resize_head  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402


def measures(case) -> dict:
    img, lab = case.image.astype(np.float64), case.labels
    lv = np.median(img[lab == 3]) if (lab == 3).any() else np.nan
    myo = np.median(img[lab == 2])
    outside = img[:, :6, :].ravel()  # the top rows: air outside the body ellipse
    return {"size": float(((lab == 2) | (lab == 3)).sum() / lab.shape[0]), "slices": int(lab.shape[0]),
            "contrast": float(lv / myo), "noise": float(outside.std() / lv)}


def main() -> None:
    q = LowLabelConfig.quick()
    levers = Levers(cpu_bf16=False)
    device = torch.device("cpu")
    cases = load_labelled_cases(None, 20)
    desc = {c.name: measures(c) for c in cases}
    model_cfg = UNetConfig(n_classes=4, class_names=["background", "class 1", "class 2", "class 3"],
                           base_filters=q.base_filters, image_size=q.image_size)
    pre = pretrain(PretrainConfig(method="coral", epochs=q.pretrain_epochs, batch_size=q.pretrain_batch,
                                  lr=q.pretrain_lr, seed=0, device="cpu", model=model_cfg, levers=levers),
                   [c.image for c in cases]).model
    inits = {"coral": resize_head(pre, 4, model_cfg.class_names)}
    torch.manual_seed(0)
    inits["random"] = build_model(model_cfg)
    rows = []
    for labelled in cases[:10]:
        for name, init in inits.items():
            ft = FinetuneConfig(steps=q.finetune_steps, batch_size=q.finetune_batch, lr=q.finetune_lr, seed=0,
                                device="cpu", validate_every=0, balance_classes=True, embedding_weight=0.0,
                                levers=levers)
            model = finetune(ft, init, [labelled.image], [labelled.labels], [list(range(labelled.image.shape[0]))]).model
            for test in cases:
                if test.name == labelled.name:
                    continue
                pred = segment_volume(model, test.image, device, levers=levers)
                m = evaluate_segmentation(pred, test.labels, 4, test.spacing)
                row = {"init": name, "labelled": labelled.name, "test": test.name, "dice": m["mean_dice"]}
                row |= {f"d_{k}": abs(desc[test.name][k] - desc[labelled.name][k]) for k in desc[test.name]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"subjects": desc}), flush=True)
    for name in inits:
        part = [r for r in rows if r["init"] == name]
        dice = np.array([r["dice"] for r in part])
        line = [f"{name}: mean Dice {dice.mean():.3f} over {len(part)} (labelled, test) pairs"]
        for key in ("size", "slices", "contrast", "noise"):
            d = np.array([r[f"d_{key}"] for r in part])
            line.append(f"corr(Dice, |d {key}|) {np.corrcoef(d, dice)[0, 1]:+.2f}")
        print("; ".join(line), file=sys.stderr)
    pairs = {(r["labelled"], r["test"]): r["dice"] for r in rows if r["init"] == "random"}
    gain = np.array([r["dice"] - pairs[(r["labelled"], r["test"])] for r in rows if r["init"] == "coral"])
    far = np.array([r["d_size"] for r in rows if r["init"] == "coral"])
    cut = np.median(far)
    print(f"coral - random per test subject: {gain.mean():+.3f} +- {gain.std():.3f}; on the half most unlike the "
          f"labelled subject in heart size {gain[far > cut].mean():+.3f}, on the other half {gain[far <= cut].mean():+.3f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
