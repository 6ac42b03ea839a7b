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


def runs(path: Path, labeled: int = 1) -> dict:
    """{(method, seed, fold): Dice} of a `coral bench lowlabel --table` file's runs at M = ``labeled``."""
    return {(r["method"], r["seed"], r["fold"]): r["dice"] for r in json.loads(Path(path).read_text())["runs"]
            if r["labeled"] == labeled}


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


def finetune_lr_summary(path: Path, column: int, new: float, old: float, name: str = "shift") -> list[str]:
    """Two settings of a `benchmarks/finetune_lr.py` loop's output (the setting in field ``column``, as
    :func:`finetune_lr_rows`), paired by labelled subject: each init's mean held-out and own Dice at each setting,
    ``new`` - ``old`` for each init and both, and CORAL - random init at each setting."""
    rows = finetune_lr_rows(path, column)
    subjects = sorted({k[2] for k in rows})

    def split(d: np.ndarray, down_too: bool) -> str:
        up, down = int((d > 0).sum()), int((d < 0).sum())
        downs = f", down in {down}" if down_too else ""
        return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}{downs}, p {sign_test_p(up, down):.2g})"

    def changes(which: int, inits=("random", "coral")) -> str:
        return split(np.array([rows[(i, new, s)][which] - rows[(i, old, s)][which] for i in inits for s in subjects]),
                     True)

    def versus(setting: float, which: int) -> str:
        return split(np.array([rows[("coral", setting, s)][which] - rows[("random", setting, s)][which]
                               for s in subjects]), False)

    lines = [f"{len(subjects)} labelled subjects"]
    for init in ("random", "coral"):
        for setting in (old, new):
            held = [rows[(init, setting, s)][0] for s in subjects]
            own = [rows[(init, setting, s)][1] for s in subjects]
            lines.append(f"{init} {name} {setting:g}: held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, "
                         f"own {np.mean(own):.3f}")
    for init in ("random", "coral"):
        lines.append(f"{init}: {new:g} - {old:g}, held out {changes(0, (init,))}; own {changes(1, (init,))}")
    lines.append(f"both inits, {new:g} - {old:g}: held out {changes(0)}; own {changes(1)}")
    for setting in (old, new):
        lines.append(f"coral - random at {setting:g}: held out {versus(setting, 0)}; own {versus(setting, 1)}")
    return lines
