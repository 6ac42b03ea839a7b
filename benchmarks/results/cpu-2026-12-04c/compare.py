"""A changed table's runs against the unchanged one's, run for run (same seeds, folds, labelled subjects and
machine): what the change did to each init, and CORAL's lead with it.
python compare.py select_table.json shift025_table.json"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paired import paired, runs  # noqa: E402

base, changed = runs(sys.argv[1]), runs(sys.argv[2])
keys = sorted(k[1:] for k in base if k[0] == "random")
name = Path(sys.argv[2]).stem
for method in ("random", "coral"):
    print(f"{method}: {name} - unchanged {paired(changed, base, [(method, *k) for k in keys])}")
print(f"coral - random in {name}:", paired({k[1:]: v for k, v in changed.items() if k[0] == "coral"},
                                            {k[1:]: v for k, v in changed.items() if k[0] == "random"}, keys))
print(f"coral in {name} - random unchanged:", paired({k[1:]: v for k, v in changed.items() if k[0] == "coral"},
                                                     {k[1:]: v for k, v in base.items() if k[0] == "random"}, keys))
