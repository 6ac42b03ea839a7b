"""Fine-tuning shifts of up to 0.25 of the input against 0.08 at the product's settings: shift_product.txt,
paired by labelled subject (the same subject, seed and held-out subjects in each row pair).

    python product_shift.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402

rows, subject = {}, None
for line in (HERE / "shift_product.txt").read_text().splitlines():
    if line.startswith("labelled phantom"):
        subject = int(line.split()[2])
    elif line.startswith(("random", "coral")):
        f = line.split()
        rows[(f[0], float(f[6]), subject)] = (float(f[7]), float(f[-1]))  # held-out mean Dice, own
subjects = sorted({k[2] for k in rows if (k[0], 0.25, k[2]) in rows and ("coral", 0.25, k[2]) in rows})


def paired(a, b, which):
    d = np.array([rows[(*a, s)][which] - rows[(*b, s)][which] for s in subjects])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


print(f"{len(subjects)} labelled subjects")
for init in ("random", "coral"):
    for shift in (0.08, 0.25):
        held = [rows[(init, shift, s)][0] for s in subjects]
        own = [rows[(init, shift, s)][1] for s in subjects]
        print(f"{init} shift {shift:g}: held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, own {np.mean(own):.3f}")
for init in ("random", "coral"):
    print(f"{init}: 0.25 - 0.08, held out {paired((init, 0.25), (init, 0.08), 0)}; own {paired((init, 0.25), (init, 0.08), 1)}")
both = [rows[(i, 0.25, s)][w] - rows[(i, 0.08, s)][w] for i in ("random", "coral") for s in subjects for w in (0,)]
own = [rows[(i, 0.25, s)][1] - rows[(i, 0.08, s)][1] for i in ("random", "coral") for s in subjects]
for name, d in (("held out", np.array(both)), ("own", np.array(own))):
    up, down = int((d > 0).sum()), int((d < 0).sum())
    print(f"both inits, 0.25 - 0.08, {name}: {d.mean():+.3f} (up in {up}/{len(d)}, down in {down}, p {sign_test_p(up, down):.2g})")
for shift in (0.08, 0.25):
    print(f"coral - random at {shift:g}: held out {paired(('coral', shift), ('random', shift), 0)}; "
          f"own {paired(('coral', shift), ('random', shift), 1)}")
