"""RAL and OAL (the ablations) against random init and CORAL at M = 1 in the 2-fold split 0 (--fold-seed 0), every
method pretrained for 512 steps and fine-tuned twice per run, paired by pretraining (seed) as
benchmarks/split_differences.py pairs them (random init and CORAL: ../cpu-2026-12-05f).
python ablation_splits.py   (from the repository root or here, with coral_core importable)"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

F = HERE.parent / "cpu-2026-12-05f"
TABLES = {0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json",
              HERE / "ral_split0_rep2_folds2_table.json", HERE / "oal_split0_rep2_folds2_table.json"]}
PAIRS = (("ral", "random"), ("oal", "random"), ("coral", "ral"), ("coral", "oal"))

report(TABLES, PAIRS)
