"""Does a distance between two scans, read without labels, predict how well a model fine-tuned on one
segments the other?

Reads `../cpu-2026-11-28b/subject_gap.jsonl` (the Dice of 190 (labelled, test) pairs of the quick
low-label setting, for random init and a CORAL encoder) and correlates each pair's Dice with distances
between the two subjects' images:

* `embed`: the CORAL encoder that subject_gap.py fine-tuned from (pretrained again here with the same
  settings and seed), each slice's projection-head feature, unit length; the two trajectories compared at
  matched relative positions (linear interpolation, 32 points from base to apex): the mean cosine distance.
* `embed_random`: the same with a randomly initialised encoder of the same shape (seed 0).
* `pixels`: the normalised slices at 64 x 64, compared at the same matched positions: mean absolute difference.
* `size_truth`: the heart-area difference read from the labels (subject_gap's measure; not available to a user).

    python benchmarks/results/cpu-2026-11-28c/scan_distance.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coral_core.data import resize_slices  # noqa: E402
from coral_core.infer import embed_volume  # noqa: E402
from coral_core.levers import Levers  # noqa: E402
from coral_core.lowlabel import LowLabelConfig, load_labelled_cases  # noqa: E402
from coral_core.model import UNetConfig, build_model  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402

POINTS = np.linspace(0, 1, 32)


def along(features: np.ndarray) -> np.ndarray:
    """(S, D) rows at 32 relative positions from base to apex."""
    pos = np.linspace(0, 1, len(features))
    return np.stack([np.interp(POINTS, pos, features[:, d]) for d in range(features.shape[1])], axis=1)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(1 - (a * b).sum(1)))


def main() -> None:
    q = LowLabelConfig.quick()
    levers = Levers(cpu_bf16=False)
    cases = load_labelled_cases(None, 20)
    model_cfg = UNetConfig(n_classes=4, class_names=["background", "class 1", "class 2", "class 3"],
                           base_filters=q.base_filters, image_size=q.image_size)
    pre = pretrain(PretrainConfig(method="coral", epochs=q.pretrain_epochs, batch_size=q.pretrain_batch,
                                  lr=q.pretrain_lr, seed=0, device="cpu", model=model_cfg, levers=levers),
                   [c.image for c in cases]).model
    torch.manual_seed(0)
    fresh = build_model(model_cfg)
    trajectories = {
        "embed": {c.name: along(embed_volume(pre, c.image, "cpu", levers=levers)) for c in cases},
        "embed_random": {c.name: along(embed_volume(fresh, c.image, "cpu", levers=levers)) for c in cases},
        "pixels": {c.name: along(resize_slices(c.image, q.image_size).reshape(c.image.shape[0], -1).numpy())
                   for c in cases},
    }
    rows = [json.loads(line) for line in (HERE.parent / "cpu-2026-11-28b" / "subject_gap.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "init" in r]
    for r in rows:
        a, b = r["labelled"], r["test"]
        r["embed"] = cosine_distance(trajectories["embed"][a], trajectories["embed"][b])
        r["embed_random"] = cosine_distance(trajectories["embed_random"][a], trajectories["embed_random"][b])
        r["pixels"] = float(np.abs(trajectories["pixels"][a] - trajectories["pixels"][b]).mean())
        r["size_truth"] = r["d_size"]
    for init in ("random", "coral"):
        part = [r for r in rows if r["init"] == init]
        dice = np.array([r["dice"] for r in part])
        cells = []
        for key in ("embed", "embed_random", "pixels", "size_truth"):
            d = np.array([r[key] for r in part])
            cells.append(f"{key} r {np.corrcoef(d, dice)[0, 1]:+.2f}")
        # per labelled subject: would the distance pick the test subjects the model misses?
        hits = []
        for labelled in sorted({r["labelled"] for r in part}):
            mine = [r for r in part if r["labelled"] == labelled]
            worst = {r["test"] for r in sorted(mine, key=lambda r: r["dice"])[:5]}
            farthest = {r["test"] for r in sorted(mine, key=lambda r: -r["embed"])[:5]}
            hits.append(len(worst & farthest))
        print(f"{init}: {len(part)} pairs; " + "; ".join(cells) +
              f"; of the 5 test subjects each model segments worst, the 5 farthest in `embed` hold "
              f"{np.mean(hits):.1f} on average (chance {5 * 5 / 19:.1f})")


if __name__ == "__main__":
    main()
