"""Summarise `benchmarks/finetune_lr.py` output over one of its settings (a column of its table, such as
`layout` or `cohort`): the mean held-out and own Dice for each init and value, and paired changes between
the values (same labelled subject and seed) and between the inits, with two-sided sign tests.

    python summarise.py layouts.txt layout
    python summarise.py cohort_product.txt cohort
"""
import itertools
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402

from coral_core.lowlabel import sign_test_p  # noqa: E402


def read(path: str, setting: str) -> tuple[dict, list[str]]:
    """(init, value) -> labelled subject -> (held-out Dice, own Dice), and the values in order of appearance."""
    rows, values, subject, column = defaultdict(dict), [], None, None
    for line in open(path):
        m = re.match(r"labelled phantom (\d+)", line)
        parts = line.split()
        if m:
            subject = int(m.group(1))
        elif parts and parts[0] == "init":
            column = parts.index(setting)
        elif parts and parts[0] in ("random", "coral"):
            value = parts[column]
            values += [value] if value not in values else []
            rows[(parts[0], value)][subject] = (float(parts[column + 1]), float(parts[-1]))
    return rows, values


def paired(a: dict, b: dict, col: int) -> str:
    keys = sorted(set(a) & set(b))
    d = np.array([a[k][col] - b[k][col] for k in keys])
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return f"{d.mean():+.3f} +- {d.std(ddof=1):.3f} (up in {up}/{len(d)}, p {sign_test_p(up, down):.2g})"


def main() -> None:
    rows, values = read(sys.argv[1], sys.argv[2])
    for init in ("random", "coral"):
        for value in values:
            d = rows[(init, value)]
            held, own = [v[0] for v in d.values()], [v[1] for v in d.values()]
            print(f"{init:7} {value}: {len(d)} subjects, held out {np.mean(held):.3f} +- {np.std(held, ddof=1):.3f}, "
                  f"own {np.mean(own):.3f}")
        for first, second in itertools.combinations(values, 2):
            print(f"  {init} {second} - {first}: held out {paired(rows[(init, second)], rows[(init, first)], 0)}; "
                  f"own {paired(rows[(init, second)], rows[(init, first)], 1)}")
    for first, second in itertools.combinations(values, 2):  # both inits' fine-tunes together
        both = [{(init, k): v for k, v in rows[(init, value)].items()} for value in (second, first) for init in
                ("random", "coral")]
        after, before = {**both[0], **both[1]}, {**both[2], **both[3]}
        print(f"both inits, {second} - {first}: held out {paired(after, before, 0)}; own {paired(after, before, 1)}")
    for value in values:
        print(f"coral - random at {value}: held out {paired(rows[('coral', value)], rows[('random', value)], 0)}")
    for first, second in itertools.permutations(values, 2):
        print(f"coral at {second} - random at {first}: held out "
              f"{paired(rows[('coral', second)], rows[('random', first)], 0)}")


if __name__ == "__main__":
    main()
