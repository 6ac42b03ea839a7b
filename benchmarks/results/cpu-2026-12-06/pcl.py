"""PCL against CORAL and random init at M = 1 in the second 2-fold split (--fold-seed 1), every method pretrained for
512 steps where it pretrains and fine-tuned twice per run (the mean of the two): the mean over pretrainings
(seeds) of each seed's difference over its folds, with its standard error and the sign test over the seeds.
python pcl.py   (from the repository root or here, with coral_core importable)"""
import json
from pathlib import Path

import numpy as np

from coral_core.lowlabel import sign_test_p

HERE = Path(__file__).resolve().parent
TABLES = [HERE.parent / "cpu-2026-12-05g" / "split1_rep2_folds2_table.json", HERE / "pcl_split1_rep2_folds2_table.json"]
runs = {}  # method -> (fold, seed) -> mean of the two fine-tunings' Dice
for path in TABLES:
    for r in json.loads(path.read_text())["runs"]:
        if r["labeled"] == 1 and len(r["dice_repeats"]) == 2:
            runs.setdefault(r["method"], {})[(r["fold"], r["seed"])] = float(np.mean(r["dice_repeats"]))
for a, b in (("pcl", "random"), ("coral", "random"), ("coral", "pcl")):
    seeds = sorted({s for _, s in runs[a]} & {s for _, s in runs[b]})
    seeds = [s for s in seeds if all((f, s) in runs[a] and (f, s) in runs[b] for f in (0, 1))]
    d = np.array([np.mean([runs[a][(f, s)] - runs[b][(f, s)] for f in (0, 1)]) for s in seeds])
    wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
    print(f"{a} - {b}: {d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(len(d)):.4f} over {len(d)} pretrainings "
          f"(ahead in {wins}/{len(d)}, sign test p {sign_test_p(wins, losses):.2g})")
print("means: " + ", ".join(f"{m} {np.mean(list(v.values())):.4f}" for m, v in runs.items()))
