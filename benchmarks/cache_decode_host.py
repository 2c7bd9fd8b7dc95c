"""TieredCache's own host time and torch ops per decode step, with the model calling it.

    python benchmarks/cache_decode_host.py --out $OUT/cache_decode_host.json

``hf_caches.py``'s two TieredCache configurations (``tiered_full``: fifo, everything in
L1; ``tiered_h2o``: h2o, 25% of the prompt in L1, INT4 in L2 read through every step)
on a model of its Qwen2 shape where the cache sees it (16 layers, 16 query heads, 4 KV
heads of 128), narrow elsewhere (``--hidden``) so the CPU's model arithmetic stays small
beside the cache's dispatch. The decode steps are fed as ``generate`` feeds them (the
mask grows by one). Per step it sums the host time inside the cache's calls (``update``,
``get_mask_sizes``, timed by wrapping them): median over the steps of each of
``--repeats`` runs, then the median of those; and, in one more run under torch.profiler,
the top-level torch ops those calls dispatch (``cache_ops``) and all top-level ops of the
step (``step_ops``, the model's included). Step wall times are printed too, with
DynamicCache's for reference (``--with-dynamic``). On the CPU, so the figures are the
cache's Python and dispatch (``--clock thread``, the default: this thread's CPU time, so
other processes on a shared machine do not count), with a little CPU arithmetic (the INT4
dequantization, the scores) that the GPU does not spend on the host; hence a short
prompt by default (256 tokens): what is measured is dispatch, not arithmetic. The tokens
of each cache are kept in the JSON (a change to the cache must leave them as they were).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CALLS = ("update", "get_mask_sizes")
MARK = "synapse_cache_call"
# where the time inside goes: the step's start (the last step's settle, admission,
# layout: once a step) and the L2 read-through (per layer; on CUDA in fp16 one fused
# kernel, here torch ops that dequantize: the CPU's arithmetic, mostly)
PARTS = ("_begin_step", "_read_through")


def mark_calls(cache, torch, names=CALLS):
    """Wraps the cache's calls in a profiler range, so ``count_ops`` finds their ops."""
    for name in names:
        inner = getattr(cache, name)

        def call(*a, _inner=inner, **k):
            with torch.profiler.record_function(MARK):
                return _inner(*a, **k)
        setattr(cache, name, call)


def count_ops(prof, steps: int) -> tuple[float, float]:
    """(top-level ops inside the cache's calls, top-level ops of the step) per step."""
    inside = top = 0
    for e in prof.events():
        if e.device_type.name != "CPU" or e.name == MARK:
            continue
        p = e.cpu_parent
        if p is None:
            top += 1
        elif p.name == MARK:
            inside += 1
            top += 1 if p.cpu_parent is None else 0
    return inside / steps, top / steps


def model_config(a):
    from hf_caches import model_config as hf_config
    cfg = hf_config("cuda", False, "qwen2", a.prompt_tokens + a.steps + 2)
    # the cache's shape as hf_caches.py's; the rest narrow (head_dim given, so hidden
    # need not be heads x head_dim)
    cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size = a.hidden, a.hidden, 512
    cfg.head_dim = 128
    cfg.num_hidden_layers = a.layers
    cfg.layer_types = ["full_attention"] * a.layers
    return cfg


def run_once(name, model, ids, a, make, chunk, profile: bool):
    import torch
    cache = make(model) if make is not None else None
    if cache is None:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
    timer = parts = None
    if make is not None and not profile:
        from decode_step_gap import Timed
        clock = time.thread_time if a.clock == "thread" else time.perf_counter
        timer = Timed(cache, CALLS, clock)
        parts = {k: Timed(cache, (k,), clock) for k in PARTS}
    pre = {"prefill_chunk_size": chunk} if chunk else {}
    model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False, **pre)
    nxt = ids[:, -1:]
    mask = torch.ones((1, ids.shape[1] + 1), dtype=torch.long)
    inside, walls, tokens, split = [], [], [], {k: [] for k in PARTS}

    def step(nxt, mask):
        mask = torch.cat((mask, mask.new_ones((1, 1))), dim=1)
        out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1), mask
    ops = None
    if profile:
        from torch.profiler import ProfilerActivity
        mark_calls(cache, torch)
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                nxt, mask = step(nxt, mask)
        ops = count_ops(prof, a.steps)
    else:
        for _ in range(a.steps):
            for x in [timer, *(parts or {}).values()]:
                if x is not None:
                    x.s = 0.0
            t = time.perf_counter()
            nxt, mask = step(nxt, mask)
            walls.append(time.perf_counter() - t)
            if timer is not None:
                inside.append(timer.s)
                for k, x in parts.items():
                    split[k].append(x.s)
            tokens.append(int(nxt))
    if hasattr(cache, "detach"):
        cache.detach()
    return inside, walls, tokens, ops, split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40, help="decode steps a run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256, help="the model's width outside attention")
    ap.add_argument("--caches", default="tiered_full,tiered_h2o")
    ap.add_argument("--with-dynamic", action="store_true", help="DynamicCache's step wall too")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="the cache's time: this thread's CPU time (robust to a shared "
                         "machine's other processes) or wall time")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    small = [f"--{k.replace('_', '-')} {v}" for k, v in (("prompt_tokens", a.prompt_tokens),
             ("steps", a.steps), ("repeats", a.repeats), ("layers", a.layers),
             ("hidden", a.hidden)) if v < 1]
    if small:
        ap.error(f"{', '.join(small)}: each must be 1 or more")
    import torch
    from hf_caches import build_model, cache_specs, make_prompt
    device = torch.device("cpu")
    cfg = model_config(a)
    model = build_model(cfg, device)
    ids = make_prompt(cfg, a.prompt_tokens, device)
    specs = cache_specs(cfg, device, a.prompt_tokens + a.steps + 2, prompt=a.prompt_tokens)
    names = [n for n in a.caches.split(",") if n] + (["dynamic"] if a.with_dynamic else [])
    unknown = [n for n in names if n not in specs]
    if unknown or not names:
        ap.error(f"--caches: unknown {', '.join(unknown) or 'empty list'}; expected some of "
                 f"{', '.join(s for s in specs if s.startswith('tiered'))}")
    res = {"benchmark": "cache_decode_host", "config": vars(a) | {"out": None},
           "torch_threads": torch.get_num_threads(), "caches": {}}
    with torch.no_grad():
        for name in names:
            make, chunk = (None, None) if name == "dynamic" else (specs[name][1], specs[name][2])
            run_once(name, model, ids, a, make, chunk, False)  # warm-up
            per_run, walls, toks, split = [], [], None, {k: [] for k in PARTS}
            for _ in range(a.repeats):
                inside, w, tokens, _, parts = run_once(name, model, ids, a, make, chunk, False)
                if inside:
                    per_run.append(statistics.median(inside))
                    for k, v in parts.items():
                        split[k].append(statistics.median(v))
                walls.append(statistics.median(w))
                toks = toks or tokens
            r = res["caches"][name] = {"step_ms_median": 1e3 * statistics.median(walls),
                                       "tokens": toks}
            line = f"{name:12s} step {r['step_ms_median']:.2f} ms"
            if per_run:
                ops = run_once(name, model, ids, a, make, chunk, True)[3]
                r.update(cache_ms_median=1e3 * statistics.median(per_run),
                         cache_ms_per_run=[1e3 * x for x in per_run],
                         cache_ops_per_step=ops[0], step_ops_per_step=ops[1],
                         **{f"{k.strip('_')}_ms_median": 1e3 * statistics.median(v)
                            for k, v in split.items()})
                line += (f", inside the cache {r['cache_ms_median']:.3f} ms (runs: "
                         f"{', '.join(f'{1e3 * x:.3f}' for x in per_run)}), "
                         f"{ops[0]:.1f} torch ops of {ops[1]:.1f} a step; of it "
                         + ", ".join(f"{k.strip('_')} {1e3 * statistics.median(v):.3f} ms"
                                     for k, v in split.items()))
            print(line, flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
