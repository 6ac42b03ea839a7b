"""CORAL's lead over random init at each checkpoint of select_table.json's fine-tunings (mean over the 40 paired
runs, and how many CORAL led), and each init's Dice there: python curves.py select_table.json"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from coral_core.lowlabel import sign_test_p  # noqa: E402

runs = json.loads(Path(sys.argv[1]).read_text())["runs"]
curve = {(r["method"], r["seed"], r["fold"]): np.array(r["curve"]) for r in runs}
keys = sorted({k[1:] for k in curve})
steps = curve[("random", *keys[0])][:, 0].astype(int)
print(f"{'step':>5}{'random':>9}{'coral':>8}{'coral - random (wins, p)':>34}{'pooled: random':>16}{'coral':>8}")
for i, step in enumerate(steps):
    rnd = np.array([curve[("random", *k)][i, 1] for k in keys])
    cor = np.array([curve[("coral", *k)][i, 1] for k in keys])
    d = cor - rnd
    up, down = int((d > 0).sum()), int((d < 0).sum())
    pr = np.mean([curve[("random", *k)][i, 2] for k in keys])
    pc = np.mean([curve[("coral", *k)][i, 2] for k in keys])
    print(f"{step:>5}{rnd.mean():9.3f}{cor.mean():8.3f}{f'{d.mean():+.3f} +- {d.std():.3f} ({up}/{len(d)}, {sign_test_p(up, down):.2g})':>34}"
          f"{pr:16.3f}{pc:8.3f}")
