"""Each table of this folder against the unchanged quick setting's runs with the same seeds, folds and labelled
subjects (cpu-2026-11-28b/seeds20_table.json: seeds 0-19 of random init and CORAL, its seeds 0-9 those of
cpu-2026-11-28/quick_seeds10_table.json), paired run by run.

    python compare.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402

from paired import paired, runs  # noqa: E402  (benchmarks/paired.py)

unchanged = runs(HERE.parent / "cpu-2026-11-28b" / "seeds20_table.json")
for table in sorted(HERE.glob("*_table.json")):
    changed = runs(table)
    pairs = sorted({k[1:] for k in changed if ("random", *k[1:]) in changed and ("coral", *k[1:]) in changed})
    print(f"{table.name}: {len(pairs)} paired runs")
    for method in ("random", "coral"):
        keys = [(method, *k) for k in pairs]
        values = [changed[k] for k in keys]
        print(f"  {method}: {np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}; against the unchanged setting "
              f"({np.mean([unchanged[k] for k in keys]):.3f}): {paired(changed, unchanged, keys)}")
    coral = {k: changed[("coral", *k)] for k in pairs}
    print(f"  coral - random, both changed: {paired(coral, {k: changed[('random', *k)] for k in pairs}, pairs)}")
    print(f"  coral changed - random unchanged: {paired(coral, {k: unchanged[('random', *k)] for k in pairs}, pairs)}")
