"""Where a decode step's time goes: torch.profiler over a few decode steps of one cache
(op counts per step, CPU-side times, CUDA kernel times), for the KV engine's tuning.

HF decode is host-bound: every torch op a cache adds per layer costs host time, so the
figure to watch is the op count per step (``ops/step``: top-level torch ops, i.e. the
ones a Python call dispatched, not the ones nested inside them; ``all events/step``
counts nested ones too). ``--phase decode`` prints both, and the top ops by count.

    python benchmarks/profile_hf_step.py --cache tiered_full --prompt-tokens 32768
    python benchmarks/profile_hf_step.py --device cpu --tiny --cache tiered_h2o --batch 8

``--fused-scores`` runs the prefill's scores on the fused two-pass path on the CPU too
(the ops the GPU runs; the CPU's default is the direct q.K^T). ``--sync-debug`` (CUDA)
counts the calls that make the host wait on the device, by the line that made them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def op_counts(prof, steps: int) -> dict:
    """Top-level and all op events per step, and the top-level ones by name."""
    top, every = collections.Counter(), 0
    for e in prof.events():
        if e.device_type.name != "CPU" or e.name.startswith("ProfilerStep"):
            continue
        every += 1
        parent = e.cpu_parent
        while parent is not None and parent.name.startswith("ProfilerStep"):
            parent = parent.cpu_parent
        if parent is None:
            top[e.name] += 1
    return {"ops_per_step": sum(top.values()) / steps, "events_per_step": every / steps,
            "top_ops_per_step": {k: v / steps for k, v in top.most_common(25)}}


@contextlib.contextmanager
def sync_sites(on: bool):
    """A Counter of the synchronising calls made in the block, by the innermost frame of
    this repository (or of transformers) that made them; None when ``on`` is false."""
    if not on:
        yield None
        return
    import torch
    sites = collections.Counter()
    root = str(Path(__file__).resolve().parents[1])

    def seen(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if (f.filename.startswith(root) and "/.venv/" not in f.filename)
                  or "transformers" in f.filename]
        f = frames[-1] if frames else traceback.extract_stack()[-2]
        sites[f"{Path(f.filename).name}:{f.lineno} {f.line}"] += 1
    shown = warnings.showwarning
    warnings.showwarning = seen
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = seen
            yield sites
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown


@contextlib.contextmanager
def op_sites(on: bool):
    """Counter of torch calls by the innermost synapse line on the stack (None if off)."""
    if not on:
        yield None
        return
    from torch.overrides import TorchFunctionMode
    root = str(Path(__file__).resolve().parents[1] / "synapse")
    sites = collections.Counter()

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") != "__get__":
                st = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(root)]
                where = (f"{Path(st[-1].filename).relative_to(root)}:{st[-1].lineno} {st[-1].name}"
                         if st else "(not synapse)")
                sites[where] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        yield sites


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="tiered_full", help="a cache of hf_caches.py")
    ap.add_argument("--model", default="qwen2", choices=("llama", "qwen2"))
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="hf_caches.py's tiny model")
    ap.add_argument("--batch", type=int, default=1, help="sequences (equal-length prompts)")
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=12, help="decode steps profiled")
    ap.add_argument("--rows", type=int, default=30, help="rows of each table")
    ap.add_argument("--phase", choices=("decode", "prefill", "generate"), default="decode")
    ap.add_argument("--no-cprofile", action="store_true", help="decode: skip the cProfile table")
    ap.add_argument("--json", type=Path, default=None, help="decode: write the op counts here")
    ap.add_argument("--fused-scores", action="store_true",
                    help="score prefill chunks on the fused path on the CPU too")
    ap.add_argument("--op-sites", action="store_true",
                    help="count the phase's torch calls by the synapse line that made them "
                         "(TorchFunctionMode; a separate run of the same phase)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="CUDA: count host-device synchronisations of the profiled phase by "
                         "call site (torch.cuda.set_sync_debug_mode)")
    a = ap.parse_args(argv)
    if a.batch < 1 or a.new_tokens < 1 or a.prompt_tokens < 1:
        ap.error("--batch, --new-tokens and --prompt-tokens must be at least 1")
    import torch
    from torch.profiler import ProfilerActivity, profile
    import hf_caches as hc
    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if a.fused_scores:
        from synapse.hf import scores
        scores.FUSED_DEVICES.add(device.type)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the context the caches are sized for: the prompt, its first token and the profiled
    # steps (twice with cProfile), as hf_caches.py sizes them for its run
    context = a.prompt_tokens + 1 + 2 * a.new_tokens
    cfg = hc.model_config(device.type, a.tiny, a.model, context)
    model = hc.build_model(cfg, device)
    ids = hc.make_prompt(cfg, a.prompt_tokens, device, a.batch)
    specs = hc.cache_specs(cfg, device, context, a.prompt_tokens, a.batch)
    if a.cache not in specs:
        ap.error(f"unknown cache {a.cache!r}; choose from {', '.join(specs)}")
    _, make, chunk = specs[a.cache]
    kw = {"max_new_tokens": a.new_tokens, "do_sample": False}
    if chunk:
        kw["prefill_chunk_size"] = chunk
    with torch.no_grad():
        model.generate(ids, past_key_values=make(model), **kw)  # warm-up
        cache = make(model)
        if a.phase == "decode":
            model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False,
                           **({"prefill_chunk_size": chunk} if chunk else {}))
            nxt = ids[:, -1:]
            mask = torch.ones((a.batch, ids.shape[1]), dtype=torch.long, device=device)

            def step(nxt, mask):  # as generate feeds a decode step: the mask grows by one
                mask = torch.cat((mask, mask.new_ones((a.batch, 1))), dim=1)
                out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                return out.logits[:, -1:].argmax(-1), mask
            sync()
            with profile(activities=acts) as prof:
                with sync_sites(a.sync_debug and cuda) as sites:
                    for _ in range(a.new_tokens):
                        nxt, mask = step(nxt, mask)
                sync()
            if sites is not None:
                print(f"=== host-device synchronisations: {sum(sites.values())}")
                for where, n in sites.most_common(a.rows):
                    print(f"  {n:6d}  {where}")
        elif a.phase == "generate":  # Python hot spots of a whole generate(), cProfile
            import cProfile
            import pstats
            pr = cProfile.Profile()
            sync()
            pr.enable()
            model.generate(ids, past_key_values=cache, **kw)
            sync()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(a.rows)
            return 0
        else:
            with profile(activities=acts) as prof:
                with sync_sites(a.sync_debug and cuda) as sites:
                    model.generate(ids, past_key_values=cache, max_new_tokens=1,
                                   do_sample=False,
                                   **({"prefill_chunk_size": chunk} if chunk else {}))
                sync()
            if sites is not None:
                print(f"=== host-device synchronisations: {sum(sites.values())}")
                for where, n in sites.most_common(a.rows):
                    print(f"  {n:6d}  {where}")
        if a.op_sites:  # the same phase once more, its torch calls counted by call site
            with op_sites(True) as sites:
                if a.phase == "decode":
                    for _ in range(a.new_tokens):
                        nxt, mask = step(nxt, mask)
                else:
                    model.generate(ids, past_key_values=make(model), max_new_tokens=1,
                                   do_sample=False,
                                   **({"prefill_chunk_size": chunk} if chunk else {}))
                sync()
            n = a.new_tokens if a.phase == "decode" else 1
            print(f"=== torch calls by call site, per step: {sum(sites.values()) / n:.1f}")
            for where, k in sites.most_common(a.rows):
                print(f"  {k / n:9.1f}  {where}")
        if a.phase == "decode" and not a.no_cprofile:  # Python hot spots of the same steps
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.new_tokens):
                nxt, mask = step(nxt, mask)
            sync()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
            # the cache's own Python, cumulative: what a step spends in synapse's calls
            pstats.Stats(pr).sort_stats("cumtime").print_stats("synapse/", 30)
    steps = a.new_tokens if a.phase == "decode" else 1
    print(f"=== {a.cache} {a.phase} batch {a.batch}: {steps} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    if cuda:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    counts = op_counts(prof, steps)
    layers = cfg.num_hidden_layers
    print(f"ops/step {counts['ops_per_step']:.1f} (top-level torch ops; "
          f"{counts['ops_per_step'] / layers:.1f} per layer of {layers}), "
          f"all events/step {counts['events_per_step']:.1f}")
    for name, n in counts["top_ops_per_step"].items():
        print(f"  {n:8.1f}  {name}")
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"cache": a.cache, "batch": a.batch, "device": a.device,
                                      "tiny": a.tiny, "model": a.model, "layers": layers,
                                      "prompt_tokens": a.prompt_tokens, "steps": steps,
                                      **counts}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
