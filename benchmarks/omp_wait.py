"""OpenMP's wait policy for a fine-tuning that shares the CPU: libgomp's default (threads spin a while before
they sleep) or PASSIVE (they sleep at once).

    python benchmarks/omp_wait.py                      # idle machine, then beside 2 busy processes
    python benchmarks/omp_wait.py --busy 0 2 --steps 40 --repeats 2

The plugin's jobs run in a child process with torch's default threads (one per core) while napari, and maybe
another job, run beside them. Each row runs `coral finetune` as a subprocess (three annotated slices of a phantom,
`--device cpu`, the product's model and settings otherwise, `--steps` steps) with `OMP_WAIT_POLICY` unset (the
default) and set to PASSIVE, and ``--busy N`` single-threaded Python loops holding N cores meanwhile (the load of, say, a second job
or another program). It prints the wall time and the child's CPU time (user + system) of each, the policies taken
in turn so that a slow drift of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

BUSY = "while True: pass"


def run_once(folder: Path, policy: str, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of one `coral finetune` child with OMP_WAIT_POLICY=policy ("default": unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "coral_core.cli", "finetune", str(folder / "image.nii.gz"), "--labels",
                    str(folder / "labels.nii.gz"), "--slices", "1,3,6", "--steps", str(steps), "--device", "cpu",
                    "--out", str(folder / "model.safetensors")], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy processes beside the fine-tuning")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from coral_core.phantom import make_phantom
    from coral_core.volume import save_volume

    import torch

    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads by default; "
          f"`coral finetune` for {args.steps} steps on 3 slices, {args.repeats} runs per policy")
    print(f"{'busy':>4}  {'policy':<8}{'wall s (each run)':>28}{'mean wall s':>13}{'mean CPU s':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image, labels = make_phantom(1000)
        save_volume(folder / "image.nii.gz", image.array, image.affine)
        save_volume(folder / "labels.nii.gz", labels.array, labels.affine)
        for busy in args.busy:
            loads = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
            try:
                times: dict[str, list[tuple[float, float]]] = {"default": [], "PASSIVE": []}
                for _ in range(args.repeats):
                    for policy in times:
                        times[policy].append(run_once(folder, policy, args.steps))
            finally:
                for p in loads:
                    p.kill()
                    p.wait()
            for policy, runs in times.items():
                walls = ", ".join(f"{w:.1f}" for w, _ in runs)
                print(f"{busy:>4}  {policy:<8}{walls:>28}{np.mean([w for w, _ in runs]):13.1f}"
                      f"{np.mean([c for _, c in runs]):12.1f}")


if __name__ == "__main__":
    main()
