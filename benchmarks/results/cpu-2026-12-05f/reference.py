"""How much of a paired lead over random init is random init's own fine-tuning luck? Random init fine-tuned a
second time in every run (`--finetune-repeats 2`: repeat 0 takes the run's seed, as the original run did, repeat 1
another), in the 2-fold and the 5-fold draws at M = 1; each pretrained method's lead over random init then taken
against the original fine-tuning, the second, and their mean.
python reference.py"""
import json
from pathlib import Path

import numpy as np

from coral_core.lowlabel import sign_test_p

HERE = Path(__file__).resolve().parent
PROTOCOLS = {  # the repeats' table, the table of the pretrained methods at 512 steps (same runs, same CPU model)
    "2 folds x 20 seeds": ("rand_rep2_folds2_table.json", HERE.parent / "cpu-2026-12-05b/pre64_baselines_table.json"),
    "5 folds x 16 seeds": ("rand_rep2_folds5_table.json", HERE / "folds5_pre64_abl_s16_table.json"),
}


def wins_p(d: np.ndarray) -> str:
    """``wins/runs, p ...``: runs above 0 and the sign test's p over them."""
    return f"{int(np.sum(d > 0))}/{len(d)}, p {sign_test_p(int(np.sum(d > 0)), int(np.sum(d < 0))):.2g}"


def two_fine_tunings(first: np.ndarray, second: np.ndarray) -> str:
    """The two fine-tunings' means and how the second differs from the first, run for run."""
    return (f"mean {first.mean():.4f}, second {second.mean():.4f} (second - first {np.mean(second - first):+.4f} +- "
            f"{np.std(second - first):.3f}, up in {int(np.sum(second > first))}, sign test p "
            f"{sign_test_p(int(np.sum(second > first)), int(np.sum(second < first))):.2g})")


for name, (repeats_file, methods_file) in PROTOCOLS.items():
    if not (HERE / repeats_file).exists():
        print(f"\n{name}: no {repeats_file} yet")
        continue
    rep = {(r["fold"], r["seed"]): r for r in json.loads((HERE / repeats_file).read_text())["runs"] if r["labeled"] == 1}
    runs = json.loads(Path(methods_file).read_text())["runs"]
    dice = {(r["method"], r["fold"], r["seed"]): r["dice"] for r in runs if r["labeled"] == 1}
    keys = sorted(rep)
    first = np.array([rep[k]["dice_repeats"][0] for k in keys])
    second = np.array([rep[k]["dice_repeats"][1] for k in keys])
    same = int(np.sum(first == np.array([dice[("random", *k)] for k in keys])))
    print(f"\n{name}, M = 1, {len(keys)} runs: random init's first fine-tuning equals the original run's in {same}; "
          + two_fine_tunings(first, second).replace("second ", "second fine-tuning ", 1))
    for method in dict.fromkeys(m for m, _, _ in dice):
        if method == "random":
            continue
        own = np.array([dice[(method, *k)] for k in keys])
        print(f"  {method:<7} " + "; ".join(
            f"{label} {(own - ref).mean():+.3f} ({wins_p(own - ref)})"
            for label, ref in (("vs first", first), ("vs second", second), ("vs mean of both", (first + second) / 2))))

# CORAL fine-tuned twice as well (2-fold draws): its own luck, and both methods against the mean of their two
coral_file = HERE / "coral_rep2_folds2_table.json"
if coral_file.exists():
    original = {(r["fold"], r["seed"]): r["dice"] for r in json.loads(PROTOCOLS["2 folds x 20 seeds"][1].read_text())["runs"]
                if r["method"] == "coral" and r["labeled"] == 1}
    coral = {(r["fold"], r["seed"]): r["dice_repeats"] for r in json.loads(coral_file.read_text())["runs"] if r["labeled"] == 1}
    rand = {(r["fold"], r["seed"]): r["dice_repeats"] for r in
            json.loads((HERE / "rand_rep2_folds2_table.json").read_text())["runs"] if r["labeled"] == 1}
    keys = sorted(set(coral) & set(rand))
    first = np.array([coral[k][0] for k in keys])
    second = np.array([coral[k][1] for k in keys])
    same = int(np.sum(first == np.array([original[k] for k in keys])))
    print(f"\n2 folds, CORAL fine-tuned twice, {len(keys)} runs: the first equals the original run's in {same}; "
          + two_fine_tunings(first, second))
    for label, c, r in (("first - first", first, [rand[k][0] for k in keys]),
                        ("second - second", second, [rand[k][1] for k in keys]),
                        ("mean of both - mean of both", (first + second) / 2, [np.mean(rand[k]) for k in keys])):
        d = c - np.array(r)
        print(f"  CORAL - random, {label}: {d.mean():+.3f} +- {d.std():.3f} ({wins_p(d)})")
