"""Engine speed: the `coral bench speed` table, and how cost grows with image size and batch size.

    python benchmarks/speed_bench.py                    # the table: GPU protocol on CUDA, --quick otherwise
    python benchmarks/speed_bench.py --scaling          # also pretraining and inference over sizes and batches
    python benchmarks/speed_bench.py --scaling --sizes 64 128 256 --batches 8 16 32 --json

The table compares our engine with a baseline run like the published code (float32, eager,
augmentation slice by slice on the CPU) in the same process; see coral_core/speedbench.py.
The scaling sweep measures our engine only: pretraining slices/s for every (size, batch) pair
and inference slices/s for every size, with the FLOPs per slice, so that the growth can be read
against the growth of the work.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_core.device import resolve_device  # noqa: E402
from coral_core.levers import LEVER_VARIANTS  # noqa: E402
from coral_core.model import UNetConfig  # noqa: E402
from coral_core.speedbench import (  # noqa: E402
    SpeedConfig, format_speed_table, measure_inference, measure_pretrain, model_flops, run_speed,
)


def scaling(cfg: SpeedConfig, sizes: list[int], batches: list[int]) -> list[dict]:
    import torch

    cfg = replace(cfg, baseline=False)
    rows = []
    for size in sizes:
        train_flops = 2 * model_flops(UNetConfig(base_filters=cfg.base_filters, image_size=size), training=True)
        infer_flops = model_flops(UNetConfig(base_filters=cfg.base_filters, image_size=size, n_classes=4), training=False)
        seconds, _ = measure_inference(cfg, size)
        infer = cfg.infer_slices / seconds
        for batch in batches:
            # Each row compiles afresh (when the levers compile): without this, the first change of shape
            # makes torch.compile trace a graph for dynamic shapes, which every later row would then run.
            # On the H100 (2026-11-27) such a sweep measured 613.8 slices/s at 352 x 352, batch 64,
            # against 675.4 in a process of its own.
            torch._dynamo.reset()
            pre, _ = measure_pretrain(replace(cfg, image_size=size, pretrain_batch=batch))
            rows.append({"size": size, "batch": batch, "pretrain_slices_s": pre, "step_ms": 1000 * batch / pre,
                         "pretrain_gflop_per_slice": train_flops / 1e9, "inference_slices_s": infer,
                         "inference_gflop_per_slice": infer_flops / 1e9})
            # each row as it comes (stderr): a sweep stopped at a time limit still reports
            print("scaling: " + format_scaling(rows[-1:]).splitlines()[-1].strip(), file=sys.stderr, flush=True)
    return rows


def format_scaling(rows: list[dict]) -> str:
    head = (f"{'size':>5}{'batch':>7}{'pretrain sl/s':>15}{'step ms':>10}{'GFLOP/slice':>13}"
            f"{'infer sl/s':>12}{'GFLOP/slice':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['size']:>5}{r['batch']:>7}{r['pretrain_slices_s']:>15.1f}{r['step_ms']:>10.0f}"
                     f"{r['pretrain_gflop_per_slice']:>13.2f}{r['inference_slices_s']:>12.1f}"
                     f"{r['inference_gflop_per_slice']:>13.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="the small configuration (default off CUDA)")
    parser.add_argument("--no-table", action="store_true", help="skip the ours-vs-baseline table")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--levers", default="defaults", choices=list(LEVER_VARIANTS),
                        help="the levers of ours (default: the engine's defaults; pretraining compiles on CUDA)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    quick = args.quick or device.type != "cuda"
    levers = LEVER_VARIANTS[args.levers]
    cfg = SpeedConfig.quick(device=args.device, levers=levers) if quick else SpeedConfig(device=args.device, levers=levers)
    out = {"date": date.today().isoformat(), "machine": platform.machine(), "device": str(device)}
    if not args.no_table:
        out["table"] = run_speed(cfg, lambda text: print(text, file=sys.stderr, flush=True))
    if args.scaling:
        sizes = args.sizes or ([64, 128, 256] if quick else [128, 256, 352, 512])
        batches = args.batches or ([8, 16, 32] if quick else [32, 64, 128])
        out["scaling"] = scaling(cfg, sizes, batches)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['date']}, {out['machine']}, {device}, {'quick' if quick else 'full'} configuration")
    if "table" in out:
        print(format_speed_table(out["table"]))
    if "scaling" in out:
        print(f"\nscaling (ours, levers {args.levers}; {cfg.base_filters} base filters; "
              f"inference over {cfg.infer_slices} slices):")
        print(format_scaling(out["scaling"]))


if __name__ == "__main__":
    main()
