"""Summarise `benchmarks/finetune_lr.py --cohort-weights 0 0.1` output: held-out and own Dice per init and
weight, and the paired change the CORAL loss on the unlabelled phantoms made.

    python cohort_product_summary.py cohort_product.txt
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402

rows = defaultdict(dict)  # (init, weight) -> subject -> (held out, own)
subject = None
for line in open(sys.argv[1]):
    m = re.match(r"labelled phantom (\d+)", line)
    if m:
        subject = int(m.group(1))
        continue
    parts = line.split()
    if parts and parts[0] in ("random", "coral"):
        rows[(parts[0], float(parts[5]))][subject] = (float(parts[6]), float(parts[-1]))


def paired(a: dict, b: dict, col: int) -> str:
    keys = sorted(set(a) & set(b))
    d = np.array([a[k][col] - b[k][col] for k in keys])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


for (init, weight), d in sorted(rows.items()):
    held = [v[0] for v in d.values()]
    own = [v[1] for v in d.values()]
    print(f"{init:7} cohort weight {weight:g}: {len(d)} subjects, held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, "
          f"own {np.mean(own):.3f}")
for init in ("random", "coral"):
    print(f"{init}: with - without, held out {paired(rows[(init, 0.1)], rows[(init, 0.0)], 0)}; "
          f"own {paired(rows[(init, 0.1)], rows[(init, 0.0)], 1)}")
print(f"coral with - random without, held out {paired(rows[('coral', 0.1)], rows[('random', 0.0)], 0)}")
print(f"coral with - random with, held out {paired(rows[('coral', 0.1)], rows[('random', 0.1)], 0)}")
