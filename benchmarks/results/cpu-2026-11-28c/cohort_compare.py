"""The semi-supervised fine-tuning (`--finetune-cohort-weight 0.1`) against the same runs without it.

    python cohort_compare.py
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import numpy as np  # noqa: E402

from paired import paired, runs  # noqa: E402  (benchmarks/paired.py)

with_loss = runs(HERE / "cohort_table.json")
without = runs(HERE.parent / "cpu-2026-11-28" / "quick_seeds10_table.json")
for method in ("random", "coral"):
    keys = sorted(k for k in with_loss if k[0] == method)
    print(f"{method}: {len(keys)} runs; with the cohort loss {np.mean([with_loss[k] for k in keys]):.3f} "
          f"+- {np.std([with_loss[k] for k in keys], ddof=1):.3f}, without {np.mean([without[k] for k in keys]):.3f}; "
          f"change {paired(with_loss, without, keys)}")
pairs = sorted({k[1:] for k in with_loss if ("random", *k[1:]) in with_loss and ("coral", *k[1:]) in with_loss})
coral = {k: with_loss[("coral", *k)] for k in pairs}
random = {k: with_loss[("random", *k)] for k in pairs}
print(f"with the cohort loss, coral - random: {paired(coral, random, pairs)}")
base_coral = {k: without[("coral", *k)] for k in pairs}
print(f"coral with the cohort loss - random without it: {paired(coral, {k: without[('random', *k)] for k in pairs}, pairs)}")
print(f"(without it, coral - random on the same runs: {paired(base_coral, {k: without[('random', *k)] for k in pairs}, pairs)})")
