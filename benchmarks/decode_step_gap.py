"""Where a full-budget TieredCache's decode step spends the time DynamicCache's does not.

    python benchmarks/decode_step_gap.py --device cuda --out $OUT/decode_step_gap.json

``hf_caches.py`` measures the decode of whole ``generate`` calls; this one splits the
difference. Every variant runs the same Qwen2-shaped model (``hf_caches.py --model
qwen2``) and prompt: a warm-up ``generate`` each, then ``--repeats`` rounds of one timed
``generate`` of every variant over the same lengths (so cuDNN's per-length plans are
built, as in ``hf_caches.py``; each round starts one variant later). Per decode step
it records the host's wall time between two logits-processor calls (the step, including
the model's one host-device synchronisation), and for a ``TieredCache`` the host time spent
inside the cache's own calls (``update`` and ``get_mask_sizes``, timed by wrapping them).

Variants:
  dynamic            transformers' DynamicCache, SDPA's own kernel choice
  dynamic_flash      the same with flash attention first (torch.nn.attention.sdpa_kernel)
  view               a minimal cache in TieredCache's layout: one preallocated token-major
                     buffer per layer, each update writes the new token and returns views
                     (no Synapse code at all): what the layout alone costs the model
  tiered_full        TieredCache, fifo, full budget, as shipped (decode steps on flash)
  tiered_full_sdpa   the same with the decode steps left to SDPA (cuDNN, built plans)
  tiered_full_nogc   tiered_full with Python's garbage collector off during generate
  tiered_h2o         TieredCache, h2o + INT4 at 25% of the prompt (``hf_caches.py``'s), its
                     prompt in chunks: what the read-through, scores and policy add
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("dynamic", "dynamic_flash", "view", "tiered_full", "tiered_full_sdpa",
            "tiered_full_nogc", "tiered_h2o")


def view_cache(cfg, device, dtype, max_tokens: int):
    """A cache that stores K and V token-major in one preallocated buffer per layer and
    returns [1, H, T, D] views, as TieredCache's L1 arena does, with nothing else."""
    import torch
    from transformers.cache_utils import Cache, CacheLayerMixin

    heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Layer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False

        def __init__(self):
            super().__init__()
            self.buf = torch.empty(2, max_tokens, heads, head_dim, device=device, dtype=dtype)
            self.n = 0

        def lazy_initialization(self, key_states, value_states):
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            q = key_states.shape[-2]
            lo, hi = self.n, self.n + q
            self.buf[0, lo:hi].copy_(key_states[0].transpose(0, 1))
            self.buf[1, lo:hi].copy_(value_states[0].transpose(0, 1))
            self.n = hi
            return (self.buf[0, :hi].transpose(0, 1).unsqueeze(0),
                    self.buf[1, :hi].transpose(0, 1).unsqueeze(0))

        def get_mask_sizes(self, query_length: int):
            return self.n + query_length, 0

        def get_seq_length(self) -> int:
            return self.n

        def get_max_length(self) -> int:
            return -1

    class ViewCache(Cache):
        def __init__(self):
            super().__init__(layers=[Layer() for _ in range(cfg.num_hidden_layers)])

        def get_mask_sizes(self, query_length, layer_idx: int = 0):
            return self.layers[layer_idx].get_mask_sizes(query_length)

    return ViewCache()


class Timed:
    """Wraps a TieredCache's update and get_mask_sizes (or ``names``) to sum the host time
    inside them."""

    def __init__(self, cache, names=("update", "get_mask_sizes"), clock=time.perf_counter):
        self.cache, self.s, self.clock = cache, 0.0, clock
        for name in names:
            inner = getattr(cache, name)
            setattr(cache, name, self._wrap(inner))

    def _wrap(self, inner):
        def call(*a, **k):
            t = self.clock()
            try:
                return inner(*a, **k)
            finally:
                self.s += self.clock() - t
        return call


def variant_runner(name, model, ids, args, cfg):
    """``once()`` for variant ``name``: one ``generate`` with its cache and settings
    (applied for that run only), returning the step hook with the run's timings."""
    import contextlib

    import torch
    from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
    from hf_caches import cache_kwarg, cache_specs
    from synapse.hf import decode_attention

    device = ids.device
    specs = cache_specs(cfg, device, ids.shape[1] + args.new_tokens, prompt=ids.shape[1])

    def make():
        if name.startswith("dynamic"):
            return DynamicCache(config=model.config), None
        if name == "view":
            return view_cache(cfg, device, model.dtype, ids.shape[1] + args.new_tokens + 16), None
        cache = specs["tiered_h2o" if name == "tiered_h2o" else "tiered_full"][1](model)
        return cache, Timed(cache)

    class Steps(LogitsProcessor):
        def __init__(self, timer):
            self.t, self.timer, self.walls, self.inside = [], timer, [], []

        def __call__(self, input_ids, scores):
            now = time.perf_counter()
            if self.t:
                self.walls.append(now - self.t[-1])
                if self.timer is not None:
                    self.inside.append(self.timer.s)
            if self.timer is not None:
                self.timer.s = 0.0
            self.t.append(now)
            return scores

    @contextlib.contextmanager
    def settings():
        orig_takes = decode_attention.takes
        if name == "tiered_full_sdpa":
            decode_attention.takes = lambda cache: False
        ctx = contextlib.nullcontext()
        if name == "dynamic_flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                               SDPBackend.MATH])
        nogc = name.endswith("_nogc")
        if nogc:
            gc.collect()
            gc.disable()
        try:
            with ctx:
                yield
        finally:
            if nogc:
                gc.enable()
            decode_attention.takes = orig_takes

    def once():
        cache, timer = make()
        hook = Steps(timer)
        kw = {cache_kwarg(): cache, "max_new_tokens": args.new_tokens, "do_sample": False,
              "logits_processor": LogitsProcessorList([hook])}
        if name == "tiered_h2o":
            kw["prefill_chunk_size"] = specs["tiered_h2o"][2]
        try:
            with settings():
                torch.cuda.synchronize(device) if device.type == "cuda" else None
                hook.tokens = model.generate(ids, **kw)[0, ids.shape[1]:].cpu()
        finally:
            if hasattr(cache, "detach"):
                cache.detach()
            del cache
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return hook
    return once


def summary(runs) -> dict:
    walls = [w for r in runs for w in r.walls]
    inside = [w for r in runs for w in r.inside]
    out = {"steps_timed": len(walls),
           "step_ms_median": 1e3 * statistics.median(walls),
           "step_ms_p10": 1e3 * sorted(walls)[len(walls) // 10],
           "step_ms_p90": 1e3 * sorted(walls)[9 * len(walls) // 10],
           "step_ms_max": 1e3 * max(walls),
           "run_decode_s": [sum(r.walls) for r in runs],
           "tokens": runs[0].tokens.tolist()}
    if inside:
        out["cache_host_ms_median"] = 1e3 * statistics.median(inside)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU checks)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {', '.join(bad)}; expected some of {', '.join(VARIANTS)}")
    import torch
    from hf_caches import build_model, make_prompt, model_config, versions
    device = torch.device(a.device)
    cfg = model_config(device.type, a.tiny, "qwen2", a.prompt_tokens + a.new_tokens)
    model = build_model(cfg, device)
    ids = make_prompt(cfg, a.prompt_tokens, device)
    res = {"benchmark": "decode_step_gap", "versions": versions(device),
           "config": {"prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                      "repeats": a.repeats, "device": device.type, "tiny": a.tiny},
           "variants": {}}
    # every variant's warm-up (the lengths the timed runs repeat), then rounds of one timed
    # run of each, each round starting one variant later: a drifting host slows all alike
    once = {name: variant_runner(name, model, ids, a, cfg) for name in names}
    for name in names:
        once[name]()
    runs = {name: [] for name in names}
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(once[name]())
    for name in names:
        r = res["variants"][name] = summary(runs[name])
        ref = res["variants"].get("dynamic")
        if ref is not None:  # the same computation? (fp16 kernels over other layouts may tip a near tie)
            same = sum(x == y for x, y in zip(r["tokens"], ref["tokens"]))
            r["tokens_same_as_dynamic"] = f"{same} of {len(ref['tokens'])}"
        extra = f", inside the cache {r['cache_host_ms_median']:.2f} ms" if "cache_host_ms_median" in r else ""
        print(f"{name:18s} step {r['step_ms_median']:6.2f} ms (p10 {r['step_ms_p10']:.2f}, "
              f"p90 {r['step_ms_p90']:.2f}, max {r['step_ms_max']:.1f}){extra}; tokens as "
              f"dynamic's: {r.get('tokens_same_as_dynamic', '-')}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
