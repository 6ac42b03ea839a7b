"""Every method of one `coral bench lowlabel --table` file, over the runs that all its methods hold (a table
continued with more seeds for some methods holds more runs for those), at each labelled count: the mean Dice,
each method's lead over random init and CORAL's lead over it (paired run for run), and in how many pretrainings
(a seed's mean over its folds) the method leads random init and CORAL leads it.
python methods.py folds5_pre64_base_table.json"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paired import paired, runs  # noqa: E402

path = Path(sys.argv[1])
table = json.loads(path.read_text())
for m in sorted({r["labeled"] for r in table["runs"]}):
    dice = runs(path, m)
    methods = [method for method in table["config"]["methods"] if any(k[0] == method for k in dice)]
    keys = sorted(set.intersection(*({k[1:] for k in dice if k[0] == method} for method in methods)))
    seeds = sorted({k[0] for k in keys})
    of = {method: {k: dice[(method, *k)] for k in keys} for method in methods}

    def seeds_ahead(a: str, b: str) -> str:
        ahead = sum(np.mean([of[a][k] - of[b][k] for k in keys if k[0] == s]) > 0 for s in seeds)
        return f"{ahead}/{len(seeds)}"

    print(f"\nM = {m}: {len(keys)} runs that every method holds (seeds {seeds[0]}-{seeds[-1]}, "
          f"{len({k[1] for k in keys})} folds)")
    for method in methods:
        line = f"  {method:<7} {np.mean(list(of[method].values())):.3f}"
        if method != "random":
            line += (f"; - random {paired(of[method], of['random'], keys)}, "
                     f"pretrainings ahead {seeds_ahead(method, 'random')}")
        if method not in ("random", "coral"):
            line += (f"; coral - it {paired(of['coral'], of[method], keys)}, "
                     f"pretrainings ahead {seeds_ahead('coral', method)}")
        print(line)
