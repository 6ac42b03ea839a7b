"""GCL against random init, and CORAL and PCL against GCL, at M = 1 in the 2-fold splits GCL has run in (--fold-seed),
every method pretrained for 512 steps where it pretrains and fine-tuned twice per run, paired by pretraining (seed)
as benchmarks/split_differences.py pairs them.
python gcl_splits.py   (from the repository root or here, with coral_core importable)"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

R = HERE.parent
F, G, D, B = R / "cpu-2026-12-05f", R / "cpu-2026-12-05g", R / "cpu-2026-12-06", R / "cpu-2026-12-06b"
TABLES = {  # split: the tables holding random init, CORAL, PCL and GCL fine-tuned twice on its draws
    0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json", B / "pcl_split0_rep2_folds2_table.json",
        HERE / "gcl_split0_rep2_folds2_table.json"],
    1: [G / "split1_rep2_folds2_table.json", D / "pcl_split1_rep2_folds2_table.json",
        HERE / "gcl_split1_rep2_folds2_table.json"],
}
PAIRS = (("gcl", "random"), ("coral", "gcl"), ("pcl", "gcl"))

report(TABLES, PAIRS)
