"""CORAL's lead over random init at M = 1 (512 pretraining steps, both fine-tuned twice, the mean of the two) in
every split into folds measured so far, 2-fold splits 0-4 and the 5-fold split 0: each split's mean over its
pretrainings (seeds) with its standard error, the splits compared seed by seed over the pretrainings they share
(the seed s is the same encoder in every table), and the spread between splits, which the seeds do not average.
python splits.py   (from the repository root or here, with coral_core importable)"""
import json
from pathlib import Path

import numpy as np
from scipy.stats import f as f_dist

from coral_core.lowlabel import sign_test_p

HERE = Path(__file__).resolve().parent
F, G = HERE.parent / "cpu-2026-12-05f", HERE.parent / "cpu-2026-12-05g"
SPLITS = {  # name: (CORAL's table, random init's table)
    "2 folds, split 0": (F / "coral_rep2_folds2_table.json", F / "rand_rep2_folds2_table.json"),
    "2 folds, split 1": (G / "split1_rep2_folds2_table.json",) * 2,
    "2 folds, split 2": (G / "split2_rep2_folds2_table.json",) * 2,
    "2 folds, split 3": (HERE / "split3_rep2_folds2_table.json",) * 2,
    "2 folds, split 4": (HERE / "split4_rep2_folds2_table.json",) * 2,
    "5 folds, split 0": (G / "coral_rep2_folds5_table.json", F / "rand_rep2_folds5_table.json"),
}


def runs(path: Path, method: str) -> dict:
    """(fold, seed) -> the mean of the run's two fine-tunings' Dice at M = 1."""
    return {(r["fold"], r["seed"]): float(np.mean(r["dice_repeats"])) for r in json.loads(path.read_text())["runs"]
            if r["method"] == method and r["labeled"] == 1 and len(r["dice_repeats"]) == 2}


def se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x)))


leads = {}  # split -> seed -> CORAL - random, the mean over the seed's folds (only seeds with every fold of both)
for name, (coral_file, random_file) in SPLITS.items():
    if not (coral_file.exists() and random_file.exists()):
        continue
    coral, rand = runs(coral_file, "coral"), runs(random_file, "random")
    folds = 5 if name.startswith("5") else 2
    by_seed = {}
    for seed in sorted({s for _, s in coral}):
        keys = [(f, seed) for f in range(folds)]
        if all(k in coral and k in rand for k in keys):
            by_seed[seed] = float(np.mean([coral[k] - rand[k] for k in keys]))
    if len(by_seed) >= 2:
        leads[name] = by_seed

print("CORAL - random at M = 1, both at the mean of two fine-tunings (mean over pretrainings +- standard error):")
for name, by in leads.items():
    x = np.array(list(by.values()))
    wins, losses = int(np.sum(x > 0)), int(np.sum(x < 0))
    print(f"  {name}: {x.mean():+.4f} +- {se(x):.4f} over {len(x)} seeds (ahead in {wins}/{len(x)}, "
          f"sign test p {sign_test_p(wins, losses):.2g})")
two = [n for n in leads if n.startswith("2")]
shared = sorted(set.intersection(*(set(leads[n]) for n in two)))
if len(two) > 1 and len(shared) >= 2:
    grid = np.array([[leads[n][s] for s in shared] for n in two])  # split x seed
    print(f"\nThe {len(two)} 2-fold splits over the {len(shared)} pretrainings they share:")
    print(f"  split means: {', '.join(f'{m:+.4f}' for m in grid.mean(1))}; their mean {grid.mean():+.4f}, spread "
          f"(sd) {grid.mean(1).std(ddof=1):.4f}, standard error of their mean {se(grid.mean(1)):.4f}")
    # each pretraining's lead averaged over the splits, then over the pretrainings: seeds and splits both vary
    per_seed = grid.mean(0)
    print(f"  each pretraining's lead averaged over the splits: {per_seed.mean():+.4f} +- {se(per_seed):.4f} "
          f"(ahead in {int(np.sum(per_seed > 0))}/{len(per_seed)})")
    # a two-way split of the variance: splits, seeds, and what is left (the interaction, the fine-tunings' luck)
    resid = grid - grid.mean(1, keepdims=True) - grid.mean(0, keepdims=True) + grid.mean()
    ms_split = len(shared) * grid.mean(1).var(ddof=1)
    ms_seed = len(two) * grid.mean(0).var(ddof=1)
    ms_resid = float((resid ** 2).sum() / ((len(two) - 1) * (len(shared) - 1)))
    print(f"  mean squares: between splits {ms_split:.2e}, between seeds {ms_seed:.2e}, residual {ms_resid:.2e}; "
          f"split variance beyond the residual {max(0.0, (ms_split - ms_resid) / len(shared)):.2e} "
          f"(sd {np.sqrt(max(0.0, (ms_split - ms_resid) / len(shared))):.4f}); F test of the splits "
          f"{ms_split / ms_resid:.2f} on ({len(two) - 1}, {(len(two) - 1) * (len(shared) - 1)}) degrees of freedom, "
          f"p {f_dist.sf(ms_split / ms_resid, len(two) - 1, (len(two) - 1) * (len(shared) - 1)):.2g}")
    # the grand mean's standard error with both the splits and the pretrainings as random draws (a two-way
    # layout without repeats: (MS_split + MS_seed - MS_residual) / (splits x seeds))
    grand_se = np.sqrt(max(0.0, ms_split + ms_seed - ms_resid) / grid.size)
    print(f"  the grand mean with splits and pretrainings both drawn at random: {grid.mean():+.4f} +- {grand_se:.4f}")
    print("  the seeds' leads correlate between splits (Pearson, pairs):")
    for i, a in enumerate(two):
        for b in two[i + 1:]:
            print(f"    {a} ~ {b}: {np.corrcoef(grid[two.index(a)], grid[two.index(b)])[0, 1]:+.2f}")
