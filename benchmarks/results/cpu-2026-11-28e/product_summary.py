"""The encoder at a tenth of the learning rate at the product's settings: enclr_product.txt, paired by labelled
subject (the same subject, seed and held-out subjects in each row pair).

    python product_summary.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402

rows, subject = {}, None
for line in (HERE / "enclr_product.txt").read_text().splitlines():
    if line.startswith("labelled phantom"):
        subject = int(line.split()[2])
    elif line.startswith(("random", "coral")):
        f = line.split()
        rows[(f[0], float(f[6]), subject)] = (float(f[7]), float(f[-1]))  # held-out mean Dice, own
subjects = sorted({k[2] for k in rows})


def paired(a, b, which):
    d = np.array([rows[(*a, s)][which] - rows[(*b, s)][which] for s in subjects])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


print(f"{len(subjects)} labelled subjects")
for init in ("random", "coral"):
    for scale in (1.0, 0.1):
        held = [rows[(init, scale, s)][0] for s in subjects]
        own = [rows[(init, scale, s)][1] for s in subjects]
        print(f"{init} encoder x{scale:g}: held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, own {np.mean(own):.3f}")
for init in ("random", "coral"):
    print(f"{init}: x0.1 - x1, held out {paired((init, 0.1), (init, 1.0), 0)}; own {paired((init, 0.1), (init, 1.0), 1)}")
print(f"coral - random, both x1: held out {paired(('coral', 1.0), ('random', 1.0), 0)}")
print(f"coral x0.1 - random x1: held out {paired(('coral', 0.1), ('random', 1.0), 0)}; own {paired(('coral', 0.1), ('random', 1.0), 1)}")
