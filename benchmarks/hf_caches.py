"""Synapse's TieredCache against transformers' own KV caches, same model, same prompt.

A random ``LlamaForCausalLM`` (built from a config in this file, seeded, no download;
fp32 on CPU, fp16 on CUDA) decodes ``--new-tokens`` greedy tokens after a random prompt of
``--prompt-tokens`` ids, once per cache:

- ``dynamic``: ``DynamicCache(config=...)``, everything on the device: the reference;
- ``offloaded``: ``DynamicCache(config=..., offloading=True)`` (each layer's KV goes back
  to the CPU after its update and the next layer's is prefetched on a side stream; its
  ``update`` calls ``torch.cuda.default_stream``, so it needs CUDA);
- ``quanto``, ``hqq``: ``QuantizedCache(backend=..., nbits=4, q_group_size=64,
  residual_length=128)`` (needs ``optimum-quanto`` / ``hqq``); ``fp8``: the per-tensor FP8
  backend (transformers >= 5.24 only); each is "not run: <reason>" where it cannot run;
- ``tiered_full``: ``TieredCache`` with an L1 budget above the context (nothing evicted);
- ``tiered_h2o`` / ``tiered_lru``: ``TieredCache`` with ``l1_budget_tokens`` = 25% of the
  prompt (a whole number of 2 MiB pages per layer plane at 32k tokens, 4 KV heads of
  128), ``demote="int4"``, policy ``h2o`` / ``lru``; the prompt goes in chunks that fit
  the budget (``prefill_chunk_size``).

Per cache: one warm-up run, which is also the measurement run (logits, KV bytes after
every token), then up to ``--repeats`` timed runs: fewer (``repeats_run``) where the
warm-up's duration says the whole would overrun ``--time-budget`` (each cache gets an
equal share of what is left); with none left, the warm-up's own timings are reported
(``timed_from``). ``--time-budget 0`` always runs ``--repeats``.

- Timing: prefill = start of ``generate`` to the first call of a logits processor (the
  prompt's forward passes are done); decode = from there to the end (``new_tokens - 1``
  forward passes); CUDA events on CUDA, ``perf_counter`` on CPU. Medians are reported.
- Memory on CUDA: ``max_memory_allocated`` minus ``memory_allocated`` just before
  ``generate`` (the weights and the prompt), over the whole run and over the decode phase
  alone (the peak is reset when the prefill ends).
- KV bytes held on the device, on any device: the storages of the tensors the cache object
  holds, walked after every generated token (deduplicated, only those on the model's
  device; quanto's tensor subclasses are opened up); for TieredCache its own
  ``device_kv_bytes()`` (L1 blocks only) and ``l1_peak_bytes`` (sampled after every
  layer's update and every move). On CPU "device" is the CPU, so this walk is the
  measurement there; a CPU-only process cannot show where an offloaded cache would put
  its bytes.
- Agreement with ``dynamic``: the fraction of generated tokens equal to the reference's,
  up to the first divergence (``prefix_match``) and position by position over all of
  them (``overall_match``); the max abs logit difference over the steps whose inputs are
  still identical (up to and including the first divergent token), absolute and relative
  to the reference's largest logit magnitude there.

Batches (``--batch N``): N prompts of ``--prompt-tokens`` random ids (equal lengths, no
padding), the same caches; each TieredCache gets N times its batch-1 budget (one share
per sequence: ``synapse.hf.batch``) and the same prefill chunk. Decode tokens/s are per
sequence (``decode_tokens_per_s``; the whole batch: ``decode_tokens_per_s_batch``);
agreement compares row 0's logits and every row's tokens. With N > 1 the caches also run
at batch 1 on row 0 (``batch1_caches``, unless ``--no-batch1``), for issue 16's goal: at
batch N, a TieredCache's decode tokens/s per sequence relative to ``dynamic``'s is within
10% of the same ratio at batch 1.

quanto's 4-bit dequantization calls its ``quanto::unpack`` op, whose CPU and CUDA kernels
are C++/CUDA extensions JIT-compiled (ninja + g++, nvcc on CUDA) on first use;
``--quanto-unpack torch`` (the default) unregisters those two kernels so that the op runs
quanto's own pure-torch kernel and nothing is compiled; ``extension`` keeps them.

    python benchmarks/hf_caches.py --device cuda --out $OUT/hf_caches.json
    python benchmarks/hf_caches.py --device cpu \
        --out benchmarks/results/cpu-2026-11-27/hf_caches.json
    python benchmarks/hf_caches.py --device cpu --tiny          # dry run, seconds
    python benchmarks/hf_caches.py --device cuda --batch 8 --prompt-tokens 8192 \
        --caches dynamic,tiered_full,tiered_h2o --out $OUT/hf_caches_batch8.json
    PYTHONPATH=/tmp/qsite python benchmarks/hf_caches.py ...     # with optimum-quanto/hqq there
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHES = ("dynamic", "offloaded", "quanto", "hqq", "fp8", "tiered_full", "tiered_h2o", "tiered_lru")
BLOCK_TOKENS = 16
SEED = 0


# -- model and prompt -------------------------------------------------------------------
def model_config(device_type: str, tiny: bool, family: str = "llama", context: int = 32768):
    from transformers import LlamaConfig, Qwen2Config
    # No eos/bos/pad: a random model may emit any id, and every run must make exactly
    # --new-tokens tokens for the timings and the agreement to line up.
    common = dict(eos_token_id=None, bos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=False, max_position_embeddings=max(32768, context))
    if family == "qwen2":
        # Qwen2-shaped (grouped-query attention, 4 KV heads of 128, rope theta 1e6, biases
        # on q/k/v), 16 layers: ~1.2 G parameters, 2.5 GB fp16; KV of 32K tokens: 1 GiB
        if tiny:
            return Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               rope_theta=1e6, **common)
        return Qwen2Config(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                           rope_theta=1e6, use_sliding_window=False, **common)
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=64, **common)
    if device_type == "cuda":  # ~0.9 G parameters, 1.8 GB fp16; KV of 8K tokens: 0.5 GB
        return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, **common)
    # CPU: small enough that all caches, warm-ups and repeats fit in about 3 minutes on 2 cores
    return LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2048,
                       num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=128, **common)


def build_model(cfg, device):
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(SEED)
    with torch.device(device):  # initialised where it runs: no 4 GB host round trip on CUDA
        model = AutoModelForCausalLM.from_config(cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def make_prompt(cfg, tokens: int, device, batch: int = 1):
    import torch
    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g).to(device)


# -- the caches ---------------------------------------------------------------------------
def round_down(n: int, m: int) -> int:
    return max(m, n // m * m)


def cache_specs(cfg, device, context: int, prompt: int | None = None, batch: int = 1) -> dict:
    """name -> (settings, factory(model) -> cache, prefill_chunk or None). A TieredCache's
    budget is per sequence times ``batch`` (each sequence of a batch gets an equal share)."""
    from transformers import DynamicCache, QuantizedCache
    backend = "cuda" if device.type == "cuda" else "cpu"
    # Full: above the context by more than the high watermark (0.95), so background
    # demotion never starts; fifo, so no attention scores are computed (pure block cost).
    full = math.ceil(context / 0.9 / BLOCK_TOKENS) * BLOCK_TOKENS + BLOCK_TOKENS
    # 25% of the prompt: with 2 MiB pages per layer plane a budget of a whole number of
    # pages (8192 tokens at 32k for 4 KV heads of 128) maps no partial page
    quarter = max(2 * BLOCK_TOKENS, round_down((prompt or context) // 4, BLOCK_TOKENS))
    # The largest chunk the planner accepts (its CapacityError names the same figure).
    chunk = max(BLOCK_TOKENS, (quarter // BLOCK_TOKENS - 1) * BLOCK_TOKENS)
    quant = dict(nbits=4, q_group_size=64, residual_length=128)

    def tiered(policy, budget, demote):
        def make(model):
            from synapse.hf import TieredCache
            return TieredCache(model.config, policy=policy, l1_budget_tokens=budget * batch,
                               demote=demote,
                               block_tokens=BLOCK_TOKENS, backend=backend, model=model)
        return make

    return {
        "dynamic": ({}, lambda m: DynamicCache(config=m.config), None),
        "offloaded": ({"offloading": True},
                      lambda m: DynamicCache(config=m.config, offloading=True), None),
        # axis 0 for quanto, 1 for HQQ: the axes transformers' KV cache docs give for each
        "quanto": ({**quant, "axis_key": 0, "axis_value": 0},
                   lambda m: QuantizedCache(backend="quanto", config=m.config, axis_key=0,
                                            axis_value=0, **quant), None),
        "hqq": ({**quant, "axis_key": 1, "axis_value": 1},
                lambda m: QuantizedCache(backend="hqq", config=m.config, axis_key=1, axis_value=1,
                                         **quant), None),
        "fp8": ({}, lambda m: QuantizedCache(backend="fp8", config=m.config), None),
        "tiered_full": ({"policy": "fifo", "l1_budget_tokens": full * batch, "demote": "l2"},
                        tiered("fifo", full, "l2"), None),
        "tiered_h2o": ({"policy": "h2o", "l1_budget_tokens": quarter * batch, "demote": "int4"},
                       tiered("h2o", quarter, "int4"), chunk),
        "tiered_lru": ({"policy": "lru", "l1_budget_tokens": quarter * batch, "demote": "int4"},
                       tiered("lru", quarter, "int4"), chunk),
    }


def backend_missing(name: str) -> str | None:
    """Why a QuantizedCache backend cannot be built here, before any model time is spent."""
    if name == "quanto":
        try:
            import optimum.quanto  # noqa: F401
        except Exception as e:  # noqa: BLE001 (a broken install is as good as a missing one)
            return f"optimum-quanto cannot be imported: {type(e).__name__}: {e}"
    if name == "hqq":
        try:
            import hqq.core.quantize  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"hqq cannot be imported: {type(e).__name__}: {e}"
    return None


def route_quanto_unpack_to_torch() -> str:
    """Make ``quanto::unpack`` run quanto's own pure-torch kernel on CPU and CUDA.

    quanto registers CPU and CUDA kernels for ``quanto::unpack`` that JIT-compile a C++/CUDA
    extension on first call (ninja, g++, nvcc); they shadow the op's pure-torch
    ``CompositeExplicitAutograd`` kernel, which quanto registers too. Destroying the
    registrations of the two backend kernels lets the dispatcher fall back to that one:
    every op stays quanto's own and nothing is compiled.
    """
    import torch
    import optimum.quanto  # noqa: F401 (registers the kernels)
    targets = {"quanto/unpack/CPU", "quanto/unpack/CUDA"}
    removed = []
    for lib in list(getattr(torch.library, "_keep_alive", [])):
        hit = targets & set(getattr(lib, "_op_impls", ()))
        if getattr(lib, "ns", None) == "quanto" and hit and hit == set(lib._op_impls):
            lib._destroy()
            removed += sorted(k.rsplit("/", 1)[1] for k in hit)
    if not removed:
        return "extension (found no CPU/CUDA registration of quanto::unpack to remove)"
    return (f"torch: quanto's CompositeExplicitAutograd kernel of quanto::unpack (its "
            f"{'/'.join(removed)} extension kernels unregistered; nothing compiled)")


# -- measuring ------------------------------------------------------------------------------
class Clock:
    """CUDA events on CUDA (the GPU's timeline), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def now(self):
        import torch
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) * 1e-3
        return b - a


def tensors_in(obj, seen_ids=None):
    """Every plain tensor reachable from a cache layer's state (tuples, dicts, quanto's
    tensor subclasses opened through ``__tensor_flatten__``)."""
    import torch
    seen_ids = set() if seen_ids is None else seen_ids
    if id(obj) in seen_ids:
        return
    seen_ids.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            for inner in obj.__tensor_flatten__()[0]:
                yield from tensors_in(getattr(obj, inner), seen_ids)
        else:
            yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors_in(x, seen_ids)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors_in(x, seen_ids)


def held_kv_bytes(cache, device) -> int:
    """Bytes of storage the cache holds on ``device`` now."""
    if hasattr(cache, "device_kv_bytes"):
        return int(cache.device_kv_bytes())
    storages = {}
    for layer in getattr(cache, "layers", []):
        for t in tensors_in(list(vars(layer).values())):
            if t.device.type == device.type:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def make_step_hook(clock, device, cache, sample_kv: bool):
    """A logits processor: generate calls it once per new token, first right after the
    prompt's forward passes, which is where prefill ends and decode begins."""
    import torch
    from transformers import LogitsProcessor

    class StepHook(LogitsProcessor):
        def __init__(self):
            self.prefill_end = None
            self.prefill_peak = None
            self.prefill_mapped = 0
            self.kv = []

        def __call__(self, input_ids, scores):
            if self.prefill_end is None:
                self.prefill_end = clock.now()
                if device.type == "cuda":
                    self.prefill_peak = torch.cuda.max_memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)  # from here: decode's peak
                if hasattr(cache, "reset_peaks"):
                    self.prefill_mapped = getattr(cache, "l1_reserved_peak_bytes", 0)
                    cache.reset_peaks()
            if sample_kv:
                self.kv.append(held_kv_bytes(cache, device))
            return scores

    return StepHook()


def cache_kwarg() -> str:
    """transformers 5.24 renamed generate's past_key_values to cache (5.17 has only the old)."""
    from transformers.generation import utils as gen_utils
    return "cache" if "cache" in getattr(gen_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def generate_once(model, ids, cache, new_tokens: int, chunk, measure: bool) -> dict:
    import torch
    from transformers import LogitsProcessorList
    device = ids.device
    clock = Clock(device)
    hook = make_step_hook(clock, device, cache, sample_kv=measure)
    kw = {cache_kwarg(): cache, "max_new_tokens": new_tokens,
          "do_sample": False, "return_dict_in_generate": True, "output_logits": measure,
          "logits_processor": LogitsProcessorList([hook])}
    if chunk:
        kw["prefill_chunk_size"] = chunk
    base = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = clock.now()
    out = model.generate(ids, **kw)
    end = clock.now()
    r = {"prefill_s": clock.seconds(start, hook.prefill_end),
         "decode_s": clock.seconds(hook.prefill_end, end),
         "tokens": out.sequences[0, ids.shape[1]:].cpu(),
         "tokens_all": out.sequences[:, ids.shape[1]:].cpu()}
    if r["tokens"].numel() != new_tokens:
        raise RuntimeError(f"generated {r['tokens'].numel()} tokens, expected {new_tokens}")
    if measure:
        r["logits"] = [x[0].float().cpu() for x in out.logits]
        r["kv_held_peak_bytes"] = max(hook.kv)
        r["kv_held_end_bytes"] = held_kv_bytes(cache, device)
    if device.type == "cuda":
        decode_peak = torch.cuda.max_memory_allocated(device)
        # device memory outside torch's allocator: TieredCache's virtual-memory arena maps
        # its pages through the driver, so they are added (0 for every other cache)
        mapped = getattr(cache, "l1_reserved_peak_bytes", 0) if _vmm_backed(cache) else 0
        mapped_pre = hook.prefill_mapped if _vmm_backed(cache) else 0
        r["vmm_decode_peak_bytes"] = mapped
        r["cuda_peak_delta_bytes"] = max(hook.prefill_peak + mapped_pre, decode_peak + mapped) - base
        r["cuda_prefill_peak_delta_bytes"] = hook.prefill_peak + mapped_pre - base
        r["cuda_decode_peak_delta_bytes"] = decode_peak + mapped - base
        r["cuda_held_after_bytes"] = torch.cuda.memory_allocated(device) - base
    return r


def _vmm_backed(cache) -> bool:
    """Whether a TieredCache's L1 lives in driver-mapped pages (not torch's allocator)."""
    be = getattr(cache, "_backend", None)
    return be is not None and be.space("l1").arena is not None


def agreement(ref: dict, got: dict) -> dict:
    a, b = ref["tokens"], got["tokens"]
    same = (a == b)
    n = len(a)
    first = int((~same).nonzero()[0, 0]) if not bool(same.all()) else n
    # Step k's logits come from identical inputs while tokens 0..k-1 agree, so the
    # comparison runs through the first divergent token too.
    steps = range(min(first + 1, n))
    diff = max((float((ref["logits"][k] - got["logits"][k]).abs().max()) for k in steps),
               default=0.0)
    scale = max((float(ref["logits"][k].abs().max()) for k in steps), default=1.0)
    rows = (ref["tokens_all"] == got["tokens_all"]).all(dim=1)
    return {"prefix_match": first / n, "overall_match": float(same.float().mean()),
            "rows_all_equal": float(rows.float().mean()),
            "first_divergence": None if first == n else first,
            "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / scale if scale else None,
            "logit_steps_compared": len(steps)}


def median(xs):
    return statistics.median(xs) if xs else None


def release(cache, device) -> None:
    """Drop a cache; TieredCache's hooks stay on the model unless detached."""
    import torch
    if hasattr(cache, "detach"):
        cache.detach()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_cache(spec, model, ids, args) -> tuple[dict, dict | None, float]:
    """The warm-up run (the measurement run): (its result, the cache's telemetry, seconds)."""
    _, make, chunk = spec
    cache = make(model)
    t0 = time.perf_counter()
    try:
        warm = generate_once(model, ids, cache, args.new_tokens, chunk, measure=True)
        telemetry = cache.telemetry() if hasattr(cache, "telemetry") else None
    finally:
        release(cache, ids.device)
    return warm, telemetry, time.perf_counter() - t0


def timed_run(spec, model, ids, args) -> dict:
    _, make, chunk = spec
    cache = make(model)
    try:
        return generate_once(model, ids, cache, args.new_tokens, chunk, measure=False)
    finally:
        release(cache, ids.device)


def run_cache(spec, model, ids, args, ref, allowance_s: float | None) -> tuple[dict, dict]:
    """Warm-up (the measurement run), then timed runs: as many of ``args.repeats`` as
    ``allowance_s`` (this cache's share of what is left of --time-budget; None: no limit)
    has room for after the warm-up. With no room at all, the warm-up's timings are
    reported and marked as such, so that a slow cache cannot stretch the run unbounded."""
    warm, telemetry, warm_s = warm_cache(spec, model, ids, args)
    if allowance_s is None:
        repeats = args.repeats
    else:
        repeats = max(0, min(args.repeats, int((allowance_s - warm_s) // max(warm_s, 1e-9))))
    runs = [timed_run(spec, model, ids, args) for _ in range(repeats)]
    return cache_entry(spec, warm, telemetry, warm_s, runs, ids, args, ref), warm


def cache_entry(spec, warm, telemetry, warm_s: float, runs: list, ids, args, ref) -> dict:
    """One cache's figures from its warm-up and its timed runs."""
    settings, _, chunk = spec
    entry = {"settings": settings, "prefill_chunk": chunk}
    device = ids.device
    repeats = len(runs)
    timed = runs or [warm]
    prefill = [r["prefill_s"] for r in timed]
    decode = [r["decode_s"] for r in timed]
    entry.update({
        "status": "ok", "warmup_s": warm_s, "repeats_run": repeats,
        "timed_from": "repeats" if runs else "the warm-up run (no --time-budget left for repeats)",
        "prefill_s": median(prefill), "prefill_s_all": prefill,
        "decode_s": median(decode), "decode_s_all": decode,
        "prefill_tokens_per_s": ids.shape[1] / median(prefill),
        "decode_tokens_per_s": (args.new_tokens - 1) / median(decode),
        "decode_tokens_per_s_batch": ids.shape[0] * (args.new_tokens - 1) / median(decode),
        "kv_held_peak_bytes": warm["kv_held_peak_bytes"],
        "kv_held_end_bytes": warm["kv_held_end_bytes"]})
    if device.type == "cuda":
        for k in ("cuda_peak_delta_bytes", "cuda_prefill_peak_delta_bytes",
                  "cuda_decode_peak_delta_bytes", "cuda_held_after_bytes", "vmm_decode_peak_bytes"):
            entry[k] = max(r[k] for r in timed)
    if telemetry is not None:
        entry["l1_peak_bytes"] = telemetry.get("l1_peak_bytes")
        entry["l1_budget_bytes"] = telemetry.get("l1_budget_bytes")
        entry["telemetry"] = {k: telemetry.get(k) for k in (
            "l1_budget_tokens", "l1_peak_bytes", "l1_hit_rate", "evictions", "demotions", "drops",
            "forced_evictions", "fetches", "prefetches", "bytes_h2d", "bytes_d2h", "int4_rel_rmse",
            "stall_s", "l1_arena", "l1_reserved_peak_bytes", "vmm", "read_through")}
    entry["agreement"] = agreement(ref, warm) if ref is not None else None
    return entry


# -- report ---------------------------------------------------------------------------------
def versions(device) -> dict:
    import importlib.metadata as md
    import torch
    import transformers
    v = {"python": platform.python_version(), "torch": torch.__version__,
         "transformers": transformers.__version__, "platform": platform.platform(),
         "device": torch.cuda.get_device_name(device) if device.type == "cuda"
         else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{torch.get_num_threads()} torch threads)"}
    for dist in ("optimum-quanto", "hqq", "accelerate"):
        try:
            v[dist] = md.version(dist)
        except md.PackageNotFoundError:
            v[dist] = None
    v["synapse_commit"] = git_commit()
    return v


def git_commit() -> str | None:
    """HEAD of this checkout, "+dirty" with local changes; None where there is no git."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def print_table(res: dict) -> None:
    cuda = res["config"]["device"] == "cuda"
    head = ["cache", "runs", "prefill s", "decode tok/s", "KV held MiB", "L1 peak MiB"]
    head += ["CUDA peak MiB", "decode peak MiB"] if cuda else []
    head += ["prefix", "overall", "max|dlogit|"]
    rows = []
    notes = []
    for name, e in res["caches"].items():
        if e["status"] != "ok":
            notes.append(f"{name}: {e['status']}")
            continue
        ag = e.get("agreement") or {}
        runs = str(e["repeats_run"]) if e["repeats_run"] else "warm-up"
        row = [name, runs, fmt(e["prefill_s"], ".3f"), fmt(e["decode_tokens_per_s"], ".2f"),
               mib(e["kv_held_peak_bytes"]), mib(e.get("l1_peak_bytes"))]
        if cuda:
            row += [mib(e.get("cuda_peak_delta_bytes")), mib(e.get("cuda_decode_peak_delta_bytes"))]
        row += [fmt(ag.get("prefix_match"), ".3f"), fmt(ag.get("overall_match"), ".3f"),
                fmt(ag.get("max_abs_logit_diff"), ".2e")]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:  # names left-aligned, figures right-aligned
        cells = [str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells))
    for n in notes:
        print(n)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "hf_caches.json" if out else Path("hf_caches.json")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="default 1024 on CPU, 8192 on CUDA, 128 with --tiny")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64, 16 with --tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a very small model: a dry run in seconds")
    ap.add_argument("--model", choices=("llama", "qwen2"), default="llama",
                    help="llama: 16 layers, 8 KV heads (the 2026-11-27 runs); qwen2: 16 layers, "
                         "4 KV heads, grouped-query attention (issue 11's shape)")
    ap.add_argument("--caches", default=",".join(CACHES), help=f"comma list of {', '.join(CACHES)}")
    ap.add_argument("--time-budget", type=float, default=160.0,
                    help="seconds the whole run should take: each cache's timed repeats are cut "
                         "to its share of what is left (0: no limit)")
    ap.add_argument("--quanto-unpack", choices=("torch", "extension"), default="torch")
    ap.add_argument("--batch", type=int, default=1,
                    help="sequences per generate (equal-length prompts); above 1 the caches "
                         "also run at batch 1 for the per-sequence ratio goal")
    ap.add_argument("--no-batch1", action="store_true",
                    help="with --batch > 1: skip the batch-1 reference runs")
    ap.add_argument("--sdpa-priority", default=None,
                    help="comma list of SDPA backends tried first, in order, for every cache "
                         "alike (flash, cudnn, efficient, math; torch's sdpa_kernel with "
                         "set_priority): what the decode step's attention kernel choice costs. "
                         "Default: SDPA's own choice")
    ap.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved: every cache's warm-up, then rounds of one timed run of "
                         "each (a drifting host slows all alike); sequential: each cache's "
                         "warm-up and repeats before the next cache's")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    if a.sdpa_priority is not None:
        got = [x for x in a.sdpa_priority.split(",") if x]
        if not got or set(got) - set(names):
            ap.error(f"--sdpa-priority: got {a.sdpa_priority!r}, expected a comma list of "
                     f"{', '.join(names)}")
        a.sdpa_priority = [names[x] for x in got]
    a.prompt_tokens = a.prompt_tokens or (128 if a.tiny else 8192 if a.device == "cuda" else 1024)
    a.new_tokens = a.new_tokens or (16 if a.tiny else 64)
    if a.batch < 1:
        ap.error(f"--batch must be at least 1, got {a.batch}")
    if a.new_tokens < 2 or a.repeats < 1:
        ap.error("--new-tokens must be at least 2 (one prefill token, one decode step) and "
                 "--repeats at least 1")
    a.caches = [c for c in a.caches.split(",") if c]
    unknown = set(a.caches) - set(CACHES)
    if unknown:
        ap.error(f"unknown caches {sorted(unknown)}; choose from {', '.join(CACHES)}")
    if "dynamic" not in a.caches:
        a.caches.insert(0, "dynamic")  # the reference for agreement
    return a


METHOD = {
    "prefill": "start of generate to the first logits-processor call",
    "decode": "first logits-processor call to the end of generate (new_tokens - 1 forward "
              "passes); tokens/s = (new_tokens - 1) / decode_s; median over the timed runs",
    "kv_held": "storage bytes of the tensors the cache object holds on the model's device, "
               "walked after every token of the warm-up run (max and at the end); TieredCache: "
               "its device_kv_bytes() (L1 blocks)",
    "cuda_peak": "max_memory_allocated minus memory_allocated before generate (weights, "
                 "prompt), whole run and decode only; max over the timed runs",
    "agreement": "greedy tokens and raw logits (output_logits) against dynamic's warm-up run",
}


def describe(a, cfg, model, device) -> dict:
    """The JSON's header: versions, model, sizes, settings, how things were measured."""
    p = next(model.parameters())
    context = a.prompt_tokens + a.new_tokens
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_full = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context
    model_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim")
    config = {"device": device.type, "tiny": a.tiny, "dtype": str(p.dtype),
              "model": {k: getattr(cfg, k, None) for k in model_keys} | {
                  "model_type": cfg.model_type, "head_dim": head_dim},
              "weights_bytes": sum(q.numel() * q.element_size() for q in model.parameters()),
              "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
              "context_tokens": context, "kv_bytes_full_precision": kv_full * p.element_size(),
              "repeats": a.repeats, "time_budget_s": a.time_budget,
              "block_tokens": BLOCK_TOKENS, "seed": SEED, "batch": a.batch,
              "attn_implementation": getattr(cfg, "_attn_implementation", None),
              "generate_cache_argument": cache_kwarg()}
    timing = "CUDA events" if device.type == "cuda" else "time.perf_counter"
    return {"benchmark": "hf_caches", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [sys.executable] + sys.argv, "versions": versions(device),
            "config": config, "method": {"timing": timing, **METHOD}, "caches": {}}


def goals(res: dict) -> list[dict]:
    """Issue 11's targets, from this run's figures (the same measure for every cache)."""
    c = res["caches"]

    def ok(name):
        return c.get(name, {}).get("status") == "ok"

    out = []

    def ratio(name, key, ref="dynamic"):
        return c[name][key] / c[ref][key] if ok(name) and ok(ref) else None

    def add(goal, value, met, text):
        out.append({"goal": goal, "value": value, "met": met if value is not None else None,
                    "measured": text if value is not None else "a cache did not run"})

    b1 = res.get("batch1_caches") or {}
    for name in ("tiered_full", "tiered_h2o", "tiered_lru"):
        rb = ratio(name, "decode_tokens_per_s")
        ok1 = all(b1.get(k, {}).get("status") == "ok" for k in (name, "dynamic"))
        if rb is None or not ok1:
            continue
        r1 = b1[name]["decode_tokens_per_s"] / b1["dynamic"]["decode_tokens_per_s"]
        add(f"{name} at batch {res['config']['batch']}: decode/s per sequence vs dynamic "
            f"within 10% of batch 1's ratio", rb / r1, rb >= 0.9 * r1,
            f"{rb:.3f}x at batch {res['config']['batch']}, {r1:.3f}x at batch 1")
    r = ratio("tiered_full", "decode_tokens_per_s")
    add("tiered_full decode >= 0.95x dynamic", r, r is not None and r >= 0.95, f"{r:.3f}x" if r else "")
    r = ratio("tiered_full", "prefill_s")
    add("tiered_full prefill within 1.1x dynamic", r, r is not None and r <= 1.1, f"{r:.3f}x" if r else "")
    r = ratio("tiered_h2o", "decode_tokens_per_s")
    add("tiered_h2o decode >= 0.8x dynamic", r, r is not None and r >= 0.8, f"{r:.3f}x" if r else "")
    r2 = ratio("tiered_h2o", "decode_tokens_per_s", "offloaded")
    add("tiered_h2o decode >= offloaded", r2, r2 is not None and r2 >= 1.0, f"{r2:.3f}x" if r2 else "")
    r = ratio("tiered_h2o", "prefill_s")
    add("tiered_h2o prefill within 1.5x dynamic", r, r is not None and r <= 1.5, f"{r:.3f}x" if r else "")
    if res["config"]["device"] == "cuda" and ok("tiered_h2o") and ok("dynamic"):
        kv = res["config"]["kv_bytes_full_precision"]
        saved = c["dynamic"]["cuda_decode_peak_delta_bytes"] - c["tiered_h2o"]["cuda_decode_peak_delta_bytes"]
        add("tiered_h2o decode peak below dynamic's by >= 60% of the full KV", saved / kv,
            saved >= 0.6 * kv, f"{saved / 2**20:.0f} MiB = {saved / kv:.2f} of the full KV "
                               f"({kv / 2**20:.0f} MiB)")
    return out


def not_run_reason(name: str, exc: Exception, device) -> str:
    msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    if name == "fp8" and "Unknown quantization backend" in msg:
        import transformers
        msg += f" (transformers {transformers.__version__}'s QuantizedCache has no fp8 backend)"
    if name == "offloaded" and device.type != "cuda":
        msg += (" (DynamicCache(offloading=True) calls torch.cuda.default_stream in "
                "Cache.update, transformers/cache_utils.py: it needs CUDA)")
    return f"not run: {msg}"


def skipped(name: str, out: dict) -> bool:
    """Whether ``name`` cannot run here (its peer library missing): recorded in ``out``."""
    why = backend_missing(name)
    if why is not None:
        out[name] = {"status": f"not run: {why}"}
        print(f"{name}: not run: {why}", flush=True)
    return why is not None


def run_all(a, model, ids, specs, res, t_start, section: str = "caches",
            runs_after: int = 0) -> None:
    """Every cache in turn, dynamic first (the reference); failures are recorded in
    ``res[section]``. ``runs_after``: cache runs still to come after this section (their
    share of --time-budget is kept for them). ``--order interleaved``: see
    ``run_interleaved``."""
    if a.order == "interleaved":
        return run_interleaved(a, model, ids, specs, res, t_start, section, runs_after)
    ref = None
    res.setdefault(section, {})
    for i, name in enumerate(a.caches):
        left = a.time_budget - (time.perf_counter() - t_start)
        allowance = left / (len(a.caches) - i + runs_after) if a.time_budget > 0 else None
        if skipped(name, res[section]):
            continue
        try:
            entry, warm = run_cache(specs[name], model, ids, a, ref, allowance)
        except Exception as e:  # noqa: BLE001 (recorded, the other caches still run)
            if name == "dynamic":
                raise  # no reference, nothing to compare with
            res[section][name] = {"settings": specs[name][0],
                                  "status": not_run_reason(name, e, ids.device)}
            print(f"{name}: {res[section][name]['status']}", flush=True)
            continue
        if name == "dynamic":
            ref = warm
        if name == "quanto":
            entry["unpack"] = res["config"].get("quanto_unpack")
        res[section][name] = entry
        print(f"[batch {ids.shape[0]}] {name}: prefill {entry['prefill_s']:.3f} s, decode "
              f"{entry['decode_tokens_per_s']:.2f} tok/s, {entry['repeats_run']} repeats", flush=True)


def run_interleaved(a, model, ids, specs, res, t_start, section: str, runs_after: int) -> None:
    """Every cache's warm-up in turn (dynamic first), then the timed runs in rounds, one
    run of every cache a round, each round starting one cache later: a host whose speed
    drifts during the run (other tenants of a shared machine) slows every cache's repeats
    alike, instead of whichever cache ran during the slow spell. A round starts while
    --time-budget has room for it (the warm-ups' durations are the estimate)."""
    res.setdefault(section, {})
    ref, warm = None, {}
    for name in a.caches:
        if skipped(name, res[section]):
            continue
        try:
            warm[name] = warm_cache(specs[name], model, ids, a)
        except Exception as e:  # noqa: BLE001 (recorded, the other caches still run)
            if name == "dynamic":
                raise
            res[section][name] = {"settings": specs[name][0],
                                  "status": not_run_reason(name, e, ids.device)}
            print(f"{name}: {res[section][name]['status']}", flush=True)
            continue
        if name == "dynamic":
            ref = warm[name][0]
    names = list(warm)
    runs = {n: [] for n in names}
    round_s = sum(w[2] for w in warm.values())
    for r in range(a.repeats):
        left = a.time_budget - (time.perf_counter() - t_start)
        if a.time_budget > 0 and left - runs_after * round_s / max(len(names), 1) < round_s:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in warm:
                continue
            try:
                runs[name].append(timed_run(specs[name], model, ids, a))
            except Exception as e:  # noqa: BLE001
                if name == "dynamic":
                    raise
                res[section][name] = {"settings": specs[name][0],
                                      "status": not_run_reason(name, e, ids.device)}
                del warm[name]
    for name in names:
        if name not in warm:
            continue
        w, telemetry, warm_s = warm[name]
        entry = cache_entry(specs[name], w, telemetry, warm_s, runs[name], ids, a,
                            None if name == "dynamic" else ref)
        if name == "quanto":
            entry["unpack"] = res["config"].get("quanto_unpack")
        res[section][name] = entry
        print(f"[batch {ids.shape[0]}] {name}: prefill {entry['prefill_s']:.3f} s, decode "
              f"{entry['decode_tokens_per_s']:.2f} tok/s, {entry['repeats_run']} repeats", flush=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    t_start = time.perf_counter()
    cfg = model_config(device.type, a.tiny, a.model, a.prompt_tokens + a.new_tokens)
    model = build_model(cfg, device)
    ids = make_prompt(cfg, a.prompt_tokens, device, a.batch)
    context = a.prompt_tokens + a.new_tokens
    specs = cache_specs(cfg, device, context, a.prompt_tokens, a.batch)
    res = describe(a, cfg, model, device)
    # read once per process by torch's cuDNN attention: whether it keys its plans on the key
    # length rounded up to a power of two (q, k, v in BSHD memory only; see
    # decode_sdpa_calls.py), for every cache of this run alike
    res["config"]["env"] = {k: os.environ.get(k) for k in ("TORCH_CUDNN_SDPA_AVOID_RECOMPILE",)}
    res["config"]["order"] = a.order  # interleaved rounds of timed runs, or cache by cache
    if "quanto" in a.caches and backend_missing("quanto") is None:
        res["config"]["quanto_unpack"] = (
            route_quanto_unpack_to_torch() if a.quanto_unpack == "torch"
            else "extension (quanto's JIT-compiled kernels)")
    with_b1 = a.batch > 1 and not a.no_batch1
    kernels = contextlib.nullcontext()
    if a.sdpa_priority:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        order = [getattr(SDPBackend, n) for n in a.sdpa_priority]
        rest = [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b not in order]
        kernels = sdpa_kernel(order + rest, set_priority=True)  # the rest after: a fallback
        res["config"]["sdpa_priority"] = [b.name for b in order + rest]
    with kernels:
        run_all(a, model, ids, specs, res, t_start, runs_after=len(a.caches) if with_b1 else 0)
        if with_b1:
            run_all(a, model, ids[:1], cache_specs(cfg, device, context, a.prompt_tokens), res,
                    t_start, section="batch1_caches")
    res["goals"] = goals(res)
    res["total_s"] = time.perf_counter() - t_start
    out_path = a.out or default_out()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print_table(res)
    for g in res["goals"]:
        print(f"goal {g['goal']}: {g['measured']} -> {'met' if g['met'] else 'MISSED'}"
              if g["met"] is not None else f"goal {g['goal']}: not measured ({g['measured']})")
    print(f"\nwrote {out_path} ({res['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
