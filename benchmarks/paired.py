"""Helpers of the scripts in benchmarks/results/ that pair low-label runs across tables.

A run is keyed (method, seed, fold); runs of two tables with the same key share their folds, labelled subjects
and seed, so their difference is a paired one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402


def runs(path: Path) -> dict:
    """{(method, seed, fold): Dice} of a `coral bench lowlabel --table` file's runs at M = 1."""
    return {(r["method"], r["seed"], r["fold"]): r["dice"] for r in json.loads(Path(path).read_text())["runs"]
            if r["labeled"] == 1}


def paired(a: dict, b: dict, keys: list) -> str:
    """Mean +- std of a[k] - b[k] over ``keys``, how many are above 0, and the two-sided sign test's p."""
    d = np.array([a[k] - b[k] for k in keys])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


def finetune_lr_rows(path: Path, column: int) -> dict:
    """{(init, setting, labelled subject): (held-out mean Dice, own Dice)} of a `benchmarks/finetune_lr.py` loop's
    output, the setting read from the whitespace-separated field ``column`` of each row (6: --shifts)."""
    rows, subject = {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith("labelled phantom"):
            subject = int(line.split()[2])
        elif line.startswith(("random", "coral")):
            f = line.split()
            rows[(f[0], float(f[column]), subject)] = (float(f[column + 1]), float(f[-1]))
    return rows
