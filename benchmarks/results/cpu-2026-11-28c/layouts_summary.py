"""Summarise `benchmarks/finetune_lr.py --layouts` output: mean held-out and own Dice per init and layout,
and paired changes between layouts (same labelled subject, same seed) with sign tests.

    python layouts_summary.py layouts.txt
"""
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402

rows = defaultdict(dict)  # (init, layout) -> subject -> (held, own)
subject = None
for line in open(sys.argv[1]):
    m = re.match(r"labelled phantom (\d+)", line)
    if m:
        subject = int(m.group(1))
        continue
    parts = line.split()
    if parts and parts[0] in ("random", "coral"):
        rows[(parts[0], parts[4])][subject] = (float(parts[5]), float(parts[-1]))

for init in ("random", "coral"):
    for layout in ("1x3", "1x6", "2x3"):
        d = rows[(init, layout)]
        held = [v[0] for v in d.values()]
        own = [v[1] for v in d.values()]
        print(f"{init:7} {layout}: n={len(d)} held {np.mean(held):.3f} ± {np.std(held, ddof=1):.3f}  own {np.mean(own):.3f}")
    for a, b in (("1x6", "1x3"), ("2x3", "1x3"), ("2x3", "1x6")):
        common = sorted(set(rows[(init, a)]) & set(rows[(init, b)]))
        for col, name in ((0, "held"), (1, "own")):
            diff = np.array([rows[(init, a)][s][col] - rows[(init, b)][s][col] for s in common])
            wins = int((diff > 0).sum())
            print(f"   {init} {a} - {b} {name}: {diff.mean():+.3f} ± {diff.std(ddof=1):.3f}, up in {wins}/{len(diff)}, "
                  f"p {sign_test_p(wins, int((diff < 0).sum())):.2g}")
for layout in ("1x3", "1x6", "2x3"):
    common = sorted(set(rows[("random", layout)]) & set(rows[("coral", layout)]))
    diff = np.array([rows[("coral", layout)][s][0] - rows[("random", layout)][s][0] for s in common])
    wins = int((diff > 0).sum())
    print(f"coral - random {layout} held: {diff.mean():+.3f} ± {diff.std(ddof=1):.3f} ({wins}/{len(diff)}, p {sign_test_p(wins, int((diff < 0).sum())):.2g})")
