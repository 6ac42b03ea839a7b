"""Mean Dice of every method at each checkpoint of a table's fine-tunings (the runs' `curve`, from
--score-every), over the (seed, fold) runs that every method has, and CORAL's lead over each other method there
(mean, and in how many runs it led): python curves_all.py lpft_enc01_baselines_table.json"""
import json
import sys
from pathlib import Path

import numpy as np

runs = [r for r in json.loads(Path(sys.argv[1]).read_text())["runs"] if r["labeled"] == 1 and "curve" in r]
methods = list(dict.fromkeys(r["method"] for r in runs))
curve = {(r["method"], r["seed"], r["fold"]): np.array(r["curve"]) for r in runs}
keys = sorted(set.intersection(*({k[1:] for k in curve if k[0] == m} for m in methods)))
steps = curve[(methods[0], *keys[0])][:, 0].astype(int)
others = [m for m in methods if m != "coral"]
print(f"{len(keys)} runs per method; mean Dice at each checkpoint, then coral - method (coral ahead in)")
print(f"{'step':>5}" + "".join(f"{m:>8}" for m in methods) + "".join(f"{'- ' + m:>16}" for m in others))
for i, step in enumerate(steps):
    at = {m: np.array([curve[(m, *k)][i, 1] for k in keys]) for m in methods}
    c = at["coral"]
    lead = "".join(f"{f'{(c - at[m]).mean():+.3f} ({int((c > at[m]).sum())})':>16}" for m in others)
    print(f"{step:>5}" + "".join(f"{at[m].mean():8.3f}" for m in methods) + lead)
