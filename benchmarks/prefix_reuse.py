"""Time to first token with a saved prefix against recomputing it, from L2 and from L3,
through ``synapse.hf.prefix`` with a ``DynamicCache`` and with a ``TieredCache``.

A prompt of ``--prompt-tokens`` random ids whose first ``--saved-tokens`` were saved
earlier (issue 13's figure: 32768 and 30720). The prefix is saved once per store by the
integration itself (``prefill_with_prefix(..., save=True)`` over the prefix alone: the
prefill's KV goes into the store). Then, per cache (``--caches``: ``dynamic``, a
``DynamicCache``; ``tiered``, a ``TieredCache`` with policy fifo and an L1 budget that
holds the prompt, so nothing is evicted and the figure is load against recompute alone)
and per mode, with the same model and prompt:

- ``recompute``: ``prefill_with_prefix`` without a store: one forward pass over the
  whole prompt;
- ``l2``: the prefix's chunks loaded from a ``PrefixStore`` holding them in L2 (pinned host
  memory where CUDA exists), copied to the model's device, put into the cache through its
  own ``update`` path, then a forward pass over the remaining tokens;
- ``l3``: the same with the chunks in L3 only (files in ``--l3-dir``), their page cache
  dropped first (``posix_fadvise(DONTNEED)`` after the fsync'd writes), so the reads
  come from the disk. ``l3_warm_ttft_s`` repeats it with the page cache left warm, to show
  the difference.

The timed calls save nothing (``save=False``): a save would add the prompt's remaining
chunks to the store and the next repeat would restore more than ``--saved-tokens``.

Time to first token = from the call (the cache's construction included) to the logits of
the last prompt token (CUDA synchronised), median of ``--repeats`` after a warm-up. Load
bandwidth = the prefix's KV bytes / the time that moves them: for L2 the store's ``load``
(it serves the pinned buffers in place) plus their copy to the device, set against the
pinned host-to-device bandwidth measured here (1 GiB, CUDA events); for L3 the store's
``load`` (files read and checked into pinned buffers, ``--io-workers`` threads), set
against the disk's cold sequential read (``synapse.hw.measure_disk``, O_DIRECT where the
file system takes it) of a 256 MiB file, written once beside the store, just before each
timed L3 run:
a virtual disk's rate moved by a third between minutes of one session (1.34-2.04 GB/s on
the H200 machine), so a figure from the start of the run is kept only beside it
(``of_first_disk_read``).
``phases_s`` gives each part of the time to first token: ``store_load`` (the lookup),
``to_device`` (the layer-wise copies; CUDA events on their side streams), ``copy_issue``
(host time to queue them; most of it during the forward, a few layers ahead of it),
``into_cache`` (0 for a ``DynamicCache``: its forward joins
prefix and new tokens), ``forward`` (CUDA events; it overlaps the copies and includes
its waits for them) and ``copy_end_after_forward_start`` (> 0: the copies were still
running when the forward began); ``copy_path`` how the copies were issued (one batched
driver call per layer, or a torch copy per chunk). ``--attention sdpa`` turns the fused
causal attention of the new tokens off, to compare. The first token
and the last logits of each reuse mode are compared with the same cache's ``recompute``.

``prefill_with_reuse`` is the one function that runs the integration; everything else
here is set-up and clocks.

    python benchmarks/prefix_reuse.py --device cuda --model llama-8b-shape --l3-dir /nvme/kv \
        --out $OUT/prefix_reuse.json                      # the H200 figure
    python benchmarks/prefix_reuse.py --device cpu --prompt-tokens 8192 --saved-tokens 7680 \
        --threads 1 --out benchmarks/results/cpu-2026-12-01/prefix_reuse.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = 0
GOALS = {"l2_speedup": 10.0, "l2_of_h2d": 0.8, "l3_of_disk": 0.8}


def bad_input(message: str):
    """One line on stderr, exit status 2 (the project's rule for bad input)."""
    print(f"prefix_reuse.py: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- model, prompt and clock ------------------------------------------------------------
def model_config(name: str, max_tokens: int):
    from transformers import LlamaConfig
    common = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=False, max_position_embeddings=max(32768, max_tokens))
    if name == "tiny":
        return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, **common)
    if name == "llama-8b-shape":  # Llama-3-8B's published shape, random weights
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=128, rope_theta=500000.0, **common)
    bad_input(f"--model: got {name!r}, expected tiny, llama-8b-shape or a local path")


def build_model(name: str, device, max_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if Path(name).exists():
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True
                                                    ).to(device).eval()
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(model_config(name, max_tokens))
    return model.to(dtype).eval()


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# -- the integration ---------------------------------------------------------------------
CACHES = ("dynamic", "tiered")


def new_cache(kind: str, model, prompt_tokens: int, device):
    from transformers import DynamicCache

    from synapse.hf import TieredCache
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return TieredCache(model.config, policy="fifo", l1_budget_tokens=prompt_tokens + 64,
                       demote="int4", backend=device.type)


def prefill_with_reuse(model, store, ids, kind: str, device, save: bool = False,
                       fused: bool = True):
    """THE INTEGRATION POINT: ``synapse.hf.prefix.prefill_with_prefix`` into a new cache of
    ``kind``. Returns ``(logits of the last token, PrefixReuse)``; ``reuse.phases_s`` has
    the seconds of the store's ``load``, of the copy to ``device`` and of the cache's
    update (absent when nothing was restored)."""
    from synapse.hf.prefix import prefill_with_prefix
    cache = new_cache(kind, model, ids.shape[1], device)
    out, _, reuse = prefill_with_prefix(model, ids, store=store, cache=cache, save=save,
                                        fused_attention=fused,
                                        logits_to_keep=1)
    return out.logits[0, -1], reuse


# -- reference bandwidths -------------------------------------------------------------------
def pinned_h2d_gb_per_s(device, nbytes: int = 1 << 30, repeats: int = 5):
    import torch
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(repeats + 1):
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) * 1e-3)
    return nbytes / statistics.median(times) / 1e9


# -- the run -------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--model", default="tiny", help="tiny, llama-8b-shape (random weights) or "
                                                    "a local model directory")
    ap.add_argument("--prompt-tokens", type=int, default=32768, help="tokens in the prompt")
    ap.add_argument("--saved-tokens", type=int, default=30720,
                    help="leading tokens of the prompt saved before the timed runs")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="tokens per store chunk")
    ap.add_argument("--caches", default=",".join(CACHES),
                    help="comma-separated: dynamic (DynamicCache), tiered (TieredCache)")
    ap.add_argument("--l3-dir", help="directory on the disk under test (default: a temporary one)")
    ap.add_argument("--io-workers", type=int, default=8, help="L3 reader threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); "
                                                "1 on a shared CPU, where 2 thrash")
    ap.add_argument("--attention", default="fused", help="fused (the new tokens on flash "
                    "attention over the prefix and over themselves, merged by log-sum-exp; "
                    "SDPA's bottom-right causal bias where flash refuses) or sdpa (the "
                    "model's own, with an explicit mask)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--profile", type=Path, help="also run one time to first token from L2 "
                    "per cache under torch.profiler: the kernel table and the compute "
                    "stream's idle gaps printed, the trace written into this directory")
    a = ap.parse_args(argv)
    if not 0 < a.saved_tokens < a.prompt_tokens:
        bad_input(f"--saved-tokens: got {a.saved_tokens}, expected 0 < it < "
                  f"--prompt-tokens ({a.prompt_tokens})")
    if a.attention not in ("fused", "sdpa"):
        bad_input(f"--attention: got {a.attention!r}, expected fused or sdpa")
    caches = [c for c in a.caches.split(",") if c]
    if not caches or set(caches) - set(CACHES):
        bad_input(f"--caches: got {a.caches!r}, expected a comma-separated list of "
                  f"{', '.join(CACHES)}")

    import numpy as np
    import torch

    from synapse.hf.prefix import prefix_fingerprint
    from synapse.hw.measure_disk import disk_sweep
    from synapse.prefix import PrefixStore

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model = build_model(a.model, device, a.prompt_tokens)
    cfg = model.config
    tokens = np.random.default_rng(SEED).integers(0, cfg.vocab_size, a.prompt_tokens)
    ids = torch.as_tensor(tokens, device=device).unsqueeze(0)
    fp = prefix_fingerprint(model, a.chunk_tokens, model_id=f"{a.model}-seed{SEED}")
    whole = a.saved_tokens // a.chunk_tokens * a.chunk_tokens
    param = next(model.parameters())
    kv_bytes = (cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads or cfg.num_attention_heads)
                * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
                * param.element_size() * whole)
    tmp = None
    root = Path(a.l3_dir) if a.l3_dir else Path(tmp := tempfile.mkdtemp(prefix="synapse-bench-"))
    results: dict = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                                     "torch_threads": torch.get_num_threads(),
                                     "device": torch.cuda.get_device_name(device)
                                     if device.type == "cuda" else platform.processor() or "cpu"},
                     "config": vars(a) | {"out": str(a.out) if a.out else None,
                                          "l3_dir": str(root), "caches": caches},
                     "kv_bytes_saved_prefix": kv_bytes}

    def run(kind, store):
        return timed(lambda: prefill_with_reuse(model, store, ids, kind, device,
                                                fused=a.attention == "fused"), device)

    try:
        for kind in caches:  # 1. recompute, per cache
            rec = [run(kind, None) for _ in range(a.repeats + 1)][1:]
            results[kind] = {"recompute_ttft_s": statistics.median(t for _, t in rec),
                             "_ref": rec[0][0][0]}
        results["pinned_h2d_gb_per_s"] = pinned_h2d_gb_per_s(device)
        results["disk"] = disk_sweep(root / "disk-measure", sizes=(64 << 20, 256 << 20))
        modes = {
            "l2": dict(l2_bytes=2 * kv_bytes + (64 << 20)),
            "l3": dict(l3_dir=root / "l3", l3_bytes=2 * kv_bytes + (64 << 20),
                       io_workers=a.io_workers),
        }
        for mode, kw in modes.items():  # 2. the prefix saved once per store, by the integration
            with PrefixStore(fp, **kw) as store:
                prefill_with_reuse(model, store, ids[:, :a.saved_tokens], caches[0], device,
                                   save=True)
                store.flush()
                for kind in caches:
                    results[kind][mode] = measure(a, store, mode, run, kind, results[kind],
                                                  kv_bytes, whole)
                    if mode == "l2" and a.profile:
                        results[kind]["profile"] = profile_ttft(lambda: run(kind, store), kind,
                                                                a.profile)
                    if mode == "l3":  # the same, the files left in the page cache
                        warm = [run(kind, store) for _ in range(a.repeats)]
                        results[kind]["l3_warm_ttft_s"] = statistics.median(t for _, t in warm)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    h2d, disk = results["pinned_h2d_gb_per_s"], results["disk"]["read_gb_per_s"]
    for kind in caches:
        r = results[kind]
        del r["_ref"]
        l2_rate = r["l2"]["load_gb_per_s"]
        r["l2"]["of_pinned_h2d"] = l2_rate / h2d if h2d and l2_rate else None
        # against the disk's cold reads between this cache's L3 runs (the same minutes);
        # the session's first figure is kept beside it
        r["l3"]["disk_read_gb_per_s"] = statistics.median(r["l3"]["adjacent_disk_read_gb_per_s"])
        r["l3"]["of_disk_read"] = r["l3"]["load_gb_per_s"] / r["l3"]["disk_read_gb_per_s"]
        r["l3"]["of_first_disk_read"] = r["l3"]["load_gb_per_s"] / disk
        r["goals"] = {
            "l2_speedup_at_least_10x": r["l2"]["speedup"] >= GOALS["l2_speedup"],
            "l2_at_least_80pct_of_pinned_h2d": (None if h2d is None
                                                else r["l2"]["of_pinned_h2d"] >= GOALS["l2_of_h2d"]),
            "l3_at_least_80pct_of_disk_read": r["l3"]["of_disk_read"] >= GOALS["l3_of_disk"],
            "same_first_token": r["l2"]["same_first_token"] and r["l3"]["same_first_token"],
        }
    print(summary(results))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=str))
    return results


def measure(a, store, mode: str, run, kind: str, ref: dict, kv_bytes: int, whole: int) -> dict:
    """Time to first token with ``store``'s prefix, ``a.repeats`` runs after a warm-up.
    From L3, each timed run follows a cold read of a 256 MiB file on the same disk."""
    from synapse.hw.measure_disk import ColdFile
    before = store.report()
    runs, adjacent = [], []
    cold = ColdFile(Path(store.disk.dir).parent / "disk-adjacent") if mode == "l3" else None
    try:
        for i in range(a.repeats + 1):
            if cold:
                if i:  # the disk's own cold read just before each timed load: a virtual
                    # disk's rate drifts by a third between minutes of one session
                    adjacent.append(cold.read_gb_per_s())
                store.disk.drop_page_cache()
            (logits, reuse), t = run(kind, store)
            runs.append((t, reuse, logits))
    finally:
        if cold:
            cold.close()
    report = store.report()
    runs = runs[1:]  # the first is a warm-up
    reuse, logits = runs[0][1], runs[0][2]
    n = reuse.restored_tokens
    phases = {k: statistics.median(r.phases_s[k] for _, r, _ in runs) for k in reuse.phases_s}
    loaded = n * kv_bytes // whole
    # L2: the store serves pinned buffers in place; loading is their copy to the device.
    # L3: loading is the store's read of the files into pinned buffers.
    moving = phases.get("store_load", 0.0) + (phases.get("to_device", 0.0) if mode == "l2" else 0.0)
    ttft = statistics.median(t for t, *_ in runs)
    in_place = mode == "l2" and logits.device.type != "cuda"  # nothing moves on a CPU
    ref_logits = ref["_ref"]
    return {
        **({"adjacent_disk_read_gb_per_s": adjacent} if adjacent else {}),
        "restored_tokens": n, "expected_tokens": whole, "computed_tokens": reuse.computed_tokens,
        "ttft_s": ttft, "speedup": ref["recompute_ttft_s"] / ttft, "phases_s": phases,
        "copy_path": reuse.copy_path,
        "load_gb_per_s": None if in_place or moving <= 0 else loaded / moving / 1e9,
        "same_first_token": int(logits.argmax()) == int(ref_logits.argmax()),
        "max_abs_logit_diff": float((logits.float() - ref_logits.float()).abs().max()),
        "store": {"hit_tokens": {t: report["hit_tokens"][t] - before["hit_tokens"][t]
                                 for t in report["hit_tokens"]},
                  "bytes_loaded": {t: report["bytes_loaded"][t] - before["bytes_loaded"][t]
                                   for t in report["bytes_loaded"]},
                  "checksum_failures": report["checksum_failures"],
                  "load_per_chunk": report["load_per_chunk"]},
    }


def profile_ttft(fn, kind: str, directory: Path) -> dict:
    """One time to first token under torch.profiler: the kernels by device time, and the
    busiest stream's idle time between its first and last kernel (where the forward
    waited: on the host, on copies, on nothing)."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile
    directory.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    trace = directory / f"ttft_{kind}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(str(trace) + ".gz", "wt") as f:
        json.dump(events, f)
    trace.unlink()
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copies = [e for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    print(f"--- profile of one time to first token from L2, {kind} cache")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if kernels else
                                    "self_cpu_time_total", row_limit=25))
    if not kernels:
        return {"kernels": 0, "trace": str(trace) + ".gz"}
    by_stream: dict = {}
    for e in kernels:
        by_stream.setdefault(e["args"].get("stream"), []).append((e["ts"], e["ts"] + e["dur"]))
    main = max(by_stream, key=lambda s: sum(b - a for a, b in by_stream[s]))
    spans = sorted(by_stream[main])
    gaps = [b2[0] - b1[1] for b1, b2 in zip(spans, spans[1:]) if b2[0] > b1[1]]
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation",
                                                                       "python_function")]
    t_host0 = min((e["ts"] for e in host), default=spans[0][0])
    out = {"kernels": len(kernels), "copies": len(copies), "main_stream": main,
           "main_busy_ms": sum(b - a for a, b in spans) / 1e3,
           "main_span_ms": (spans[-1][1] - spans[0][0]) / 1e3,
           "main_idle_ms": sum(gaps) / 1e3,
           "main_idle_over_50us_ms": sum(g for g in gaps if g > 50) / 1e3,
           "largest_gaps_us": sorted(gaps, reverse=True)[:10],
           "first_kernel_after_host_start_ms": (spans[0][0] - t_host0) / 1e3,
           "trace": str(trace) + ".gz"}
    print({k: v for k, v in out.items() if k != "trace"})
    return out


SPLIT = (("store_load", "lookup"), ("to_device", "copy"), ("copy_issue", "copy issued (host)"),
         ("into_cache", "into the cache"), ("forward", "forward"),
         ("copy_end_after_forward_start", "copies ended after the forward began"))


def ttft_split(phases: dict) -> str:
    """The time to first token's parts (ms). On CUDA the copy and the forward overlap:
    the copy and forward are device times from CUDA events, the forward's includes its
    waits for layers not copied yet."""
    return ", ".join(f"{label} {phases[k] * 1e3:.1f} ms" for k, label in SPLIT if k in phases)


def summary(r: dict) -> str:
    def pct(x):
        return "n/a (no GPU)" if x is None else f"{x:.0%}"
    d = r["disk"]
    lines = [f"prefix of {r['config']['saved_tokens']} tokens ({r['kv_bytes_saved_prefix'] / 2**20:.1f} MiB "
             f"of KV) in a {r['config']['prompt_tokens']}-token prompt, {r['environment']['device']}"]
    for kind in r["config"]["caches"]:
        c = r[kind]
        lines.append(f"{kind}: recompute: time to first token {c['recompute_ttft_s'] * 1e3:.1f} ms")
        for mode, ref, what in (("l2", c["l2"].get("of_pinned_h2d"), "of pinned H2D"),
                                ("l3", c["l3"]["of_disk_read"],
                                 f"of the disk's cold read between these runs "
                                 f"({c['l3']['disk_read_gb_per_s']:.2f} GB/s)")):
            m = c[mode]
            rate = ("served in place (CPU: no host-to-device copy)" if m["load_gb_per_s"] is None
                    else f"loaded at {m['load_gb_per_s']:.2f} GB/s = {pct(ref)} {what}")
            lines.append(f"  {mode}: {m['ttft_s'] * 1e3:.1f} ms ({m['speedup']:.1f}x), "
                         f"{m['restored_tokens']} tokens {rate}; first token "
                         f"{'same' if m['same_first_token'] else 'DIFFERENT'}, "
                         f"max |logit diff| {m['max_abs_logit_diff']:.2e}")
            lines.append("    split: " + ttft_split(m["phases_s"])
                         + (f"; copies: {m['copy_path']}" if m.get("copy_path") else ""))
        lines.append(f"  L3 with a warm page cache: {c['l3_warm_ttft_s'] * 1e3:.1f} ms; goals: "
                     + ", ".join(f"{k} {'n/a' if v is None else ('met' if v else 'MISSED')}"
                                 for k, v in c["goals"].items()))
    h2d = r["pinned_h2d_gb_per_s"]
    lines.append(f"pinned H2D {h2d:.1f} GB/s" if h2d else "pinned H2D: not measured (no GPU)")
    lines.append(f"disk ({d['filesystem']}, {d['method']}): cold read before the runs "
                 f"{d['read_gb_per_s']:.2f} GB/s, "
                 f"cached {d['cached_read_gb_per_s']:.2f} GB/s; {d['cache_effects']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
