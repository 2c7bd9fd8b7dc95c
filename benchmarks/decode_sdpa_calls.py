"""What each decode step's attention calls cost the host, per cache, as the model makes them.

``decode_attention_kernels.py`` times SDPA on inputs it builds itself; this one records the
calls a model's decode steps really make (``torch.nn.functional.scaled_dot_product_attention``
wrapped while the steps run): the inputs' shapes and strides, the mask, ``is_causal``,
``enable_gqa``, and the host time of every call by its layer, so that a per-shape plan
build (cuDNN keys its plans on the key length: one new length a step) shows as the step's
first layer costing more than the rest. Also the whole step's wall time (synchronised).
A ``TieredCache``'s CUDA decode steps run on ``synapse.hf.decode_attention`` (flash,
called as an aten op): they are recorded at that function's entry instead.

``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` (torch >= 2.9, read once per process) makes cuDNN
key its plans on the key length rounded up to a power of two, for inputs whose q, k, v
and output are all BSHD in memory (``x.transpose(1, 2).is_contiguous()``), which
``TieredCache``'s arena views are and ``DynamicCache``'s concatenated tensors are not.
``--avoid-recompile`` sets it before torch loads (the JSON records which).

    python benchmarks/decode_sdpa_calls.py --out $OUT/decode_sdpa_calls.json
    python benchmarks/decode_sdpa_calls.py --avoid-recompile --out $OUT/decode_sdpa_calls_ar.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def meta(t) -> list | None:
    if t is None:
        return None
    return [list(t.shape), list(t.stride()), str(t.dtype).replace("torch.", "")]


def attention_kernels(model, nxt, mask, cache, device) -> dict:
    """One more decode step under torch.profiler: the device kernels whose names say
    attention, with their counts (which SDPA backend the step ran)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    if device.type != "cuda":
        return {}
    mask = torch.cat((mask, mask.new_ones((1, 1))), dim=1)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
    names: dict = {}
    for e in prof.events():
        low = e.name.lower()
        if e.device_type.name == "CUDA" and any(w in low for w in
                                                ("attn", "sdpa", "flash", "fmha", "mha", "attention")):
            names[e.name[:120]] = names.get(e.name[:120], 0) + 1
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caches", default="dynamic,tiered_full,tiered_h2o")
    ap.add_argument("--model", default="qwen2", choices=("llama", "qwen2"))
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tiny", action="store_true", help="hf_caches.py's tiny model (a dry run)")
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32, help="decode steps recorded per cache")
    ap.add_argument("--avoid-recompile", action="store_true", help=f"set {ENV}=1 first")
    ap.add_argument("--via", choices=("forward", "generate"), default="forward",
                    help="decode steps as model(...) calls (timed one by one) or inside one "
                         "model.generate (as hf_caches.py times them; steps not timed)")
    ap.add_argument("--backend", choices=("default", "cudnn", "flash"), default="default",
                    help="SDPA's own choice, or one backend forced for every call")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.steps < 2 or a.prompt_tokens < 1:
        ap.error("--steps must be at least 2 and --prompt-tokens at least 1")
    names = [c for c in a.caches.split(",") if c]
    import hf_caches as hc
    bad = [c for c in names if c not in hc.CACHES]
    if bad or not names:
        ap.error(f"--caches: {bad or a.caches!r} not among {', '.join(hc.CACHES)}")
    if a.avoid_recompile:
        os.environ[ENV] = "1"
    import torch
    import torch.nn.functional as F
    if a.device == "cuda" and not torch.cuda.is_available():
        print("decode_sdpa_calls.py: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    context = a.prompt_tokens + 2 * a.steps + 8
    cfg = hc.model_config(device.type, a.tiny, a.model, context)
    layers = cfg.num_hidden_layers
    model = hc.build_model(cfg, device)
    ids = hc.make_prompt(cfg, a.prompt_tokens, device, 1)
    specs = hc.cache_specs(cfg, device, context, a.prompt_tokens, 1)
    res = {"benchmark": "decode_sdpa_calls", "env": {ENV: os.environ.get(ENV)},
           "torch": torch.__version__, "device": (torch.cuda.get_device_name(device)
                                                  if device.type == "cuda" else "cpu"),
           "model": a.model, "tiny": a.tiny, "layers": layers, "prompt_tokens": a.prompt_tokens,
           "steps": a.steps, "caches": {}}
    real = F.scaled_dot_product_attention
    calls: list = []

    inner = []  # set while a DECODE_SDPA call runs: its fallback is that call, not another

    def recorded(q, k, v, attn_mask=None, *args, **kwargs):
        t0 = time.perf_counter()
        o = real(q, k, v, attn_mask, *args, **kwargs)
        if q.shape[-2] == 1 and not inner:  # decode steps only
            calls.append((time.perf_counter() - t0, q, k, v, attn_mask, args, kwargs))
        return o

    # a TieredCache's CUDA decode steps go to synapse.hf.decode_attention (flash, called
    # as an aten op): recorded at its entry, the same way
    from transformers import AttentionInterface
    from synapse.hf import decode_attention as da
    da.register()
    real_da = da.decode_attention

    def recorded_da(module, q, k, v, mask, *args, **kwargs):
        t0 = time.perf_counter()
        inner.append(1)
        try:
            o = real_da(module, q, k, v, mask, *args, **kwargs)
        finally:
            inner.pop()
        if q.shape[-2] == 1:
            calls.append((time.perf_counter() - t0, q, k, v, mask, args,
                          {"via": da.DECODE_SDPA, **kwargs}))
        return o

    AttentionInterface.register(da.DECODE_SDPA, recorded_da)

    import contextlib
    from torch.nn.attention import SDPBackend, sdpa_kernel
    forced = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "flash": SDPBackend.FLASH_ATTENTION}[a.backend]
    res["via"], res["backend"] = a.via, a.backend

    for name in names:
        if name not in specs:
            ap.error(f"unknown cache {name!r}; choose from {', '.join(specs)}")
        _, make, chunk = specs[name]
        gen = {"prefill_chunk_size": chunk} if chunk else {}
        with torch.no_grad():
            cache = make(model)
            model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False, **gen)
            nxt = ids[:, -1:]
            mask = torch.ones((1, ids.shape[1]), dtype=torch.long, device=device)
            walls = []
            F.scaled_dot_product_attention = recorded
            ctx = sdpa_kernel([forced]) if forced is not None else contextlib.nullcontext()
            try:
                with ctx:
                    if a.via == "generate":
                        calls.clear()
                        sync()
                        t0 = time.perf_counter()
                        model.generate(ids, past_key_values=make(model), max_new_tokens=a.steps + 3,
                                       do_sample=False, **gen)
                        sync()
                        walls.append((time.perf_counter() - t0) / (a.steps + 2))
                        del calls[: 2 * layers]  # the first two decode steps
                        del calls[a.steps * layers:]
                    for i in range(a.steps + 2 if a.via == "forward" else 0):
                        if i == 2:
                            calls.clear()
                        sync()
                        t0 = time.perf_counter()
                        mask = torch.cat((mask, mask.new_ones((1, 1))), dim=1)
                        out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                        nxt = out.logits[:, -1:].argmax(-1)
                        sync()
                        if i >= 2:
                            walls.append(time.perf_counter() - t0)
            finally:
                F.scaled_dot_product_attention = real
            kept = list(calls)
            with (sdpa_kernel([forced]) if forced is not None else contextlib.nullcontext()):
                kernels = attention_kernels(model, nxt, mask, cache, device)
            calls[:] = kept
        if len(calls) != a.steps * layers:
            res["caches"][name] = {"error": f"{len(calls)} attention calls recorded for "
                                            f"{a.steps} steps of {layers} layers"}
            print(f"{name}: {res['caches'][name]['error']}")
            calls.clear()
            continue
        per_layer = [[calls[s * layers + j][0] for s in range(a.steps)] for j in range(layers)]
        _, q, k, v, m, args, kw = calls[0]
        bshd = all(t.dim() == 4 and t.transpose(1, 2).is_contiguous() for t in (q, k, v))
        r = {"step_wall_ms_median": statistics.median(walls) * 1e3,
             "attention_host_ms_per_step": sum(c[0] for c in calls) / a.steps * 1e3,
             "first_layer_host_us_median": statistics.median(per_layer[0]) * 1e6,
             "other_layers_host_us_median": statistics.median(
                 [t for row in per_layer[1:] for t in row]) * 1e6,
             "host_us_median_by_layer": [statistics.median(row) * 1e6 for row in per_layer],
             "call": {"q": meta(q), "k": meta(k), "v": meta(v), "mask": meta(m),
                      "args": [repr(x) for x in args],
                      "kwargs": {key: repr(val) for key, val in kw.items()},
                      "qkv_bshd": bshd},
             "attention_kernels_one_step": kernels}
        res["caches"][name] = r
        print(f"{name:12s} step {r['step_wall_ms_median']:7.2f} ms, attention host "
              f"{r['attention_host_ms_per_step']:6.2f} ms/step; layer 0 "
              f"{r['first_layer_host_us_median']:8.1f} us, layers 1+ "
              f"{r['other_layers_host_us_median']:7.1f} us; q/k/v BSHD {bshd}; mask "
              f"{meta(m)}; kwargs {r['call']['kwargs']}")
        calls.clear()
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
