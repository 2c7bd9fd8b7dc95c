"""TieredCache's own host time per decode step, without a model: ``update`` for every layer
with one new token, after a prefill, on the CPU (fifo, full budget: nothing moves).

HF decoding is host-bound on the GPU, so the cache's Python and torch-op overhead per step
is what it adds to ``DynamicCache``'s step; this measures just that part, best of
``--windows`` windows of ``--steps`` steps (robust to a busy machine).

    python benchmarks/cache_step_host.py --layers 16 --out $OUT/cache_step_host.json
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
    a = ap.parse_args(argv)
    if min(a.layers, a.kv_heads, a.head_dim, a.prompt_tokens, a.steps, a.windows) < 1:
        ap.error("every count must be at least 1")
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
    best = float("inf")
    with torch.no_grad():
        for layer in range(a.layers):
            cache.update(prompt, prompt, layer)
        for _ in range(a.windows):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                cache.mask_sizes(1)  # as the model's mask creation calls it, once a step
                for layer in range(a.layers):
                    cache.update(one, one, layer)
            best = min(best, (time.perf_counter() - t0) / a.steps)
    res = {"benchmark": "cache_step_host", "layers": a.layers, "kv_heads": a.kv_heads,
           "head_dim": a.head_dim, "prompt_tokens": a.prompt_tokens, "steps": a.steps,
           "windows": a.windows, "torch_threads": torch.get_num_threads(),
           "host_s_per_step_best": best, "tokens_at_end": cache.seen_tokens}
    print(f"{a.layers} layers: {best * 1e6:.1f} us of host time per decode step "
          f"(best of {a.windows} windows of {a.steps} steps)")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
