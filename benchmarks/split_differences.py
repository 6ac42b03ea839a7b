"""Paired differences between pretraining methods over 2-fold splits of `coral bench lowlabel` tables, each run
fine-tuned twice (the mean of the two): in each split the mean over pretrainings (seeds) of each seed's difference
over its folds, with its standard error and the sign test over the seeds; then over the splits and the pretrainings
they share, with both drawn at random (two-way layout). Used by the results folders' scripts (pcl_splits.py,
gcl_splits.py), which name the tables of each split and the pairs to compare."""
import json
from pathlib import Path

import numpy as np

from coral_core.lowlabel import sign_test_p


def runs(paths: list[Path]) -> dict:
    """method -> (fold, seed) -> the mean of the run's two fine-tunings' Dice at M = 1."""
    out: dict = {}
    for path in paths:
        if path.exists():
            for r in json.loads(path.read_text())["runs"]:
                if r["labeled"] == 1 and len(r["dice_repeats"]) == 2:
                    out.setdefault(r["method"], {})[(r["fold"], r["seed"])] = float(np.mean(r["dice_repeats"]))
    return out


def by_seed(a: dict, b: dict) -> dict:
    """seed -> a - b, the mean over the seed's two folds (seeds with both folds of both methods only)."""
    seeds = sorted({s for _, s in a} & {s for _, s in b})
    return {s: float(np.mean([a[(f, s)] - b[(f, s)] for f in (0, 1)])) for s in seeds
            if all((f, s) in a and (f, s) in b for f in (0, 1))}


def se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x)))


def report(tables: dict[int, list[Path]], pairs: tuple[tuple[str, str], ...]) -> None:
    """Print each split's runs and differences, then the differences over the splits (two splits or more)."""
    diffs = {pair: {} for pair in pairs}  # pair -> split -> seed -> difference
    for split, paths in tables.items():
        found = runs(paths)
        print(f"split {split}: " + ", ".join(f"{m} {len(v)} runs (mean {np.mean(list(v.values())):.4f})"
                                              for m, v in sorted(found.items())))
        for a, b in pairs:
            if a in found and b in found:
                d = by_seed(found[a], found[b])
                if len(d) >= 2:
                    diffs[(a, b)][split] = d
                    x = np.array(list(d.values()))
                    wins, losses = int(np.sum(x > 0)), int(np.sum(x < 0))
                    print(f"  {a} - {b}: {x.mean():+.4f} +- {se(x):.4f} over {len(x)} pretrainings (ahead in {wins}/{len(x)}, "
                          f"sign test p {sign_test_p(wins, losses):.2g})")

    print()
    for (a, b), per_split in diffs.items():
        splits = sorted(per_split)
        if len(splits) < 2:
            continue
        shared = sorted(set.intersection(*(set(per_split[s]) for s in splits)))
        grid = np.array([[per_split[s][seed] for seed in shared] for s in splits])  # split x seed
        resid = grid - grid.mean(1, keepdims=True) - grid.mean(0, keepdims=True) + grid.mean()
        ms_split = len(shared) * grid.mean(1).var(ddof=1)
        ms_seed = len(splits) * grid.mean(0).var(ddof=1)
        ms_resid = float((resid ** 2).sum() / ((len(splits) - 1) * (len(shared) - 1)))
        grand_se = np.sqrt(max(0.0, ms_split + ms_seed - ms_resid) / grid.size)
        per_seed = grid.mean(0)
        print(f"{a} - {b} over splits {', '.join(map(str, splits))} and the {len(shared)} pretrainings they share: "
              f"{grid.mean():+.4f} +- {grand_se:.4f} (splits and pretrainings both drawn at random); split means "
              f"{', '.join(f'{m:+.4f}' for m in grid.mean(1))}; ahead in {int(np.sum(per_seed > 0))}/{len(per_seed)} "
              "pretrainings averaged over the splits")
