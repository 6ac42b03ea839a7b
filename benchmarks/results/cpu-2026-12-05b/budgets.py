"""Tables of the same runs with every method pretrained for different budgets (the quick setting's
--pretrain-epochs), paired run for run (same seeds, folds and labelled subjects, same machine). For each method
that every table holds, over the runs that every table holds for it: its mean Dice at each budget, its lead over
random init, its change from the first table's budget, and CORAL's lead over it. Random init does not pretrain,
so its runs must be the same in every table; the script checks that they are, bit for bit.
Each argument is LABEL=TABLE, the label naming the budget (epochs, and the rate where it differs); the first is
the reference, and random init's runs are taken from the first table that holds them. `--labeled=M` first pairs
the runs with M labelled volumes (default 1):
python budgets.py 8=../cpu-2026-12-05/plain_baselines_table.json 64=pre64_baselines_table.json
python budgets.py 8=../cpu-2026-12-05/plain40_table.json 32=pre32_plain_table.json 64=pre64_plain_table.json \
    8@3e-3=prelr3e-3_plain_table.json 8@1e-2=prelr1e-2_plain_table.json"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paired import paired, runs  # noqa: E402

args = sys.argv[1:]
labeled = int(args.pop(0).split("=")[1]) if args[0].startswith("--labeled=") else 1  # the runs at M = this
tables = {a.split("=")[0]: runs(a.split("=", 1)[1], labeled) for a in args}  # LABEL=TABLE: the label names the budget
budgets = list(tables)
base = budgets[0]


def of(table: dict, method: str) -> dict:
    return {k[1:]: v for k, v in table.items() if k[0] == method}


# random init's runs: the first table's that has them (the first table's, if it has them)
home = next((b for b in budgets if of(tables[b], "random")), base)
random = of(tables[home], "random")
for budget in budgets:
    theirs = of(tables[budget], "random")
    same = [k for k in theirs if k in random]
    assert all(theirs[k] == random[k] for k in same), f"random init differs in table {budget}"
    if same and budget != home:
        print(f"random init: {len(same)} runs of table {budget} equal table {home}'s, bit for bit")
methods = [m for m in dict.fromkeys(k[0] for k in tables[base]) if m != "random"
           and all(of(t, m) for t in tables.values())]
for method in methods:
    keys = sorted(set(random).intersection(*(of(t, m) for t in tables.values() for m in {method, "coral"})))
    print(f"\n{method} ({len(keys)} runs that every table holds for it and CORAL; random init "
          f"{np.mean([random[k] for k in keys]):.3f})")
    for budget in budgets:
        mine = of(tables[budget], method)
        line = (f"  {budget:>9}: {np.mean([mine[k] for k in keys]):.3f}; - random {paired(mine, random, keys)}")
        if budget != base:
            line += f"; - itself at {base} {paired(mine, of(tables[base], method), keys)}"
        if method != "coral":
            line += f"; coral - it {paired(of(tables[budget], 'coral'), mine, keys)}"
        print(line)
