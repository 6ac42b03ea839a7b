"""SimCLR against random init, and CORAL, PCL and GCL against SimCLR, at M = 1 in the 2-fold splits 0 and 1
(--fold-seed), every method pretrained for 512 steps where it pretrains and fine-tuned twice per run, paired by
pretraining (seed) as benchmarks/split_differences.py pairs them (simclr_splits.sh ran SimCLR here).
python simclr_splits.py   (from the repository root or here, with coral_core importable)"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

R = HERE.parent
F, G, D, B, C = (R / f"cpu-2026-12-{name}" for name in ("05f", "05g", "06", "06b", "06c"))
TABLES = {  # split: the tables holding random init, CORAL, PCL, GCL and SimCLR fine-tuned twice on its draws
    0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json", B / "pcl_split0_rep2_folds2_table.json",
        C / "gcl_split0_rep2_folds2_table.json", HERE / "simclr_split0_rep2_folds2_table.json"],
    1: [G / "split1_rep2_folds2_table.json", D / "pcl_split1_rep2_folds2_table.json",
        C / "gcl_split1_rep2_folds2_table.json", HERE / "simclr_split1_rep2_folds2_table.json"],
}
PAIRS = (("simclr", "random"), ("coral", "simclr"), ("pcl", "simclr"), ("gcl", "simclr"))

report(TABLES, PAIRS)
