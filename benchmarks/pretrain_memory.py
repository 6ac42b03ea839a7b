"""Peak memory of reading a pretraining cohort: every full-resolution volume first, then the
slice set (how `coral pretrain` read its inputs until 2026-11-27), against preparing each
volume as it is read and freeing it once copied into the slice set (how it reads them now:
`coral_core.cli._read_inputs`, then `PretrainSlices(..., consume=True)`).

    python benchmarks/pretrain_memory.py                       # 8 volumes of 100 x 512 x 512 int16, size 256
    python benchmarks/pretrain_memory.py --volumes 4 --slices 50
    python benchmarks/pretrain_memory.py --quality             # float16 slices: the same pretraining?

A third way holds the slices in float16 (`coral pretrain --slices-float16`). Two more keep them in a
file (`coral pretrain --slice-cache FILE.npy`): the first run writes it as it reads the volumes, a
later run maps it without reading any volume. After building, each way reads every slice once, as
an epoch does; the table gives the process's own (anonymous) resident memory then, and the mapped
file pages, which the kernel can drop and read back when memory is short. `--quality` checks what
that costs: CORAL pretraining as `coral demo` does it (16 + 2 phantom subjects, 6 epochs), once
from float32 and once from float16 slices, scored by the final loss and the ordinal consistency
of 8 unseen subjects along the learned direction.

Writes the volumes as uncompressed NIfTI (int16, as CT scans are stored) in a temporary folder;
each way runs in a fresh process and reports its peak resident memory (ru_maxrss) and time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quality(seed: int = 0) -> None:
    import numpy as np
    import torch

    from coral_core.data import PretrainSlices, slice_positions
    from coral_core.embedding import ordinal_consistency
    from coral_core.infer import embed_volume
    from coral_core.levers import Levers
    from coral_core.model import UNetConfig
    from coral_core.phantom import make_cohort, make_phantom
    from coral_core.pretrain import PretrainConfig, pretrain

    volumes = [image.array for image, _ in make_cohort(16, seed=seed * 100) + make_cohort(2, seed=seed * 100 + 1000)]
    unseen = [make_phantom(s)[0].array for s in (0, 1, 2, 3, 4, 5, 777, 4242)]
    print("| slices | final loss | consistency mean | min | seconds |")
    print("|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.float16):
        cfg = PretrainConfig(method="coral", epochs=6, seed=seed, device="cpu", model=UNetConfig(image_size=128),
                             levers=Levers(cpu_bf16=False))  # float32 compute, as measured in docs/performance.md
        t = time.perf_counter()
        result = pretrain(cfg, PretrainSlices(volumes, 128, dtype=dtype))
        seconds = time.perf_counter() - t
        direction = result.model.canonical_direction.numpy()
        scores = [ordinal_consistency(embed_volume(result.model, v) @ direction, slice_positions(len(v)).numpy())
                  for v in unseen]
        print(f"| {str(dtype).replace('torch.', '')} | {result.history.last('loss'):.4f} | {np.mean(scores):.3f} "
              f"| {np.min(scores):.3f} | {seconds:.0f} |", flush=True)


def _resident_gb() -> dict:
    """The process's resident memory now, anonymous (its own) and file-backed (mapped files,
    which the kernel can drop and read back), from Linux's /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) * 1024 / 1e9 for key, name in (("anon_gb", "RssAnon"), ("file_gb", "RssFile"))}


def measure(way: str, folder: str, size: int, cache_folder: str) -> dict:
    import torch

    from coral_core import slicecache
    from coral_core.cli import _read_inputs
    from coral_core.data import PretrainSlices, discover_volumes
    from coral_core.volume import load_volume

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # torch and the readers loaded
    t = time.perf_counter()
    if way == "all first":  # as `coral pretrain` did before (which also built the slice set twice over, now once)
        volumes = [load_volume(case.image).array for case in discover_volumes([folder])]
        data = PretrainSlices(volumes, size)
    elif way.startswith("slice cache"):  # `coral pretrain --slice-cache`: the first run writes it, later ones map it
        cache = Path(cache_folder) / "slices.npy"
        key = slicecache.cache_key([case.image for case in discover_volumes([folder])], 0, 0, size, "float32")
        if way == "slice cache, written":
            volumes, names, shapes, size = _read_inputs([folder], 0, 0, size)
            slicecache.write_cache(cache, key, volumes, size, names, shapes)
        data, _ = slicecache.open_cache(cache, key)
    else:  # as `coral pretrain` does now, without and with --slices-float16
        volumes, _, _, size = _read_inputs([folder], 0, 0, size)
        dtype = torch.float16 if way == "as read, float16" else torch.float32
        data = PretrainSlices(volumes, size, consume=True, dtype=dtype)
    seconds = time.perf_counter() - t
    for start in range(0, len(data), 256):  # read every slice once, as an epoch of pretraining does
        float(data.images[start : start + 256].float().sum())
    return {"way": way, "slices": len(data), "slice_set_gb": data.images.numel() * data.images.element_size() / 1e9,
            "imported_gb": imported, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "seconds": seconds, **_resident_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--size", type=int, default=256, help="the model's input size (--image-size)")
    ap.add_argument("--quality", action="store_true", help="float16 slices against float32: the same pretraining?")
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quality:
        quality()
        return
    if args.case:
        print(json.dumps(measure(args.case[0], args.case[1], int(args.case[2]), args.case[3])))
        return

    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache_folder:
        rng = np.random.default_rng(0)
        for i in range(args.volumes):
            data = rng.integers(-1000, 2000, (args.side, args.side, args.slices), dtype=np.int16)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(Path(folder) / f"case{i:03d}.nii"))
        raw_gb = args.volumes * args.slices * args.side**2 * 2 / 1e9
        print(f"{args.volumes} volumes of {args.slices} x {args.side} x {args.side} int16 ({raw_gb:.2f} GB on disk), "
              f"model input {args.size} x {args.size}")
        print("| way | slices | slice set GB | RSS after imports GB | peak RSS GB | after an epoch: own GB "
              "| mapped files GB | seconds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for way in ("all first", "as read", "as read, float16", "slice cache, written", "slice cache, reused"):
            out = subprocess.run([sys.executable, __file__, "--case", way, folder, str(args.size), cache_folder],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {r['way']} | {r['slices']} | {r['slice_set_gb']:.2f} | {r['imported_gb']:.2f} | {r['peak_gb']:.2f} "
                  f"| {r['anon_gb']:.2f} | {r['file_gb']:.2f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
