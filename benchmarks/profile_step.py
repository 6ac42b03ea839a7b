"""Where a pretraining step's time goes: torch.profiler over a few steps of the GPU protocol.

    python benchmarks/profile_step.py --device cuda                      # the defaults (a long run's)
    python benchmarks/profile_step.py --device cuda --levers none        # a variant of `coral bench speed --levers`
    python benchmarks/profile_step.py --device cpu --size 64 --batch 8   # a dry run on a CPU

Runs `coral_core.pretrain.pretrain` as `coral bench speed` does (352 x 352, 48 base filters,
batch 64 by default), skips the first steps (compiling, cuDNN's choices, memory pools), records
three, and prints the operators that took the most device time (CPU time on a CPU), with the
share of the step each took. `--trace FILE.json` also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.profiler import ProfilerActivity, profile, schedule  # noqa: E402

from coral_core.device import resolve_device  # noqa: E402
from coral_core.levers import AUTO_COMPILE_MIN_WORK, LEVER_VARIANTS  # noqa: E402
from coral_core.model import UNetConfig  # noqa: E402
from coral_core.pretrain import PretrainConfig, pretrain  # noqa: E402
from coral_core.speedbench import _cohort  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--levers", default="defaults", choices=list(LEVER_VARIANTS))
    ap.add_argument("--size", type=int, default=352)
    ap.add_argument("--filters", type=int, default=48)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--skip", type=int, default=8, help="steps before recording")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--trace", default=None, metavar="FILE.json")
    args = ap.parse_args()

    device = resolve_device(args.device)
    levers = LEVER_VARIANTS[args.levers]
    # as in `coral bench speed`: "auto" takes the choice of a long run
    levers = replace(levers, compile=levers.compile_mode(device, pretraining=True, work=AUTO_COMPILE_MIN_WORK))
    active = 3
    volumes = _cohort(args.batch * 4, 0)
    n = sum(v.shape[0] for v in volumes)
    epochs = -(-(args.skip + active + 2) // max(1, n // args.batch))
    cfg = PretrainConfig(method="coral", epochs=epochs, batch_size=args.batch, device=args.device,
                         model=UNetConfig(base_filters=args.filters, image_size=args.size), levers=levers)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    stop = threading.Event()
    with profile(activities=activities, schedule=schedule(wait=args.skip, warmup=1, active=active)) as prof:
        def on_step(step, total, metrics):  # the step has finished on the device (its loss is a float)
            prof.step()
            if step >= args.skip + 1 + active:
                stop.set()

        pretrain(cfg, volumes, on_step, stop)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(getattr(e, sort, 0) for e in averages)
    print(f"{args.levers} on {device}: {args.size} px, {args.filters} filters, batch {args.batch}; "
          f"{active} steps recorded, {total / active / 1e3:.1f} ms of {'device' if device.type == 'cuda' else 'CPU'} "
          f"time per step in operators")
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
