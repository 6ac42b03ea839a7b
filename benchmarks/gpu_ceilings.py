"""The two ceilings of the GPU at hand, measured: a large bf16 matrix product (FLOP/s) and a
large device-to-device copy (bytes read + written per second). MFU in docs/performance.md is
given against the data sheet's peak and against the first of these.

    python benchmarks/gpu_ceilings.py            # needs CUDA
"""

from __future__ import annotations

import json
import statistics

import torch


def _median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/gpu_ceilings.py needs a CUDA GPU")
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    # random operands, rotated among three sets: zeros run faster than real data
    mats = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
    k = iter(range(10**9))

    def matmul():
        i = next(k) % 3
        return mats[i] @ mats[i + 1]

    mm_ms = _median_ms(matmul)
    src = torch.randn(256 * 2**20, device="cuda", generator=g)  # 1 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "bf16_matmul_tflops": 2 * n**3 / (mm_ms / 1e3) / 1e12,
           "copy_gb_s": 2 * src.numel() * 4 / (copy_ms / 1e3) / 1e9}
    print(json.dumps(out))
    print(f"bf16 matmul {n}^3: {out['bf16_matmul_tflops']:.0f} TFLOP/s; device copy: {out['copy_gb_s']:.0f} GB/s "
          f"(read + write)")


if __name__ == "__main__":
    main()
