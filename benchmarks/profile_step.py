"""Where a pretraining step's time goes: torch.profiler over a few steps of the GPU protocol.

    python benchmarks/profile_step.py --device cuda                      # the defaults (a long run's)
    python benchmarks/profile_step.py --device cuda --levers none        # a variant of `coral bench speed --levers`
    python benchmarks/profile_step.py --device cpu --size 64 --batch 8   # a dry run on a CPU
    python benchmarks/profile_step.py --device cuda --task segment       # inference of a 200-slice volume

Runs `coral_core.pretrain.pretrain` as `coral bench speed` does (352 x 352, 48 base filters,
batch 64 by default), skips the first steps (compiling, cuDNN's choices, memory pools), records
three, and prints the operators that took the most device time (CPU time on a CPU), with the
share of the step each took. `--trace FILE.json` also writes a Chrome trace. `--task segment` profiles
`segment_volume` on a 200-slice volume (batch 50, as `coral bench speed`) instead: two passes
first, then three recorded.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
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
    ap.add_argument("--task", default="pretrain", choices=["pretrain", "segment"])
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
    if args.task == "segment":
        profile_segment(args, device, levers)
        return
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
    ends: list[float] = []  # wall time at the end of each step, to set against the operators' device time
    with profile(activities=activities, schedule=schedule(wait=args.skip, warmup=1, active=active),
                 record_shapes=True) as prof:
        def on_step(step, total, metrics):  # the step has finished on the device (its loss is a float)
            ends.append(time.perf_counter())
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
    recorded = ends[args.skip:args.skip + active + 1]  # the end of the step before the recorded ones, and theirs
    if len(recorded) >= 2:
        wall = (recorded[-1] - recorded[0]) / (len(recorded) - 1)
        print(f"wall time per recorded step (profiler on): {wall * 1e3:.1f} ms; "
              f"{args.batch / wall:.1f} slices/s")
    print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    _print_convolutions(prof, device, active)
    if args.trace:
        prof.export_chrome_trace(args.trace)


def profile_segment(args, device, levers) -> None:
    import numpy as np
    import torch

    from coral_core.infer import segment_volume
    from coral_core.model import build_model

    torch.manual_seed(0)
    net = build_model(UNetConfig(base_filters=args.filters, image_size=args.size, n_classes=4)).to(device).eval()
    volume = np.random.default_rng(0).random((200, args.size, args.size), dtype=np.float32)
    active = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=active), record_shapes=True) as prof:
        walls = []
        for _ in range(2 + active):
            t = time.perf_counter()
            segment_volume(net, volume, device, 50, levers=levers)  # returns NumPy labels: the pass has finished
            walls.append(time.perf_counter() - t)
            prof.step()
    _print_table(prof, device, active, args.rows,
                 f"segment {args.levers} on {device}: 200 slices of {args.size} px, {args.filters} filters, batch 50")
    wall = sum(walls[2:]) / active
    print(f"wall time per recorded pass (profiler on): {wall * 1e3:.1f} ms; {200 / wall:.1f} slices/s")
    _print_convolutions(prof, device, active)
    if args.trace:
        prof.export_chrome_trace(args.trace)


def _print_convolutions(prof, device, active: int, rows: int = 12) -> None:
    """Which layers the convolutions' time belongs to: those operators, one row per input shape."""
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if "convolution" in e.key]
    by_shape.sort(key=lambda e: getattr(e, sort, 0), reverse=True)
    print("convolution operators by input shapes (input, weight, ...), time per recorded step or pass:")
    for e in by_shape[:rows]:
        print(f"  {getattr(e, sort, 0) / active / 1e3:7.2f} ms  {e.key:28s} {str(e.input_shapes)[:150]}")


def _print_table(prof, device, active: int, rows: int, title: str) -> None:
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    total = sum(getattr(e, sort, 0) for e in averages)
    print(f"{title}; {active} recorded, {total / active / 1e3:.1f} ms of "
          f"{'device' if device.type == 'cuda' else 'CPU'} time each in operators")
    print(averages.table(sort_by=sort, row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
