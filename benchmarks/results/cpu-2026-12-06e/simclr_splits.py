"""SimCLR against random init, and CORAL, PCL and GCL against SimCLR, at M = 1 in all five 2-fold splits
(--fold-seed 0-4), every method pretrained for 512 steps where it pretrains and fine-tuned twice per run, paired by
pretraining (seed) as benchmarks/split_differences.py pairs them (simclr_splits.sh ran SimCLR in splits 2-4 here;
splits 0 and 1 ran in ../cpu-2026-12-06d).
python simclr_splits.py   (from the repository root or here, with coral_core importable)"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

R = HERE.parent
F, G, D, B, C, E = (R / f"cpu-2026-12-{name}" for name in ("05f", "05g", "06", "06b", "06c", "06d"))
TABLES = {  # split: the tables holding random init, CORAL, PCL, GCL and SimCLR fine-tuned twice on its draws
    0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json", B / "pcl_split0_rep2_folds2_table.json",
        C / "gcl_split0_rep2_folds2_table.json", E / "simclr_split0_rep2_folds2_table.json"],
    1: [G / "split1_rep2_folds2_table.json", D / "pcl_split1_rep2_folds2_table.json",
        C / "gcl_split1_rep2_folds2_table.json", E / "simclr_split1_rep2_folds2_table.json"],
    **{split: [(G if split == 2 else D) / f"split{split}_rep2_folds2_table.json",
               B / f"pcl_split{split}_rep2_folds2_table.json", E / f"gcl_split{split}_rep2_folds2_table.json",
               HERE / f"simclr_split{split}_rep2_folds2_table.json"]
       for split in (2, 3, 4)},
}
PAIRS = (("simclr", "random"), ("coral", "simclr"), ("pcl", "simclr"), ("gcl", "simclr"))

report(TABLES, PAIRS)
