"""What operating Synapse costs the loop it observes (CPU; the GPU figures are measured by
the same script on the GPU machine with --device cuda).

1. ``publish_cache_step``: the one call a TieredCache step makes for /metrics, timed by
   itself on a cache that has run (microseconds per step), and as a share of the median
   decode step of the same cache.
2. A generate loop with the hook and with it replaced by a no-op, interleaved runs:
   decode step medians side by side (the difference is within the noise of a shared host
   when the call costs microseconds; both are printed).
3. A residency pass over N tracked allocations with a trivial memory-type function (the
   monitor's own Python cost), and its share of time at the default interval: pass
   seconds / interval. With --device cuda, also over N real cuMemAlloc pointers asked
   through the driver (cuPointerGetAttributes, two per allocation).
4. The generate loop with the monitor thread checking 1000 allocations every 10 ms (a
   thousand times the default rate) against no monitor: what the thread's passes cost the
   loop through the GIL, in the worst case.

    python benchmarks/monitor_overhead.py [--repeats 5] [--out benchmarks/results/monitor_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import tiny_model  # noqa: E402

import synapse.hf.cache as cache_mod  # noqa: E402
from synapse.hf import TieredCache  # noqa: E402
from synapse.monitor import DEFAULT_INTERVAL_S, AllocationTracker, ResidencyMonitor  # noqa: E402
from synapse.monitor.cache_probe import publish_cache_step  # noqa: E402


def generate(model, device, new_tokens: int) -> tuple[TieredCache, list[float]]:
    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=64, demote="int4",
                        block_tokens=16, model=model, backend=device)
    ids = torch.randint(3, 96, (1, 128), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                       prefill_chunk_size=32)
    steps = cache.rec.step_s[-new_tokens + 1:]  # decode steps (the prefill chunks excluded)
    return cache, steps


def _bump(cache) -> None:
    """What a busy step changes: every published counter moves, so every ``inc`` runs."""
    c = cache.planner.mgr.counters
    c.l1_hits += 1
    c.l2_hits += 1
    c.misses += 1
    c.evictions += 1
    c.demotions += 1
    c.drops += 1
    c.refusals += 1
    c.fetches += 1
    c.prefetches += 1
    be = cache._backend
    be.bytes_moved["h2d"] += 4096
    be.bytes_moved["d2h"] += 4096
    # a grown INT4 count makes the probe read the device-side error sums (a sync on CUDA),
    # as a step that demoted blocks does
    be.q_count += 64
    cache.stall_s += 1e-6


def publish_cost_us(cache, calls: int = 20000) -> float:
    """Microseconds per call, every counter changed since the last one (the bumping
    itself is timed alone and subtracted)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        _bump(cache)
    bump = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        _bump(cache)
        publish_cache_step(cache)
    return (time.perf_counter() - t0 - bump) / calls * 1e6


def loop_with_and_without(model, device, repeats: int, new_tokens: int) -> dict:
    on, off = [], []
    for _ in range(repeats):
        for hooked in (True, False):
            cache_mod.publish_cache_step = publish_cache_step if hooked else (lambda c: None)
            _, steps = generate(model, device, new_tokens)
            (on if hooked else off).append(statistics.median(steps))
    cache_mod.publish_cache_step = publish_cache_step
    return {"decode_step_median_s_with_hook": statistics.median(on),
            "decode_step_median_s_without_hook": statistics.median(off),
            "per_repeat_with": on, "per_repeat_without": off}


def _fake_tracker(n: int) -> AllocationTracker:
    t = AllocationTracker()
    for i in range(n):
        t.track(0x10000 + i * 0x1000, 4096, "device", "kv_pages")
    return t


def residency_pass(tracker, memory_type, repeats: int = 20) -> float:
    mon = ResidencyMonitor(tracker, memory_type=memory_type)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = mon.check()
        times.append(time.perf_counter() - t0)
    assert not found, found[0].message()
    return statistics.median(times)


def driver_passes(counts) -> dict:
    """Passes over real device allocations, asked through the CUDA driver."""
    from synapse.hw import driver_api as drv
    from synapse.monitor.pointer_kinds import driver_memory_type
    mt = driver_memory_type()
    if mt is None:
        return {}
    unbind = drv.bind_primary_context(0)
    out = {}
    try:
        for n in counts:
            t, ptrs = AllocationTracker(), [drv.mem_alloc(1 << 16) for _ in range(n)]
            for p in ptrs:
                t.track(p, 1 << 16, "device", "kv_pages")
            out[str(n)] = residency_pass(t, mt)
            for p in ptrs:
                drv.mem_free(p)
    finally:
        unbind()
    return out


def loop_under_monitor(model, device, repeats: int, new_tokens: int) -> dict:
    on, off = [], []
    tracker = _fake_tracker(1000)
    for _ in range(repeats):
        for watched in (True, False):
            mon = ResidencyMonitor(tracker, memory_type=lambda ptr: "device", interval_s=0.01)
            if watched:
                mon.start()
            _, steps = generate(model, device, new_tokens)
            mon.stop()
            (on if watched else off).append(statistics.median(steps))
    return {"decode_step_median_s_monitor_every_10ms": statistics.median(on),
            "decode_step_median_s_no_monitor": statistics.median(off),
            "per_repeat_with": on, "per_repeat_without": off}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48, help="decode tokens per run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/monitor_overhead.json"))
    args = ap.parse_args()
    model = tiny_model(layers=4).to(args.device)
    cache, steps = generate(model, args.device, args.tokens)  # warm-up, and the cache to time
    step_s = statistics.median(steps)
    cost_us = publish_cost_us(cache)
    loop = loop_with_and_without(model, args.device, args.repeats, args.tokens)
    passes = {str(n): residency_pass(_fake_tracker(n), lambda ptr: "device")
              for n in (10, 100, 1000, 10000)}
    driver = driver_passes((10, 100, 1000)) if args.device == "cuda" else {}
    watched = loop_under_monitor(model, args.device, args.repeats, args.tokens)
    out = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": args.device,
                    "cpus": os.cpu_count(), "load_average_1_5_15": os.getloadavg()},
        "model": "random LlamaForCausalLM, 4 layers, hidden 64, 2 KV heads of 32",
        "publish_cache_step_us": cost_us,
        "decode_step_median_s": step_s,
        "publish_share_of_decode_step": cost_us * 1e-6 / step_s,
        "generate_loop": loop,
        "residency_pass_s_by_allocations": passes,
        "default_interval_s": DEFAULT_INTERVAL_S,
        "residency_share_at_default_interval": {n: s / DEFAULT_INTERVAL_S for n, s in passes.items()},
        "driver_residency_pass_s_by_allocations": driver,
        "generate_loop_under_monitor": watched,
        "note": "residency_pass_s_by_allocations uses an injected memory-type function; the "
                "driver's cost per pointer is in driver_residency_pass_s_by_allocations, "
                "measured only with --device cuda",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"publish_cache_step: {cost_us:.1f} us per step = {out['publish_share_of_decode_step']:.3%} "
          f"of the median decode step ({step_s * 1e3:.2f} ms)")
    print(f"generate loop, median decode step: {loop['decode_step_median_s_with_hook'] * 1e3:.2f} ms "
          f"with the hook, {loop['decode_step_median_s_without_hook'] * 1e3:.2f} ms without")
    for label, table in (("injected", passes), ("driver", driver)):
        for n, s in table.items():
            print(f"residency pass ({label}) over {n:>5} allocations: {s * 1e3:.3f} ms = "
                  f"{s / DEFAULT_INTERVAL_S:.4%} of a {DEFAULT_INTERVAL_S:.0f} s interval")
    print(f"generate loop, median decode step: "
          f"{watched['decode_step_median_s_monitor_every_10ms'] * 1e3:.2f} ms with a pass over "
          f"1000 allocations every 10 ms, {watched['decode_step_median_s_no_monitor'] * 1e3:.2f} ms "
          f"without")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
