"""One layer's attention of new tokens over a cached prefix, per kernel, on the GPU: what
``synapse.hf.prefix_attention`` chooses between, timed at the prefix-reuse benchmark's
shapes (Llama-3-8B: 32 query heads, 8 key heads, head size 128; 2,048 new tokens over
30,720 cached, fp16).

- ``mask``: transformers' ``sdpa`` path, SDPA with an explicit ``[N, P + N]`` mask;
- ``bias``: SDPA with torch's bottom-right causal bias (the memory-efficient kernel; the
  key heads widened to the query heads with ``repeat_kv`` first, as it needs);
- ``split-flash`` / ``split-cudnn``: ``split_attention`` with that kernel (two calls
  merged by log-sum-exp);
- ``full-prefill``: for scale, SDPA ``is_causal`` over all P + N tokens as queries (the
  recompute's attention per layer).

Each is timed with CUDA events (median of ``--repeats`` after two warm-ups) and checked
against ``mask`` (max absolute difference).

    python benchmarks/prefix_attention_kernels.py --out $OUT/prefix_attention_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", type=int, default=2048, help="new tokens (queries)")
    ap.add_argument("--prefix", type=int, default=30720, help="cached tokens")
    ap.add_argument("--heads", type=int, default=32, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads")
    ap.add_argument("--head-dim", type=int, default=128, help="head size")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per kernel")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("prefix_attention_kernels.py: needs a CUDA device", file=sys.stderr)
        raise SystemExit(2)
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from synapse.hf.prefix_attention import split_attention

    dev, dt = torch.device("cuda"), torch.float16
    g = torch.Generator(device=dev).manual_seed(0)
    n, p, h, hk, d = a.new, a.prefix, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(1, h, n, d, device=dev, dtype=dt, generator=g)
    k, v = (torch.randn(1, hk, p + n, d, device=dev, dtype=dt, generator=g) for _ in range(2))
    mask = causal_lower_right(n, p + n)._materialize(dev)
    full_q = torch.randn(1, h, p + n, d, device=dev, dtype=dt, generator=g)

    def wide(t):
        return t.repeat_interleave(h // hk, dim=1)

    cases = {
        "mask": lambda: sdpa(q, wide(k), wide(v), attn_mask=mask),
        "bias": lambda: sdpa(q, wide(k), wide(v), attn_mask=causal_lower_right(n, p + n)),
        "split-flash": lambda: split_attention(q, k, v, p, kernels=("flash",)),
        "split-cudnn": lambda: split_attention(q, k, v, p, kernels=("cudnn",)),
        "full-prefill": lambda: sdpa(full_q, wide(k), wide(v), is_causal=True),
    }
    ref = cases["mask"]().float()
    results = {"shape": {"new": n, "prefix": p, "heads": h, "kv_heads": hk, "head_dim": d,
                         "dtype": "float16"}, "device": torch.cuda.get_device_name(dev),
               "torch": torch.__version__, "kernels": {}}
    for name, fn in cases.items():
        out = fn()
        if out is None:
            results["kernels"][name] = {"status": "refused"}
            print(f"{name:>13}: refused")
            continue
        times = []
        for i in range(a.repeats + 2):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            if i >= 2:
                times.append(s.elapsed_time(e))
        err = None if name == "full-prefill" else float((out.float() - ref).abs().max())
        results["kernels"][name] = {"ms": statistics.median(times), "max_abs_diff_vs_mask": err}
        print(f"{name:>13}: {statistics.median(times):8.3f} ms"
              + ("" if err is None else f", max |diff| vs mask {err:.2e}"))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
