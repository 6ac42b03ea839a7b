"""Two tables of the same runs, fine-tuned with two recipes (plain, and LP-FT with a slow encoder), paired run
for run (same seeds, folds, labelled subjects, pretrainings and machine). For each method in both tables: what
the recipe did to it, its lead over random init within each table, its lead over plainly fine-tuned random init
(the comparison a user faces), and CORAL's lead over it within each table.
python recipes.py plain40_table.json recipe40_table.json"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paired import paired, runs  # noqa: E402

plain, recipe = runs(sys.argv[1]), runs(sys.argv[2])
methods = list(dict.fromkeys(k[0] for k in recipe if any(j[0] == k[0] for j in plain)))
keys = sorted(k[1:] for k in recipe if k[0] == "random" and k in plain)
print(f"{len(keys)} paired runs (seed, fold) in both tables: {Path(sys.argv[1]).name} (plain), "
      f"{Path(sys.argv[2]).name} (recipe)")


def of(table: dict, method: str) -> dict:
    return {k[1:]: v for k, v in table.items() if k[0] == method}


for method in methods:
    ks = [k for k in keys if (method, *k) in plain and (method, *k) in recipe]
    print(f"\n{method} ({len(ks)} runs)")
    print(f"  recipe - plain:                  {paired(of(recipe, method), of(plain, method), ks)}")
    if method == "random":
        continue
    print(f"  - random, both plain:            {paired(of(plain, method), of(plain, 'random'), ks)}")
    print(f"  - random, both recipe:           {paired(of(recipe, method), of(recipe, 'random'), ks)}")
    print(f"  recipe - random plain:           {paired(of(recipe, method), of(plain, 'random'), ks)}")
    if method != "coral":
        print(f"  coral - it, both plain:          {paired(of(plain, 'coral'), of(plain, method), ks)}")
        print(f"  coral - it, both recipe:         {paired(of(recipe, 'coral'), of(recipe, method), ks)}")
