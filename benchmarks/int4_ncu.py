"""One INT4 quantize and one dequantize launch on 2**26 random fp16 values, for Nsight
Compute to read the hardware counters of (benchmarks/gpu_session.sh, stage ``ncu``):

    ncu --clock-control none --kernel-name regex:int4_ --section SpeedOfLight \
        python3 benchmarks/int4_ncu.py

Events time the same launches (median of 20 after warm-up) when run without ncu, so the
figure can be read next to the device copy of the same bytes.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    from synapse.hw import int4, kernels
    torch.cuda.init()
    import pycuda.driver as drv
    drv.init()
    ctx = drv.Device(torch.cuda.current_device()).retain_primary_context()
    ctx.push()
    try:
        n, g = 1 << 26, 64
        x = torch.randn(n, device="cuda", dtype=torch.float16)
        q = torch.full((int4.int4_nbytes(n, g),), 0xFF, device="cuda", dtype=torch.uint8)
        y = torch.empty_like(x)
        copy_dst = torch.empty_like(x)
        runs = {"int4_quantize": lambda: kernels.quantize_int4(x.data_ptr(), q.data_ptr(), n, g),
                "int4_dequantize": lambda: kernels.dequantize_int4(q.data_ptr(), y.data_ptr(), n, g),
                "device_copy": lambda: copy_dst.copy_(x)}
        moved = {"int4_quantize": 2 * n + q.numel(), "int4_dequantize": 2 * n + q.numel(),
                 "device_copy": 4 * n}
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
            t = statistics.median(times)
            print(f"{name:<16} {t * 1e6:8.1f} us  {moved[name] / t / 1e9:7.0f} GB/s (read+write)")
    finally:
        ctx.pop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
