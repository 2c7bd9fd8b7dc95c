"""Slab allocator against PyTorch's caching allocator and raw cuMemAlloc, on the GPU.

What is timed is host time per allocate+free pair (allocation is host bookkeeping; the
device work it causes is reported apart): the slab's free also enqueues a zero-on-free
memset, which torch.empty does not do, so the device time of those memsets is measured
separately with CUDA events. Sizes: 16 KiB, 256 KiB and 2 MiB objects (KV blocks of 1, 16
and 128 tokens of a Llama-8B-shaped layer stack are in that range). Median of 5 repeats of
``N`` pairs each, after a warm-up repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
SIZES = (16 * KiB, 256 * KiB, 2 * MiB)


def per_pair_us(fn, n: int, repeats: int = 5) -> float:
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        fn(n)
        dt = (time.perf_counter() - t0) / n * 1e6
        if r:
            times.append(dt)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("-n", type=int, default=2000, help="pairs per repeat")
    a = ap.parse_args(argv)

    import torch
    from synapse.hw import driver_api as drv
    from synapse.hw.cuda_backend import CudaBackend
    from synapse.hw.slab import SlabAllocator
    from synapse.ops import Stream

    be = CudaBackend()
    rows = []
    try:
        for size in SIZES:
            mem = be.memory("bench", 256 * MiB, "device")
            slab = SlabAllocator(mem, (size,), zero_on_init=False)
            live = 64  # a working set, so frees and allocs interleave as in a cache

            def slab_pairs(n):
                held = [slab.allocate(size, "t") for _ in range(live)]
                for i in range(n):
                    slab.free(held[i % live])
                    held[i % live] = slab.allocate(size, "t")
                for h in held:
                    slab.free(h)
                be._pending_zero.clear()  # zeroing is timed below, on the device

            def torch_pairs(n):
                held = [torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(live)]
                for i in range(n):
                    held[i % live] = None
                    held[i % live] = torch.empty(size, dtype=torch.uint8, device="cuda")
                del held

            def raw_pairs(n):
                for _ in range(min(n, 200)):
                    p = drv.mem_alloc(size)
                    drv.mem_free(p)

            slab_us = per_pair_us(slab_pairs, a.n)
            torch_us = per_pair_us(torch_pairs, a.n)
            raw_us = per_pair_us(lambda n: raw_pairs(n), 200)
            # device cost of zero-on-free: one memset of ``size`` per free
            s = be.streams[Stream.H2D]
            e0, e1 = drv.event_create(), drv.event_create()
            base = mem.address(0)
            for _ in range(10):
                drv.memset_d8_async(base, 0, size, s)
            drv.event_record(e0, s)
            k = 200
            for i in range(k):
                drv.memset_d8_async(base + (i % 64) * size % (255 * MiB), 0, size, s)
            drv.event_record(e1, s)
            drv.event_synchronize(e1)
            zero_us = drv.event_elapsed_ms(e0, e1) * 1e3 / k
            rows.append({"object_bytes": size, "slab_alloc_free_us": slab_us,
                         "torch_empty_free_us": torch_us, "cuMemAlloc_free_us": raw_us,
                         "zero_on_free_device_us": zero_us})
            print(f"{size // KiB:6d} KiB  slab {slab_us:6.2f} us  torch.empty {torch_us:6.2f} us  "
                  f"cuMemAlloc+Free {raw_us:8.2f} us  (zero-on-free memset {zero_us:6.2f} us on the device)")
        env = be.environment()
    finally:
        be.close()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"environment": env, "rows": rows,
                                 "method": "host perf_counter per allocate+free pair, median of 5 "
                                           "repeats; memset device time with CUDA events"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
