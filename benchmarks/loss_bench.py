"""CORAL loss: forward+backward time and peak memory, direct O(N^3) form vs coral_core.

    python benchmarks/loss_bench.py                       # this CPU, D = 512 and the CPU targets
    python benchmarks/loss_bench.py --device cuda         # a GPU
    python benchmarks/loss_bench.py --sizes 64 256 --dim 128 --json

Every case (implementation, N, D) runs in a fresh child process, so its peak memory is its
own: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs, on CPU the growth of peak
resident memory (ru_maxrss) above the inputs. Time is the median of ``--repeats`` timed
forward+backward passes after one warm-up (CUDA: synchronised, events). The direct form is
``tests/direct_losses.py`` (RAL + OAL exactly as LOSSES.md writes them), which is what the
published code computes; it runs only while it fits (``--direct-max``, or until it runs out
of memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _positions(n: int, generator):
    """Slices of 12-slice volumes, as a pretraining batch has them: many exact ties."""
    import torch

    return (torch.randint(0, 12, (n,), generator=generator) + 1).float() / 12


def run_case(impl: str, n: int, dim: int, device: str, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from direct_losses import oal_direct, ral_direct

    from coral_core.losses import CoralLoss

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, dim, generator=g).to(device).requires_grad_(True)
    p = _positions(n, g).to(device)
    coral = CoralLoss(dim).to(device)
    if impl == "direct":
        def step():
            return ral_direct(z, p) + oal_direct(z, p, coral.direction)
    else:
        def step():
            return coral(z, p).total

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for i in range(repeats + 1):
        z.grad = None
        coral.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        step().backward()
        sync()
        if i > 0:  # the first pass is the warm-up
            times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "n": n, "dim": dim, "ms": 1e3 * statistics.median(times), "peak_gb": peak / 1e9}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(impl: str, n: int, dim: int, device: str, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, str(n), str(dim), "--device", device, "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "dim": dim, "error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        reason = "out of memory" if "out of memory" in proc.stderr.lower() or proc.returncode < 0 else last
        return {"impl": impl, "n": n, "dim": dim, "error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 384, 1024, 4096, 16384])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--extra", nargs="*", default=["8192x256"], help="extra NxD cases for ours")
    ap.add_argument("--direct-max", type=int, default=None, help="largest N for the direct form")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.case:
        impl, n, dim = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(impl, n, dim, args.device, args.repeats)))
        return 0

    direct_max = args.direct_max or (512 if args.device == "cpu" else 1 << 30)
    cases = [("direct", n, args.dim) for n in args.sizes if n <= direct_max]
    cases += [("ours", n, args.dim) for n in args.sizes]
    for spec in args.extra:
        n, d = (int(x) for x in spec.lower().split("x"))
        cases.append(("ours", n, d))
    rows, direct_failed = [], False
    for impl, n, dim in cases:
        if impl == "direct" and direct_failed:
            continue
        repeats = args.repeats if n <= 4096 else max(1, args.repeats // 2)
        row = _child(impl, n, dim, args.device, repeats, args.timeout)
        direct_failed |= impl == "direct" and "error" in row
        rows.append(row)
        if not args.json:
            print(_format_row(row), flush=True)
    info = {"device": device_name(args.device), "date": date.today().isoformat(), "torch": _torch_version()}
    if args.json:
        print(json.dumps({"rows": rows, "config": vars(args) | info}))
    else:
        print()
        print(f"device: {info['device']}   torch {info['torch']}   {info['date']}")
        print(_table(rows))
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


def _format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['impl']:>6}  N={row['n']:>6}  D={row['dim']:>4}  {row['error']}"
    return f"{row['impl']:>6}  N={row['n']:>6}  D={row['dim']:>4}  {row['ms']:10.2f} ms  {row['peak_gb']:7.3f} GB"


def _table(rows: list[dict]) -> str:
    """Markdown table: one line per (N, D), direct and ours side by side, with the speed-up."""
    keyed = {(r["impl"], r["n"], r["dim"]): r for r in rows}
    lines = [
        "| N | D | direct ms | direct GB | ours ms | ours GB | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, dim in sorted({(r["n"], r["dim"]) for r in rows}):
        direct, ours = keyed.get(("direct", n, dim)), keyed.get(("ours", n, dim))

        def cell(r, key, fmt):
            if r is None:
                return "not run"
            return r["error"] if "error" in r else format(r[key], fmt)

        speedup = "-"
        if direct and ours and "error" not in direct and "error" not in ours:
            speedup = f"{direct['ms'] / ours['ms']:.1f}x"
        lines.append(
            f"| {n} | {dim} | {cell(direct, 'ms', '.2f')} | {cell(direct, 'peak_gb', '.3f')} "
            f"| {cell(ours, 'ms', '.2f')} | {cell(ours, 'peak_gb', '.3f')} | {speedup} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
