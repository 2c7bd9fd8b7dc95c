"""TieredCache's own host time per decode step, without a model: ``update`` for every layer
with one new token, after a prefill, on the CPU (fifo, full budget: nothing moves).

HF decoding is host-bound on the GPU, so the cache's Python and torch-op overhead per step
is what it adds to ``DynamicCache``'s step; this measures just that part, best of
``--windows`` windows of ``--steps`` steps (robust to a busy machine).

``--part scores``: the scores a scored policy (h2o, lru) adds to a decode step, the
attention mass each key receives, per layer with ``token_mass`` against batched over the
layers with ``DecodeScores`` (as TieredCache runs them), in torch ops and host time a
step over ``--keys`` keys (a few hundred: the CPU's arithmetic small beside each op's
dispatch); both give the same masses, checked on the measured inputs.

    python benchmarks/cache_step_host.py --layers 16 --out $OUT/cache_step_host.json
    python benchmarks/cache_step_host.py --part scores --out $OUT/scores_step_host.json
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
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200, help="decode steps per window")
    ap.add_argument("--windows", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--part", choices=("cache", "scores"), default="cache",
                    help="cache: a fifo cache's update; scores: h2o's masses, two ways")
    ap.add_argument("--query-heads", type=int, default=16, help="--part scores")
    ap.add_argument("--keys", type=int, default=256, help="--part scores: keys a layer sees")
    a = ap.parse_args(argv)
    if min(a.layers, a.kv_heads, a.head_dim, a.prompt_tokens, a.steps, a.windows,
           a.query_heads, a.keys) < 1:
        ap.error("every count must be at least 1")
    if a.part == "scores":
        if a.query_heads % a.kv_heads:
            ap.error(f"--query-heads {a.query_heads} must be a multiple of --kv-heads "
                     f"{a.kv_heads}")
        return write(scores_host(a), a.out)
    import torch
    from transformers import LlamaConfig
    from synapse.hf import TieredCache
    cfg = LlamaConfig(vocab_size=128, hidden_size=a.kv_heads * a.head_dim,
                      intermediate_size=64, num_hidden_layers=a.layers,
                      num_attention_heads=a.kv_heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim)
    tokens = a.prompt_tokens + a.steps * a.windows
    cache = TieredCache(cfg, policy="fifo", demote="l2", block_tokens=16,
                        l1_budget_tokens=-(-tokens // 16) * 32)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, a.kv_heads, a.prompt_tokens, a.head_dim, generator=g)
    one = torch.randn(1, a.kv_heads, 1, a.head_dim, generator=g)
    def step():
        cache.mask_sizes(1)  # as the model's mask creation calls it, once a step
        for layer in range(a.layers):
            cache.update(one, one, layer)
    with torch.no_grad():
        for layer in range(a.layers):
            cache.update(prompt, prompt, layer)
        best = best_per_step(step, a.steps, a.windows)
    res = {"benchmark": "cache_step_host", "layers": a.layers, "kv_heads": a.kv_heads,
           "head_dim": a.head_dim, "prompt_tokens": a.prompt_tokens, "steps": a.steps,
           "windows": a.windows, "torch_threads": torch.get_num_threads(),
           "host_s_per_step_best": best, "tokens_at_end": cache.seen_tokens}
    print(f"{a.layers} layers: {best * 1e6:.1f} us of host time per decode step "
          f"(best of {a.windows} windows of {a.steps} steps)")
    return write(res, a.out)


def write(res: dict, out: Path | None) -> int:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def best_per_step(fn, steps: int, windows: int) -> float:
    best = float("inf")
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def scores_host(a) -> dict:
    import torch
    from torch.overrides import TorchFunctionMode
    from synapse.hf.scores import DecodeScores, token_mass
    g = torch.Generator().manual_seed(0)
    qs = [torch.randn(1, a.query_heads, 1, a.head_dim, generator=g) for _ in range(a.layers)]
    ks = [torch.randn(1, a.keys, a.kv_heads, a.head_dim, generator=g).permute(0, 2, 1, 3)
          for _ in range(a.layers)]  # head-major views of token-major keys, as the planes
    s, past = a.head_dim ** -0.5, a.keys - 1
    scores = DecodeScores(a.layers)

    def per_layer():
        masses = [token_mass(q, k, s, past) for q, k in zip(qs, ks)]
        return add_in_order(masses)

    def batched():
        for i, (q, k) in enumerate(zip(qs, ks)):
            scores.add(i, q, k, s)
        return add_in_order(scores.finish())

    def add_in_order(masses):  # as TieredCache._add_mass sums a step's layers
        total = masses[0]
        for m in masses[1:]:
            total = total.add_(m)
        return total

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") != "__get__":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    res = {"benchmark": "cache_step_host", "part": "scores", "layers": a.layers,
           "kv_heads": a.kv_heads, "query_heads": a.query_heads, "head_dim": a.head_dim,
           "keys": a.keys, "steps": a.steps, "windows": a.windows,
           "torch_threads": torch.get_num_threads()}
    with torch.no_grad():
        want, got = per_layer(), batched()
        res["same_bits"] = bool(torch.equal(want, got))
        for name, fn in (("per_layer", per_layer), ("batched", batched)):
            Count.n = 0
            with Count():
                fn()
            best = best_per_step(fn, a.steps, a.windows)
            res[name] = {"ops_per_step": Count.n, "host_s_per_step_best": best}
            print(f"{name:9s}: {Count.n:4d} torch ops a step, {best * 1e3:.3f} ms a step "
                  f"({a.layers} layers, {a.keys} keys; best of {a.windows} x {a.steps})")
    print(f"the same masses, bit for bit: {res['same_bits']}")
    return res


if __name__ == "__main__":
    sys.exit(main())
