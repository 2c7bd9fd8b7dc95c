"""Host time and torch ops per decode step of H2O's scores (the attention mass each key
receives), per layer with ``token_mass`` against batched over the layers with
``DecodeScores``: the part of a scored ``TieredCache`` step that grows with the layers.

HF decode is host-bound on the GPU (docs/gpu-notes.md), so what counts is the ops a
step and their host time; at a few hundred keys the CPU's arithmetic is small beside
the dispatch of each op, which is what this measures (best of ``--windows`` windows of
``--steps`` steps, robust to a busy machine). Both paths give the same masses: checked
here on the measured inputs, bit for bit on the CPU.

    python benchmarks/decode_scores_host.py --layers 16 --out $OUT/decode_scores_host.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--query-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--keys", type=int, default=256, help="keys a layer attends to")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=200, help="decode steps per window")
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    if min(a.layers, a.kv_heads, a.query_heads, a.head_dim, a.keys, a.steps, a.windows) < 1:
        ap.error("every count must be at least 1")
    if a.query_heads % a.kv_heads:
        ap.error(f"--query-heads {a.query_heads} must be a multiple of --kv-heads {a.kv_heads}")
    import torch
    from torch.overrides import TorchFunctionMode
    from synapse.hf.scores import DecodeScores, token_mass
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    dev = torch.device(a.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(1, a.query_heads, 1, a.head_dim, generator=g).to(dev, dtype)
          for _ in range(a.layers)]
    ks = [torch.randn(1, a.keys, a.kv_heads, a.head_dim, generator=g).to(dev, dtype)
          .permute(0, 2, 1, 3) for _ in range(a.layers)]  # head-major views, as the planes
    s = a.head_dim ** -0.5
    past = a.keys - 1

    def per_layer():
        total = None
        for q, k in zip(qs, ks):
            t = token_mass(q, k, s, past)
            total = t if total is None else total.add_(t)
        return total

    scores = DecodeScores(a.layers)

    def batched():
        for i, (q, k) in enumerate(zip(qs, ks)):
            scores.add(i, q, k, s)
        total = None
        for t in scores.finish():
            total = t if total is None else total.add_(t)
        return total

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") != "__get__":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    res = {"benchmark": "decode_scores_host", "device": a.device, "layers": a.layers,
           "kv_heads": a.kv_heads, "query_heads": a.query_heads, "head_dim": a.head_dim,
           "keys": a.keys, "steps": a.steps, "windows": a.windows,
           "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
        want, got = per_layer(), batched()
        res["same_bits"] = bool(torch.equal(want, got))
        res["max_abs_diff"] = float((want - got).abs().max())
        for name, fn in (("per_layer", per_layer), ("batched", batched)):
            Count.n = 0
            with Count():
                fn()
            best = float("inf")
            for _ in range(a.windows):
                sync()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    fn()
                sync()
                best = min(best, (time.perf_counter() - t0) / a.steps)
            res[name] = {"ops_per_step": Count.n, "host_ms_per_step_best": best * 1e3}
            print(f"{name:9s}: {Count.n:4d} torch ops a step, {best * 1e3:.3f} ms a step "
                  f"({a.layers} layers, {a.keys} keys; best of {a.windows} x {a.steps})")
    print(f"same masses: {res['same_bits']} (max |diff| {res['max_abs_diff']:.3g})")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
