"""RAL and OAL (the ablations) against random init and CORAL at M = 1 in the 2-fold splits 0 to 4 (--fold-seed),
every method pretrained for 512 steps and fine-tuned twice per run, paired by pretraining (seed) as
benchmarks/split_differences.py pairs them (random init and CORAL: ../cpu-2026-12-05f, -05g and -06). A split whose
ablation tables do not both hold their 40 runs yet is left out (a partial one skews the reading over the splits).
python ablation_splits.py   (from the repository root or here, with coral_core importable)"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

from split_differences import report  # noqa: E402

R = HERE.parent
F, G, D = (R / f"cpu-2026-12-{name}" for name in ("05f", "05g", "06"))
BASE = {0: [F / "rand_rep2_folds2_table.json", F / "coral_rep2_folds2_table.json"],  # random init and CORAL
        1: [G / "split1_rep2_folds2_table.json"], 2: [G / "split2_rep2_folds2_table.json"],
        3: [D / "split3_rep2_folds2_table.json"], 4: [D / "split4_rep2_folds2_table.json"]}
ABLATIONS = {split: [HERE / f"{m}_split{split}_rep2_folds2_table.json" for m in ("ral", "oal")] for split in BASE}
TABLES = {split: BASE[split] + paths for split, paths in ABLATIONS.items()
          if all(p.exists() and len(json.loads(p.read_text())["runs"]) == 40 for p in paths)}
PAIRS = (("ral", "random"), ("oal", "random"), ("coral", "ral"), ("coral", "oal"))

report(TABLES, PAIRS)
