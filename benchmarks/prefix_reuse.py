"""Time to first token with a saved prefix against recomputing it, from L2 and from L3.

A prompt of ``--prompt-tokens`` random ids whose first ``--saved-tokens`` were saved
earlier (issue 13's figure: 32768 and 30720). Per mode, with the same model and prompt:

- ``recompute``: one forward pass over the whole prompt into a ``DynamicCache``;
- ``l2``: the prefix's chunks loaded from a ``PrefixStore`` holding them in L2 (pinned host
  memory where CUDA exists), copied to the model's device, put into a ``DynamicCache``,
  then a forward pass over the remaining tokens;
- ``l3``: the same with the chunks in L3 only (files in ``--l3-dir``), their page cache
  dropped first (``posix_fadvise(DONTNEED)`` after the fsync'd writes), so the reads
  come from the disk. ``l3_warm`` repeats it with the page cache left warm, to show the
  difference.

Time to first token = from the call to the logits of the last prompt token (CUDA
synchronised), median of ``--repeats`` after a warm-up. Load bandwidth = the prefix's KV
bytes / the time that moves them: for L2 the store's ``load`` (it serves the pinned
buffers in place) plus their copy to the device, set against the pinned host-to-device
bandwidth measured here (1 GiB, CUDA events); for L3 the store's ``load`` (files read and
checked into pinned buffers, ``--io-workers`` threads), set against the disk's cold
sequential read measured here (``synapse.hw.measure_disk``). ``phases_s`` gives each
part (load, copy to the device, assembly into the cache). The first
token and the last logits of each reuse mode are compared with ``recompute``.

The integration point is ``prefill_with_reuse``: it is the only function that knows how a
prefix becomes a transformers cache. Today it builds a ``DynamicCache`` from the loaded
chunks (a real measurement of load against recompute, not a stand-in for one); once
``synapse.hf.TieredCache`` takes a ``PrefixStore`` (after the KV engine rewrite), that
function is replaced by the cache's own load and everything else here stays.

    python benchmarks/prefix_reuse.py --device cuda --model llama-8b-shape --l3-dir /nvme/kv \
        --out $OUT/prefix_reuse.json                      # the H200 figure
    python benchmarks/prefix_reuse.py --device cpu --prompt-tokens 8192 --saved-tokens 7680 \
        --out benchmarks/results/cpu-2026-12-02/prefix_reuse.json
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
    raise SystemExit(f"--model: got {name!r}, expected tiny, llama-8b-shape or a local path")


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


# -- the store's view of a transformers cache --------------------------------------------
def chunk_of(cache, start: int, stop: int):
    """Tokens [start, stop) of every layer's K and V: one tensor [layers, 2, heads, n, dim]."""
    import torch
    return torch.stack([torch.stack([layer.keys[0, :, start:stop], layer.values[0, :, start:stop]])
                        for layer in cache.layers])


def save_prefix(store, tokens, cache) -> None:
    c = store.chunk_tokens
    store.save(tokens, lambda i: chunk_of(cache, i * c, (i + 1) * c))
    store.flush()


def prefill_with_reuse(model, store, tokens, device):
    """THE INTEGRATION POINT. Restore the longest saved prefix of ``tokens`` from
    ``store`` into a transformers cache, run the model over the rest, and return
    ``(logits of the last token, cache, restored tokens, phase timings)``. Replace the
    DynamicCache assembly with ``synapse.hf.TieredCache``'s own load once it takes a
    PrefixStore; the timings are seconds of the store's ``load``, of the copy of the
    chunks to ``device`` and of putting them into the cache."""
    import torch
    from transformers import DynamicCache
    t0 = time.perf_counter()
    got = store.load(tokens, max_tokens=len(tokens) - 1) if store is not None else None
    t1 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    n = got.tokens if got is not None else 0
    if n:
        chunks = [c.to(device, non_blocking=True) for c in got.chunks]
        sync(device)
        t2 = time.perf_counter()
        whole = torch.cat(chunks, dim=3)               # [layers, 2, heads, n, dim]
        for i in range(whole.shape[0]):
            cache.update(whole[i, 0].unsqueeze(0), whole[i, 1].unsqueeze(0), i)
        sync(device)
    else:
        t2 = t1
    phases = {"store_load_s": t1 - t0, "to_device_s": t2 - t1,
              "into_cache_s": time.perf_counter() - t2}
    ids = torch.as_tensor(tokens[n:], device=device).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1], cache, n, phases


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
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--saved-tokens", type=int, default=30720)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--l3-dir", help="directory on the disk under test (default: a temporary one)")
    ap.add_argument("--io-workers", type=int, default=8, help="L3 reader threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); "
                                                "1 on a shared CPU, where 2 thrash")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if not 0 < a.saved_tokens < a.prompt_tokens:
        raise SystemExit(f"--saved-tokens: got {a.saved_tokens}, expected 0 < it < "
                         f"--prompt-tokens ({a.prompt_tokens})")

    import numpy as np
    import torch

    from synapse.hw.measure_disk import disk_sweep
    from synapse.prefix import Fingerprint, PrefixStore, config_digest

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    model = build_model(a.model, device, a.prompt_tokens)
    cfg = model.config
    tokens = np.random.default_rng(SEED).integers(0, cfg.vocab_size, a.prompt_tokens)
    prefix = tokens[:a.saved_tokens]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    fp = Fingerprint(a.model, config_digest(cfg.to_dict()), dtype, a.chunk_tokens,
                     "[layers, 2, kv_heads, tokens, head_dim]")
    tmp = None
    root = Path(a.l3_dir) if a.l3_dir else Path(tmp := tempfile.mkdtemp(prefix="synapse-bench-"))
    results: dict = {"environment": {"python": platform.python_version(), "torch": torch.__version__,
                                     "torch_threads": torch.get_num_threads(),
                                     "device": torch.cuda.get_device_name(device)
                                     if device.type == "cuda" else platform.processor() or "cpu"},
                     "config": vars(a) | {"out": str(a.out) if a.out else None,
                                          "l3_dir": str(root)}}
    try:
        # 1. references: recompute, and the KV the prefix would be saved from
        with torch.no_grad():
            rec = [timed(lambda: prefill_with_reuse(model, None, tokens, device), device)
                   for _ in range(a.repeats + 1)][1:]
            ref_logits = rec[0][0][0]
            _, prefix_cache, _, _ = prefill_with_reuse(model, None, np.append(prefix, 0), device)
        kv_bytes = sum(layer.keys[..., :a.saved_tokens, :].nbytes * 2 for layer in prefix_cache.layers)
        results["kv_bytes_saved_prefix"] = kv_bytes
        results["recompute_ttft_s"] = statistics.median(t for _, t in rec)
        results["pinned_h2d_gb_per_s"] = pinned_h2d_gb_per_s(device)
        results["disk"] = disk_sweep(root / "disk-measure", sizes=(64 << 20, 256 << 20))
        whole = a.saved_tokens // a.chunk_tokens * a.chunk_tokens
        modes = {
            "l2": dict(l2_bytes=2 * kv_bytes + (64 << 20)),
            "l3": dict(l3_dir=root / "l3", l3_bytes=2 * kv_bytes + (64 << 20),
                       io_workers=a.io_workers),
        }
        for mode, kw in modes.items():
            with PrefixStore(fp, **kw) as store:
                save_prefix(store, prefix, prefix_cache)
                runs = []
                for r in range(a.repeats + 1):
                    if mode == "l3":
                        store.disk.drop_page_cache()
                    (logits, _, n, phases), t = timed(
                        lambda: prefill_with_reuse(model, store, tokens, device), device)
                    runs.append((t, phases, n, logits))
                if mode == "l3":  # the same, the files left in the page cache
                    warm = [timed(lambda: prefill_with_reuse(model, store, tokens, device), device)
                            for _ in range(a.repeats)]
                    results["l3_warm_ttft_s"] = statistics.median(t for _, t in warm)
                report = store.report()
            runs = runs[1:]  # the first is a warm-up
            n, logits = runs[0][2], runs[0][3]
            phases = {k: statistics.median(p[k] for _, p, *_ in runs) for k in runs[0][1]}
            loaded = n * kv_bytes // a.saved_tokens
            # L2: the store serves pinned buffers in place; loading is their copy to the
            # device. L3: loading is the store's read of the files into pinned buffers.
            moving = phases["store_load_s"] + (phases["to_device_s"] if mode == "l2" else 0.0)
            ttft = statistics.median(t for t, *_ in runs)
            in_place = mode == "l2" and device.type != "cuda"  # nothing moves on a CPU
            results[mode] = {
                "restored_tokens": n, "expected_tokens": whole, "ttft_s": ttft,
                "speedup": results["recompute_ttft_s"] / ttft, "phases_s": phases,
                "load_gb_per_s": None if in_place or moving <= 0 else loaded / moving / 1e9,
                "same_first_token": int(logits.argmax()) == int(ref_logits.argmax()),
                "max_abs_logit_diff": float((logits.float() - ref_logits.float()).abs().max()),
                "store": {k: report[k] for k in ("hit_tokens", "bytes_loaded", "checksum_failures",
                                                 "load_per_chunk")},
            }
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    h2d, disk = results["pinned_h2d_gb_per_s"], results["disk"]["read_gb_per_s"]
    l2_rate = results["l2"]["load_gb_per_s"]
    results["l2"]["of_pinned_h2d"] = l2_rate / h2d if h2d and l2_rate else None
    results["l3"]["of_disk_read"] = results["l3"]["load_gb_per_s"] / disk
    results["goals"] = {
        "l2_speedup_at_least_10x": results["l2"]["speedup"] >= GOALS["l2_speedup"],
        "l2_at_least_80pct_of_pinned_h2d": (None if h2d is None
                                            else results["l2"]["of_pinned_h2d"] >= GOALS["l2_of_h2d"]),
        "l3_at_least_80pct_of_disk_read": results["l3"]["of_disk_read"] >= GOALS["l3_of_disk"],
        "same_first_token": results["l2"]["same_first_token"] and results["l3"]["same_first_token"],
    }
    print(summary(results))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1, default=str))
    return results


def summary(r: dict) -> str:
    def pct(x):
        return "n/a (no GPU)" if x is None else f"{x:.0%}"
    d = r["disk"]
    lines = [f"prefix of {r['config']['saved_tokens']} tokens ({r['kv_bytes_saved_prefix'] / 2**20:.1f} MiB "
             f"of KV) in a {r['config']['prompt_tokens']}-token prompt, {r['environment']['device']}",
             f"recompute: time to first token {r['recompute_ttft_s'] * 1e3:.1f} ms"]
    for mode, ref, what in (("l2", r["l2"].get("of_pinned_h2d"), "of pinned H2D"),
                            ("l3", r["l3"]["of_disk_read"], "of the disk's cold read")):
        m = r[mode]
        rate = ("served in place (CPU: nothing to copy)" if m["load_gb_per_s"] is None
                else f"loaded at {m['load_gb_per_s']:.2f} GB/s = {pct(ref)} {what}")
        lines.append(f"{mode}: {m['ttft_s'] * 1e3:.1f} ms ({m['speedup']:.1f}x), {m['restored_tokens']} "
                     f"tokens {rate}; "
                     f"first token {'same' if m['same_first_token'] else 'DIFFERENT'}, "
                     f"max |logit diff| {m['max_abs_logit_diff']:.2e}")
    h2d = r["pinned_h2d_gb_per_s"]
    lines.append(f"pinned H2D {h2d:.1f} GB/s" if h2d else "pinned H2D: not measured (no GPU)")
    lines.append(f"disk ({d['filesystem']}, {d['method']}): cold read {d['read_gb_per_s']:.2f} GB/s, "
                 f"cached {d['cached_read_gb_per_s']:.2f} GB/s; {d['cache_effects']}; "
                 f"L3 with a warm page cache: {r['l3_warm_ttft_s'] * 1e3:.1f} ms")
    lines.append("goals: " + ", ".join(f"{k} {'n/a' if v is None else ('met' if v else 'MISSED')}"
                                       for k, v in r["goals"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
