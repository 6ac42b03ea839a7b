"""PCL against random init and CORAL against PCL at M = 1 in the five 2-fold splits (--fold-seed 0-4), every method
pretrained for 512 steps where it pretrains and fine-tuned twice per run (the mean of the two): in each split the mean
over pretrainings (seeds) of each seed's difference over its folds, with its standard error and the sign test over
the seeds; then over the splits and the pretrainings they share, with both drawn at random (two-way layout).
python pcl_splits.py   (from the repository root or here, with coral_core importable)"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

R = HERE.parent
F, G, D = R / "cpu-2026-12-05f", R / "cpu-2026-12-05g", R / "cpu-2026-12-06"
TABLES = {  # split: the tables holding random init, CORAL and PCL fine-tuned twice on its draws
    0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json", HERE / "pcl_split0_rep2_folds2_table.json"],
    1: [G / "split1_rep2_folds2_table.json", D / "pcl_split1_rep2_folds2_table.json"],
    2: [G / "split2_rep2_folds2_table.json", HERE / "pcl_split2_rep2_folds2_table.json"],
    3: [D / "split3_rep2_folds2_table.json", HERE / "pcl_split3_rep2_folds2_table.json"],
    4: [D / "split4_rep2_folds2_table.json", HERE / "pcl_split4_rep2_folds2_table.json"],
}
PAIRS = (("pcl", "random"), ("coral", "random"), ("coral", "pcl"))

report(TABLES, PAIRS)
