"""CORAL's lead over random init in the 5-fold draws at M = 1, split over the pairs of labelled and test subjects
(each run's dice_by_case, cases_folds5_table.json). A 2-fold table pairs a labelled subject only with the test
subjects of the other half of its split; the 5-fold draws pair it with those of the other fifths. So the 5-fold
pairs that cross a 2-fold split's halves are the pairs that split's table is made of, and the lead over them is
what that table would show were the pairing all that differed (the models for a seed and a labelled subject are
the same in every table: the pretraining and the fine-tuning depend on the seed and the labelled volume only).
python cases.py   (from the repository root or here, with coral_core importable)"""
import json
from pathlib import Path

import numpy as np

from coral_core.lowlabel import make_folds, sign_test_p

HERE = Path(__file__).resolve().parent
table = json.loads((HERE / "cases_folds5_table.json").read_text())
original = {(r["method"], r["fold"], r["seed"]): r["dice"] for r in json.loads(
    (HERE.parent / "cpu-2026-12-05f/folds5_pre64_abl_s16_table.json").read_text())["runs"] if r["labeled"] == 1}
runs = {(r["method"], r["fold"], r["seed"]): r for r in table["runs"] if r["labeled"] == 1}
same = sum(r["dice"] == original[k] for k, r in runs.items())
print(f"{len(runs)} runs; equal to the original table's run, bit for bit, in {same}")

# one row per (seed, labelled subject, test subject): CORAL's Dice minus random init's on that test volume
pairs = []
for (method, fold, seed), r in runs.items():
    if method != "coral" or ("random", fold, seed) not in runs:
        continue
    ref = dict(runs[("random", fold, seed)]["dice_by_case"])
    (labelled,) = r["train"]
    pairs += [(seed, labelled, test, d - ref[test]) for test, d in r["dice_by_case"]]
subjects = sorted({p[2] for p in pairs} | {p[1] for p in pairs})
seeds = sorted({p[0] for p in pairs})
lead = np.array([p[3] for p in pairs])
print(f"{len(pairs)} (seed, labelled, test) pairs over {len(seeds)} seeds: CORAL - random {lead.mean():+.4f}")


def by_seed_mean(mask: np.ndarray) -> str:
    """The lead over the pairs in ``mask``: each seed's mean, then their mean +- standard error."""
    means = np.array([lead[mask & (np.array([p[0] for p in pairs]) == s)].mean() for s in seeds])
    ahead = int(np.sum(means > 0))
    return (f"{lead[mask].mean():+.4f} over {int(mask.sum())} pairs; by seed {means.mean():+.4f} +- "
            f"{means.std(ddof=1) / np.sqrt(len(means)):.4f} (ahead in {ahead}/{len(means)}, p "
            f"{sign_test_p(ahead, int(np.sum(means < 0))):.2g})")


for fold_seed in (0, 1):
    halves = make_folds(subjects, 2, fold_seed)
    half = {s: i for i, h in enumerate(halves) for s in h}
    cross = np.array([half[p[1]] != half[p[2]] for p in pairs])
    print(f"\n2-fold split {fold_seed} (halves {', '.join('+'.join(sorted(h, key=lambda s: int(s[7:]))) for h in halves)}):")
    print(f"  pairs across its halves (what its table pairs): {by_seed_mean(cross)}")
    print(f"  pairs within a half (never in its table):       {by_seed_mean(~cross)}")

print("\nby test subject (mean over the seeds and labelled subjects that tested it), and by labelled subject:")
for role, index in (("test", 2), ("labelled", 1)):
    per = {s: np.mean([p[3] for p in pairs if p[index] == s]) for s in subjects if any(p[index] == s for p in pairs)}
    print(f"  {role}: " + ", ".join(f"{s[7:]} {v:+.3f}" for s, v in sorted(per.items(), key=lambda kv: int(kv[0][7:]))))
    print(f"    spread over subjects {np.std(list(per.values())):.3f}")
