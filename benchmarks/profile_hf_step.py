"""Where a decode step's time goes: torch.profiler over a few decode steps of one cache
(CPU-side op counts and times, CUDA kernel times), for the KV engine's tuning.

    python benchmarks/profile_hf_step.py --cache tiered_full --prompt-tokens 32768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="tiered_full")
    ap.add_argument("--model", default="qwen2")
    ap.add_argument("--prompt-tokens", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--phase", choices=("decode", "prefill", "generate"), default="decode")
    a = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    import hf_caches as hc
    device = torch.device("cuda")
    cfg = hc.model_config("cuda", False, a.model, a.prompt_tokens + a.new_tokens)
    model = hc.build_model(cfg, device)
    ids = hc.make_prompt(cfg, a.prompt_tokens, device)
    specs = hc.cache_specs(cfg, device, a.prompt_tokens + a.new_tokens, a.prompt_tokens)
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
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(a.new_tokens):
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        elif a.phase == "generate":  # Python hot spots of a whole generate(), cProfile
            import cProfile
            import pstats
            pr = cProfile.Profile()
            torch.cuda.synchronize()
            pr.enable()
            model.generate(ids, past_key_values=cache, **kw)
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(a.rows)
            return 0
        else:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False,
                               **({"prefill_chunk_size": chunk} if chunk else {}))
                torch.cuda.synchronize()
        if a.phase == "decode":  # Python-level hot spots of the same steps
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.new_tokens):
                out = model(nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    print(f"=== {a.cache} {a.phase}: {a.new_tokens if a.phase == 'decode' else 1} steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
