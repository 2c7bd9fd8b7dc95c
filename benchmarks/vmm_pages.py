"""What the virtual-memory L1 arena costs per 2 MiB page on this GPU (synapse.kv.vmm).

Creates a pool of physical pages first (cuMemCreate, the set-up cost), then grows an
arena's live prefix page by page and shrinks it again, ``--rounds`` times: map (cuMemMap
plus one cuMemSetAccess for each run of pages mapped together) and unmap (cuMemUnmap),
per page, medians over rounds; also the raw calls one page at a time. Needs a CUDA GPU
and NVIDIA cuda-bindings.

    python benchmarks/vmm_pages.py --out $OUT/vmm_pages.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("vmm_pages.json"))
    a = ap.parse_args(argv)
    import torch
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # the primary context, current in this thread
    from synapse.kv import vmm
    drv = vmm.CudaVmm(torch.cuda.current_device())
    page = drv.page_bytes
    pool = vmm.PagePool(drv, spare_pages=a.pages)
    t0 = time.perf_counter()
    pool.fill(a.pages)
    create_us = 1e6 * (time.perf_counter() - t0) / a.pages
    arena = vmm.VmmArena(a.pages * page, 1, driver=drv, pool=pool)
    grow, shrink, step_grow = [], [], []
    for r in range(a.rounds):
        t0 = time.perf_counter()
        arena.extent(a.pages * page)          # all pages at once (one SetAccess)
        grow.append(1e6 * (time.perf_counter() - t0) / a.pages)
        arena.extent(0)
        t0 = time.perf_counter()
        arena.trim()
        shrink.append(1e6 * (time.perf_counter() - t0) / a.pages)
        t0 = time.perf_counter()
        for i in range(1, 33):                # one page at a time, as a sequence grows
            arena.extent(i * page)
        step_grow.append(1e6 * (time.perf_counter() - t0) / 32)
        arena.extent(0)
        arena.trim()
    arena.close()
    pool.close()
    res = {"benchmark": "vmm_pages", "device": torch.cuda.get_device_name(),
           "page_bytes": page, "pages": a.pages, "rounds": a.rounds,
           "create_us_per_page": create_us,
           "map_us_per_page_batch": statistics.median(grow),
           "map_us_per_page_one_by_one": statistics.median(step_grow),
           "unmap_us_per_page": statistics.median(shrink),
           "note": "map = cuMemMap + cuMemSetAccess (+ cuMemsetD8 where a page changes owner: "
                   "not here, one tenant); unmap = cuMemUnmap; pool pages created up front"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
