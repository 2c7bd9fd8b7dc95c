"""How fast torch's scaled_dot_product_attention runs on the key/value layouts a KV cache
can hand it (Qwen2 shape: 16 query heads over 4 KV heads of 128), prefill and decode:
head-major contiguous (what DynamicCache's torch.cat gives), token-major views of a larger
arena (what TieredCache's planes give), and token-major without slack. CUDA events for the
device time, perf_counter for the host time per call; kernel names from torch.profiler.

    python benchmarks/sdpa_layouts.py --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    dev, dt = "cuda", torch.float16
    hq, hk, d, n = 16, 4, 128, a.tokens
    cap = n + 4096
    arena = torch.randn((2, cap, hk, d), device=dev, dtype=dt)
    layouts = {
        "head_major": lambda m: (arena[0, :m].permute(1, 0, 2).contiguous().unsqueeze(0),
                                 arena[1, :m].permute(1, 0, 2).contiguous().unsqueeze(0)),
        "token_major_view": lambda m: (arena[0, :m].permute(1, 0, 2).unsqueeze(0),
                                       arena[1, :m].permute(1, 0, 2).unsqueeze(0)),
        "token_major_tight": lambda m: (arena[0, :m].clone().permute(1, 0, 2).unsqueeze(0),
                                        arena[1, :m].clone().permute(1, 0, 2).unsqueeze(0)),
    }
    res = {"tokens": n, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def timed(fn, reps):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dev_ms, host_us = [], []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            e0.record()
            fn()
            e1.record()
            host_us.append(1e6 * (time.perf_counter() - t0))
            torch.cuda.synchronize()
            dev_ms.append(e0.elapsed_time(e1))
        return statistics.median(dev_ms), statistics.median(host_us)

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        return sorted({e.key for e in p.key_averages() if e.device_type.name == "CUDA"})[:4]

    qp = torch.randn((1, n, hq, d), device=dev, dtype=dt).transpose(1, 2)  # as the model has it
    qd = torch.randn((1, hq, 1, d), device=dev, dtype=dt)
    for name, make in layouts.items():
        k, v = make(n)
        pre = lambda: F.scaled_dot_product_attention(qp, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        dec = lambda: F.scaled_dot_product_attention(qd, k, v, enable_gqa=True)  # noqa: E731
        pm, ph = timed(pre, 5)
        dm, dh = timed(dec, 50)
        res[name] = {"prefill_ms": pm, "prefill_host_us": ph, "prefill_kernels": kernels(pre),
                     "decode_ms": dm, "decode_host_us": dh, "decode_kernels": kernels(dec),
                     "k_strides": list(k.stride())}
        print(name, json.dumps(res[name]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
