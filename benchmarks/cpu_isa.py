"""bf16 against float32 on CPUs without AMX, emulated on this one by capping its instruction sets.

    python benchmarks/cpu_isa.py                          # every ISA below, 2 rounds
    python benchmarks/cpu_isa.py --isas AVX512_CORE_BF16 --rounds 1

`Levers.cpu_bf16` is on by default only where the CPU has AMX tiles, where it was measured (about
2x). Other CPUs run float32: recent AMD CPUs (Zen 4 and 5) and Intel's Cooper Lake have AVX-512
bf16 dot products but no AMX; older Xeons have AVX-512 without bf16; most laptops AVX2. This script
runs `coral bench speed --quick --levers "defaults + float32" "defaults + cpu_bf16"` in a fresh
process per instruction set, with oneDNN (the convolutions) capped by ONEDNN_MAX_CPU_ISA and
PyTorch's own kernels (BatchNorm, activations, augmentation) by ATEN_CPU_CAPABILITY, and checks
which set oneDNN reports. It is the same silicon with some of its instructions unused, not those
CPUs: their caches, memory and clocks differ. Rounds alternate the instruction sets, so a slow
spell of the machine falls on all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY); "" leaves the machine's own
ISAS = {
    "native (AMX)": ("", ""),
    "AVX512_CORE_BF16": ("AVX512_CORE_BF16", "avx512"),
    "AVX512_CORE": ("AVX512_CORE", "avx512"),
    "AVX2": ("AVX2", "avx2"),
}
VARIANTS = ("defaults + float32", "defaults + cpu_bf16")
PROBE = """
import torch
x = torch.randn(2, 8, 16, 16)
torch.nn.Conv2d(8, 8, 3)(x)
with torch.autocast("cpu", dtype=torch.bfloat16):
    torch.nn.Conv2d(8, 8, 3)(x)
print("aten", torch.backends.cpu.get_cpu_capability())
"""


def environment(isa: str) -> dict:
    onednn, aten = ISAS[isa]
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    if onednn:
        env["ONEDNN_MAX_CPU_ISA"] = onednn
    if aten:
        env["ATEN_CPU_CAPABILITY"] = aten
    return env


def probe(isa: str) -> str:
    """What oneDNN and PyTorch's kernels report using under ``isa``."""
    out = subprocess.run([sys.executable, "-c", PROBE], env={**environment(isa), "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True, check=True).stdout
    onednn = next((line.split("isa:", 1)[1] for line in out.splitlines() if "isa:" in line), "?")
    aten = next((line.split()[1] for line in out.splitlines() if line.startswith("aten ")), "?")
    return f"oneDNN: {onednn}; PyTorch kernels: {aten}"


def measure(isa: str) -> list[dict]:
    cmd = [sys.executable, "-m", "coral_core.cli", "bench", "speed", "--quick", "--json", "--device", "cpu",
           "--levers", *VARIANTS]
    proc = subprocess.run(cmd, env=environment(isa), cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"coral bench speed under {isa} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)["rows"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", nargs="+", default=list(ISAS), choices=list(ISAS))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for isa in args.isas:
        print(f"{isa}: {probe(isa)}", flush=True)
    rows = []
    for rnd in range(args.rounds):
        for isa in args.isas:
            for r in measure(isa):
                rows.append({"isa": isa, "round": rnd + 1, **r})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    sizes = sorted({int(k.split("_")[1]) for r in rows for k in r if k.startswith("inference_") and r[k]})
    print("\n| instruction sets | round | precision | pretrain slices/s | "
          + " | ".join(f"inference slices/s @{s}" for s in sizes) + " | fine-tune s |")
    print("|---|---:|---|---:|" + "---:|" * len(sizes) + "---:|")

    def num(value, fmt):
        return "-" if value is None else fmt.format(value)

    for r in rows:
        precision = "bf16" if r["levers"].endswith("cpu_bf16") else "float32"
        print(f"| {r['isa']} | {r['round']} | {precision} | {num(r['pretrain_slices_s'], '{:.1f}')} | "
              + " | ".join(num(r.get(f"inference_{s}_slices_s"), "{:.1f}") for s in sizes)
              + f" | {num(r['finetune_s'], '{:.2f}')} |")


if __name__ == "__main__":
    main()
