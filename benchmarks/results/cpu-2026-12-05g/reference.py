"""The pretrained methods fine-tuned twice in the 5-fold draws at M = 1 too, as random init was in ../cpu-2026-12-05f
(its rand_rep2_folds5_table.json): each method's own luck there, every method against random init with both at the
mean of their two fine-tunings, counted by run and by pretraining (a seed's mean over its folds), CORAL against
each baseline the same way, and the two protocols' estimates of CORAL's lead weighed by their precision.
python reference.py   (from the repository root or here, with coral_core importable)"""
import json
from pathlib import Path

import numpy as np

from coral_core.lowlabel import sign_test_p

HERE = Path(__file__).resolve().parent
EARLIER = HERE.parent / "cpu-2026-12-05f"
# protocol: (the tables of methods fine-tuned twice, random init's, the table whose runs the first fine-tunings equal)
PROTOCOLS = {
    "2 folds x 20 seeds": ([EARLIER / "coral_rep2_folds2_table.json"], EARLIER / "rand_rep2_folds2_table.json",
                           HERE.parent / "cpu-2026-12-05b/pre64_baselines_table.json"),
    "5 folds x 16 seeds": ([HERE / "coral_rep2_folds5_table.json", HERE / "baselines_rep2_folds5_table.json"],
                           EARLIER / "rand_rep2_folds5_table.json", EARLIER / "folds5_pre64_abl_s16_table.json"),
}


def repeats(path: Path, method: str) -> dict:
    """(fold, seed) -> the run's fine-tunings' Dice at M = 1."""
    return {(r["fold"], r["seed"]): np.array(r["dice_repeats"]) for r in json.loads(path.read_text())["runs"]
            if r["method"] == method and r["labeled"] == 1}


def count(d: np.ndarray) -> str:
    """``wins/n, p ...``: how many are above 0, and the sign test's p."""
    return f"{int(np.sum(d > 0))}/{len(d)}, p {sign_test_p(int(np.sum(d > 0)), int(np.sum(d < 0))):.2g}"


def by_seed(keys: list, d: np.ndarray) -> np.ndarray:
    """Each seed's mean of ``d`` over its folds (a seed's runs share one pretraining)."""
    seeds = sorted({seed for _, seed in keys})
    return np.array([np.mean([x for (_, s), x in zip(keys, d) if s == seed]) for seed in seeds])


def lead(label: str, keys: list, d: np.ndarray) -> str:
    """One paired difference's line: mean +- spread, counted by run and by pretraining."""
    seeds = by_seed(keys, d)
    return (f"  {label}: {d.mean():+.4f} +- {d.std():.3f} (by run {count(d)}; by pretraining {count(seeds)}, "
            f"seeds' means +- {seeds.std():.3f})")


estimates = {}
for name, (files, random_file, original_file) in PROTOCOLS.items():
    twice = {}  # method -> (fold, seed) -> its two fine-tunings
    for path in filter(Path.exists, files):
        for method in dict.fromkeys(r["method"] for r in json.loads(path.read_text())["runs"]):
            twice[method] = repeats(path, method)
    if not twice:
        print(f"\n{name}: no table of methods fine-tuned twice yet")
        continue
    rand = repeats(random_file, "random")
    original = {(r["method"], r["fold"], r["seed"]): r["dice"] for r in json.loads(original_file.read_text())["runs"]
                if r["labeled"] == 1}
    mean_of_both = {}
    for method, runs in twice.items():
        keys = sorted(set(runs) & set(rand))
        first, second = (np.array([runs[k][i] for k in keys]) for i in (0, 1))
        same = int(np.sum(first == np.array([original[(method, *k)] for k in keys])))
        up = second - first
        print(f"\n{name}, M = 1, {method} fine-tuned twice, {len(keys)} runs: the first equals the original run's in "
              f"{same}; mean {first.mean():.4f}, second {second.mean():.4f} (second - first {up.mean():+.4f} +- "
              f"{up.std():.3f}, up in {count(up)})")
        for label, c, r in (("first - first", first, [rand[k][0] for k in keys]),
                            ("second - second", second, [rand[k][1] for k in keys]),
                            ("mean of both - mean of both", (first + second) / 2, [rand[k].mean() for k in keys])):
            print(lead(f"{method} - random, {label}", keys, c - np.array(r)))
        mean_of_both[method] = {k: runs[k].mean() for k in keys}
        if method == "coral":
            # the standard error of the mean difference over pretrainings (seeds), which the runs of a seed share
            seeds = by_seed(keys, (first + second) / 2 - np.array([rand[k].mean() for k in keys]))
            estimates[name] = (seeds.mean(), seeds.std(ddof=1) / np.sqrt(len(seeds)))
    if "coral" in mean_of_both and len(mean_of_both) > 1:
        print(f"\n{name}, CORAL against each baseline, both at the mean of their two fine-tunings:")
        for method, runs in mean_of_both.items():
            if method != "coral":
                keys = sorted(set(runs) & set(mean_of_both["coral"]))
                print(lead(f"coral - {method}", keys,
                           np.array([mean_of_both["coral"][k] - runs[k] for k in keys])))
# Which split: one split into folds is shared by every run of a table, so the seeds do not average it. The 2-fold
# draws again with other splits (--fold-seed 1, 2), random init and CORAL both fine-tuned twice; the pretrainings
# (seed s) are the same encoders in every table, so the splits are compared seed by seed.
SPLITS = {  # name: (CORAL's table, random init's table)
    "2 folds, split 0": (EARLIER / "coral_rep2_folds2_table.json", EARLIER / "rand_rep2_folds2_table.json"),
    "2 folds, split 1": (HERE / "split1_rep2_folds2_table.json", HERE / "split1_rep2_folds2_table.json"),
    "2 folds, split 2": (HERE / "split2_rep2_folds2_table.json", HERE / "split2_rep2_folds2_table.json"),
    "5 folds, split 0": (HERE / "coral_rep2_folds5_table.json", EARLIER / "rand_rep2_folds5_table.json"),
}
leads = {}  # split -> seed -> CORAL's lead over random init, both at the mean of two fine-tunings, over its folds
for name, (coral_file, random_file) in SPLITS.items():
    if coral_file.exists() and random_file.exists():
        coral, rand = repeats(coral_file, "coral"), repeats(random_file, "random")
        keys = sorted(set(coral) & set(rand))
        if len({s for _, s in keys}) < 2:
            continue
        leads[name] = dict(zip(sorted({s for _, s in keys}),
                               by_seed(keys, np.array([coral[k].mean() - rand[k].mean() for k in keys]))))
if len(leads) > 1:
    print("\nCORAL - random by split, both at the mean of two fine-tunings (mean over seeds +- standard error):")
    for name, by in leads.items():
        x = np.array(list(by.values()))
        print(f"  {name}: {x.mean():+.4f} +- {x.std(ddof=1) / np.sqrt(len(x)):.4f} over {len(x)} seeds "
              f"(ahead in {count(x)})")
    names = list(leads)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            seeds = sorted(set(leads[a]) & set(leads[b]))
            x, y = np.array([leads[a][s] for s in seeds]), np.array([leads[b][s] for s in seeds])
            d = x - y
            print(f"  {a} - {b}, over their {len(seeds)} shared pretrainings: {d.mean():+.4f} +- "
                  f"{d.std(ddof=1) / np.sqrt(len(d)):.4f} (the seeds' leads correlate {np.corrcoef(x, y)[0, 1]:+.2f})")
    means = np.array([np.mean(list(by.values())) for by in leads.values()])
    print(f"  the splits' mean: {means.mean():+.4f}; their spread {means.std(ddof=1):.4f} "
          f"(standard error of the mean over {len(means)} splits {means.std(ddof=1) / np.sqrt(len(means)):.4f})")

if len(estimates) == len(PROTOCOLS):
    means, ses = (np.array(v) for v in zip(*estimates.values()))
    weights = 1 / ses**2
    pooled, pooled_se = np.sum(weights * means) / np.sum(weights), 1 / np.sqrt(np.sum(weights))
    gap = means[0] - means[1]
    print("\nCORAL - random, both fine-tuned twice, by protocol (standard error over seeds): "
          + "; ".join(f"{n} {m:+.4f} +- {s:.4f}" for n, (m, s) in estimates.items()))
    print(f"  the two protocols differ by {gap:+.4f} (standard error {np.sqrt(np.sum(ses**2)):.4f}); "
          f"weighed by precision: {pooled:+.4f} +- {pooled_se:.4f}")
