"""Odd option values against every ``coral`` command: does each run either go or stop with one ``error:`` line and
exit status 2, never a traceback, a crash, a runaway allocation or a partly written output?

    python benchmarks/fuzz_options.py                          # every option of every command
    python benchmarks/fuzz_options.py --commands segment,finetune --show 20

The options are read from ``coral``'s own parser, so a new one is tried without being listed here. Each command starts
from a small command line that runs in a second or two (a 6-slice phantom scan, its labels, tiny models), and each
case changes one option of it to an odd value of that option's kind: whole numbers (0, -1, huge, not a number, a
fraction), numbers (0, -1, NaN, infinite, 1e300, 1e-300, text), lists and ranges (empty, commas only, reversed,
repeated, huge), and paths (empty, a missing folder, a folder, /dev/null, a file where a folder is expected, a wrong
ending). Choices and switches are left to argparse.

Each case runs ``coral_core.cli.main`` in a forked child with an address-space limit (``--memory-gib``) and a time
limit (``--timeout``), its output in a folder of its own. The table counts, per command: ran (exit 0), refused (exit
2 with one ``error:`` line), ran on (still running at the time limit: a value taken, such as --epochs 100000, and
listed with ``--show``), and the defects: a traceback or another exception, an exit status other than 0 or 2, a
refusal that left files behind, a file given to the command written over (the scan, its labels or a model; put back
for the next case), out of memory, killed by a signal. Exits 1 when there is a defect.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forked import run_forked  # noqa: E402

WHOLE = ("0", "-1", "-99999999999999999999", "99999999999999999999", "1.5", "1e3", "abc", "")
NUMBER = ("0", "-1", "nan", "inf", "-inf", "1e300", "1e-300", "abc", "")
TEXT = ("", ",", " , ", "0", "-1", "1,-1", "5-2", "1e30", "nan,nan", "99999999999", "a,b,a", "0,0", "1-99999999999",
        "inf,inf")
PATH_OPTIONS = {"out", "out_dir", "model", "init", "labels", "plot", "data", "table", "slice_cache", "unlabelled",
                "save_model"}
DEFECTS = ("exception", "exit status", "left files", "input replaced", "out of memory", "killed")


def make_inputs(folder: Path) -> dict[str, str]:
    """A phantom scan and its labels, a fine-tuned and a pretrained tiny model; names for the base command lines.
    The models are trained in another process: a parent that has run torch's threads forks children that hang."""
    import subprocess

    from coral_core.phantom import make_phantom
    from coral_core.volume import save_volume

    folder.mkdir()
    image, labels = make_phantom(3, n_slices=6)
    files = {"img": str(save_volume(folder / "scan.nii.gz", image.array, image.affine)),
             "lab": str(save_volume(folder / "scan_labels.nii.gz", labels.array, labels.affine)),
             "model": str(folder / "tiny.safetensors"), "pre": str(folder / "pre.safetensors")}
    quiet = ["--base-filters", "4", "--image-size", "32", "--device", "cpu"]
    for argv in (["finetune", files["img"], "--labels", files["lab"], "--steps", "2", "--out", files["model"], *quiet],
                 ["pretrain", "--phantom", "2", "--epochs", "1", "--batch-size", "4", "--out", files["pre"], *quiet]):
        done = subprocess.run([sys.executable, "-m", "coral_core.cli", *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the base input could not be made: coral {' '.join(argv)}\n{done.stderr}")
    return files


def base_commands(f: dict[str, str]) -> dict[str, list[str]]:
    """Command lines that run in a second or two; ``OUT`` stands for the case's own output folder."""
    tiny = ["--base-filters", "4", "--image-size", "32"]
    return {
        "pretrain": ["pretrain", "--phantom", "2", "--epochs", "1", "--batch-size", "4", *tiny,
                     "--out", "OUT/pre.safetensors"],
        "finetune": ["finetune", f["img"], "--labels", f["lab"], "--steps", "2", *tiny, "--out", "OUT/ft.safetensors"],
        "segment": ["segment", f["img"], "--model", f["model"], "--out", "OUT/labels.nii.gz"],
        "embed": ["embed", f["img"], "--model", f["model"], "--out", "OUT/table.csv"],
        "evaluate": ["evaluate", f["lab"], f["lab"]],
        "info": ["info", f["model"]],
        "demo": ["demo", "--phantom", "1", "--epochs", "1", "--steps", "2", "--out-dir", "OUT/demo"],
        "bench lowlabel": ["bench", "lowlabel", "--quick", "--phantom", "4", "--folds", "2", "--seeds", "1",
                           "--methods", "random", "--pretrain-epochs", "1", "--finetune-steps", "2", "--base-filters",
                           "4", "--image-size", "32", "--workers", "1", "--labeled", "1"],
        "bench embedding": ["bench", "embedding", "--phantom", "2", "--epochs", "1", "--show", "1",
                            "--out", "OUT/fig.png"],
    }


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _values(action: argparse.Action, f: dict[str, str], out: str) -> tuple[str, ...]:
    if action.dest in PATH_OPTIONS:
        return ("", f"{out}/missing/folder/x.nii.gz", out, "/dev/null", f"{f['img']}/x", f"{out}/x.txt", f["img"])
    if action.type is float:
        return NUMBER
    if action.type not in (None, str):  # int and coral's own whole-number types
        return WHOLE
    return TEXT


def cases(commands: list[str], f: dict[str, str]) -> list[tuple[str, str, str, list[str]]]:
    """(command, option, value, argv with OUT in it) for every valued option of each command."""
    from coral_core.cli import build_parser

    parser, bases, found = build_parser(), base_commands(f), []
    for name in commands:
        base = bases[name]
        sub = _subparser(parser, name.split())
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.choices or action.dest == "help":
                continue
            option = action.option_strings[0]
            argv = list(base)
            if option in argv:  # the base's own value goes
                i = argv.index(option)
                del argv[i:i + 2]
            for value in _values(action, f, "OUT"):
                found.append((name, option, value, [*argv, f"{option}={value}"]))
    return found


def run_case(argv: list[str], work: Path, timeout: float, memory_gib: float) -> dict:
    """``coral ARGV`` in a forked child, in ``work``; what happened, as a dict."""
    work.mkdir()
    outdir = work / "out"
    outdir.mkdir()
    argv = [a.replace("OUT", str(outdir)) for a in argv]
    report, stderr = work / "report.json", work / "stderr.txt"

    def prepare() -> None:
        os.chdir(outdir)  # what a relative name writes is the case's own, and counted if left by a refusal
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT), 2)

    def command() -> dict:
        from coral_core.cli import main

        try:
            return {"status": main(argv)}
        except SystemExit as exc:  # argparse: --help, or a bad command line
            return {"status": exc.code if isinstance(exc.code, int) else 2}
        finally:
            sys.stderr.flush()

    result = run_forked(command, report, timeout, memory_gib, prepare=prepare, timed_out="ran on")
    if "outcome" in result:
        return result
    text = stderr.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if "Traceback" in text:
        return {"outcome": "exception", "message": text.strip().splitlines()[-1][:200]}
    if result["status"] == 0:
        return {"outcome": "ran"}
    if result["status"] != 2 or len(errors) != 1:
        return {"outcome": "exit status", "message": f"status {result['status']}: {(lines or [''])[-1][:200]}"}
    left = sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*"))
    if left:
        return {"outcome": "left files", "message": f"{', '.join(left)} after {errors[0][:160]}"}
    return {"outcome": "refused", "message": errors[0][:200]}


def main() -> int:
    names = ("pretrain", "finetune", "segment", "embed", "evaluate", "info", "demo", "bench lowlabel",
             "bench embedding")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", default=",".join(names), help=f"comma-separated, of {', '.join(names)}")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="address space a case may add")
    parser.add_argument("--show", type=int, default=5, help="cases of each outcome but ran and refused printed")
    parser.add_argument("--refusals", action="store_true", help="also print every refusal's sentence")
    parser.add_argument("--only", default=None, help="an option, e.g. --seed: only its cases")
    args = parser.parse_args()
    commands = args.commands.split(",")
    unknown = sorted(set(commands) - set(names))
    if unknown:
        parser.error(f"unknown command {', '.join(unknown)}; choose from {', '.join(names)}")
    import importlib

    for module in ("torch", "coral_core.cli"):  # imported once, before the forks
        importlib.import_module(module)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_inputs(tmp / "inputs")
        todo = [c for c in cases(commands, files) if args.only in (None, c[1])]
        for name in commands:  # the base command lines themselves must run
            result = run_case(base_commands(files)[name], tmp / f"base-{name}", args.timeout * 3, args.memory_gib)
            if result.get("outcome", "ran") != "ran":
                print(f"the base command line of {name} did not run: {result}", file=sys.stderr)
                return 1
        counts = {name: dict.fromkeys(("ran", "refused", "ran on", *DEFECTS), 0) for name in commands}
        shown, started = [], time.perf_counter()
        pristine = {path: path.read_bytes() for path in (tmp / "inputs").iterdir()}
        for i, (name, option, value, argv) in enumerate(todo):
            result = run_case(argv, tmp / f"case{i}", args.timeout, args.memory_gib)
            replaced = [path.name for path, data in pristine.items() if not path.is_file() or path.read_bytes() != data]
            if replaced:  # the case wrote over a file it was given: a defect whatever its exit status; put it back
                result = {"outcome": "input replaced", "message": f"{', '.join(replaced)} ({result['outcome']})"}
                for path, data in pristine.items():
                    if path.is_dir():
                        path.rmdir()
                    path.write_bytes(data)
            outcome = result["outcome"]
            counts[name][outcome] += 1
            if (outcome == "refused" and args.refusals) or (outcome not in ("ran", "refused") and sum(
                    1 for s in shown if s[0] == name and s[3] == outcome) < args.show):
                shown.append((name, option, value, outcome, result.get("message", ""), result.get("where", "")))
        seconds = time.perf_counter() - started
    print(f"Odd option values through the coral command ({len(todo)} cases, {seconds:.0f} s)\n")
    header = f"{'command':<16} {'ran':>5} {'refused':>7} {'ran on':>6} " + " ".join(f"{d:>14}" for d in DEFECTS)
    print(header)
    print("-" * len(header))
    for name in commands:
        c = counts[name]
        print(f"{name:<16} {c['ran']:>5} {c['refused']:>7} {c['ran on']:>6} " + " ".join(f"{c[d]:>14}" for d in DEFECTS))
    for name, option, value, outcome, message, where in shown:
        print(f"\ncoral {name} {option} {value!r}: {outcome}" + (f" at {where}" if where else "") + f"\n    {message}")
    return 1 if any(counts[n][d] for n in commands for d in DEFECTS) else 0


if __name__ == "__main__":
    sys.exit(main())
