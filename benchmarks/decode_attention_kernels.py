"""One decode step's attention (one query) per SDPA kernel, host and device time, on the GPU.

A decode step is host-bound at these sizes: what the attention call costs the host can
matter more than what it costs the device. This times ``scaled_dot_product_attention``
for one query over ``--keys`` keys at the Qwen2 shape of ``hf_caches.py`` (16 query
heads, 4 key heads, head size 128, fp16), with the keys laid out as ``DynamicCache``
holds them (``[1, heads, keys, dim]`` contiguous) and as ``TieredCache`` returns them
from its arena (token-major ``[keys, heads, dim]`` permuted to that shape), per backend
that takes the inputs (``SDPBackend`` forced with ``sdpa_kernel``) and with SDPA's own
choice. The key count grows by one every call, as in a decode step, so a kernel whose
plans are cached per shape pays for a new plan each time.

On the H200 (torch 2.11) SDPA's own choice for these inputs (``enable_gqa=True``, no
mask) was the math kernel, 52-67 ms a call, while the models' decode steps in
``profile_hf_step.py`` ran cuDNN: only the forced rows compare kernels.

Host time: wall time of the call on the host (median), the device not waited for.
Device time: CUDA events around each call (median). Grouped-query attention is given
as ``enable_gqa=True`` (no ``repeat_kv``).

    python benchmarks/decode_attention_kernels.py --out $OUT/decode_attention_kernels.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=32768, help="keys at the first call")
    ap.add_argument("--heads", type=int, default=16, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    ap.add_argument("--head-dim", type=int, default=128, help="head size")
    ap.add_argument("--calls", type=int, default=64, help="timed calls per case (keys +1 each)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("decode_attention_kernels.py: needs a CUDA device", file=sys.stderr)
        raise SystemExit(2)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev, dt = torch.device("cuda"), torch.float16
    h, hk, d, n0 = a.heads, a.kv_heads, a.head_dim, a.keys
    total = n0 + a.calls + 8
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, h, 1, d, device=dev, dtype=dt, generator=g)
    head_major = torch.randn(2, 1, hk, total, d, device=dev, dtype=dt, generator=g)
    token_major = head_major.permute(0, 1, 3, 2, 4).contiguous()  # [2, 1, tokens, heads, dim]

    def keys(layout, n):
        if layout == "contiguous":
            return head_major[0, :, :, :n], head_major[1, :, :, :n]
        return (token_major[0, :, :n].permute(0, 2, 1, 3), token_major[1, :, :n].permute(0, 2, 1, 3))

    backends = {"sdpa_choice": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    ref = sdpa(q, *keys("contiguous", n0), enable_gqa=True)
    out: dict = {"shape": {"heads": h, "kv_heads": hk, "head_dim": d, "keys_first": n0,
                           "calls": a.calls}, "device": torch.cuda.get_device_name(dev),
                 "torch": torch.__version__, "cases": {}}
    for layout in ("contiguous", "arena_view"):
        for name, be in backends.items():
            ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
            try:
                with ctx:
                    for i in range(3):  # warm-up (the first plan, the module load)
                        sdpa(q, *keys(layout, n0 - 8 + i), enable_gqa=True)
                    torch.cuda.synchronize()
                    host, dev_ms = [], []
                    for i in range(a.calls):
                        k, v = keys(layout, n0 + i)
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        t0 = time.perf_counter()
                        o = sdpa(q, k, v, enable_gqa=True)
                        host.append(time.perf_counter() - t0)
                        e1.record()
                        torch.cuda.synchronize()
                        dev_ms.append(e0.elapsed_time(e1))
                        if i == 0:
                            first = o
            except RuntimeError as e:
                out["cases"][f"{layout}/{name}"] = {"refused": str(e).splitlines()[0][:200]}
                print(f"{layout:11s} {name:12s} refused: {str(e).splitlines()[0][:100]}")
                continue
            err = float((first.float() - ref.float()).abs().max())
            r = {"host_us_median": statistics.median(host) * 1e6,
                 "device_us_median": statistics.median(dev_ms) * 1e3, "max_abs_diff": err}
            out["cases"][f"{layout}/{name}"] = r
            print(f"{layout:11s} {name:12s} host {r['host_us_median']:8.1f} us  device "
                  f"{r['device_us_median']:8.1f} us  |diff| {err:.1e}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
