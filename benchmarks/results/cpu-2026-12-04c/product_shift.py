"""Fine-tuning shifts of up to 0.25 of the input against 0.08 at the product's settings: shift_product.txt,
paired by labelled subject (the same subject, seed and held-out subjects in each row pair).

    python product_shift.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402
from paired import finetune_lr_rows, sign_test_p  # noqa: E402

rows = finetune_lr_rows(HERE / "shift_product.txt", 6)  # init, lr, balance, zoom, layout, cohort, shift, ...
subjects = sorted({k[2] for k in rows})


def changes(a, b, which, inits=("random", "coral")) -> str:
    d = np.array([rows[(i, a, s)][which] - rows[(i, b, s)][which] for i in inits for s in subjects])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, down in {down}, p {sign_test_p(up, down):.2g})"


def versus(shift, which) -> str:
    d = np.array([rows[("coral", shift, s)][which] - rows[("random", shift, s)][which] for s in subjects])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


print(f"{len(subjects)} labelled subjects")
for init in ("random", "coral"):
    for shift in (0.08, 0.25):
        held = [rows[(init, shift, s)][0] for s in subjects]
        own = [rows[(init, shift, s)][1] for s in subjects]
        print(f"{init} shift {shift:g}: held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, own {np.mean(own):.3f}")
for init in ("random", "coral"):
    print(f"{init}: 0.25 - 0.08, held out {changes(0.25, 0.08, 0, (init,))}; own {changes(0.25, 0.08, 1, (init,))}")
print(f"both inits, 0.25 - 0.08: held out {changes(0.25, 0.08, 0)}; own {changes(0.25, 0.08, 1)}")
for shift in (0.08, 0.25):
    print(f"coral - random at {shift:g}: held out {versus(shift, 0)}; own {versus(shift, 1)}")
