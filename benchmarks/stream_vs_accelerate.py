"""synapse.stream versus Accelerate's cpu_offload on a random LlamaForCausalLM.

The model is built from a config (no download) with random fp16 weights, about 8 GB by
default, on the host. Three ways to run the same forward passes (one token, no KV cache,
so every pass reads every weight):

- resident: the whole model on the GPU, if it fits (the reference output);
- synapse.stream: decoder layers through a ring of ``budget - resident`` bytes, where
  ``budget`` = model bytes / 4 (embeddings, final norm and head resident);
- accelerate.cpu_offload(model, execution_device): Accelerate's documented way to run a
  model larger than VRAM (weights on the CPU, each submodule's weights moved in when it
  runs).

Each runs one warm-up pass, then ``--passes`` timed passes (CUDA events around each).
Effective bandwidth = weight bytes copied host-to-device / time of the passes; the pinned
host-to-device peak is measured in the same run (256 MiB copies) for the fraction.
Outputs are compared (exact equality and max abs difference) with the resident run where
it ran, else between the two streamed runs. Writes JSON to ``--out`` (or $OUT).

    python benchmarks/stream_vs_accelerate.py --out $OUT/stream_vs_accelerate.json
    python benchmarks/stream_vs_accelerate.py --device cpu --tiny --out /tmp/s.json  # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(tiny: bool, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384,
                          num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, tie_word_embeddings=False)
    else:  # ~0.4 GB per layer in fp16; 18 layers + 0.5 GB embeddings/head = ~7.8 GB
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.float16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32)
                        .mul_(fan_in ** -0.5).to(p.dtype))
        model.model.rotary_emb.__init__(cfg)  # buffers were left empty by to_empty
    return model.eval()


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timed(model, x, passes: int, device):
    """Warm-up, then ``passes`` timed forwards; returns (seconds per pass, last logits)."""
    import torch
    with torch.no_grad():
        y = model(x, use_cache=False).logits
        times = []
        for _ in range(passes):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                y = model(x, use_cache=False).logits
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1e-3)
            else:
                t0 = time.perf_counter()
                y = model(x, use_cache=False).logits
                times.append(time.perf_counter() - t0)
    return times, y.float().cpu()


def pinned_h2d_peak(device) -> float | None:
    import torch
    if device.type != "cuda":
        return None
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        best = max(best, n / (a.elapsed_time(b) * 1e-3) / 1e9)
    return best


def compare(a, b) -> dict:
    import torch
    return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model (a dry run on CPU)")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    a = ap.parse_args(argv)
    out = a.out or Path(os.environ.get("OUT", ".")) / "stream_vs_accelerate.json"
    import torch
    import transformers
    import synapse
    device = torch.device(a.device)
    res = {"method": __doc__.strip().splitlines()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "passes": a.passes, "tokens_per_pass": 1}
    try:
        import accelerate
        res["accelerate"] = accelerate.__version__
    except ImportError as e:
        accelerate = None
        res["accelerate"] = f"not installed ({e})"
    t0 = time.perf_counter()
    model = build_model(a.tiny, a.layers)
    res["build_s"] = time.perf_counter() - t0
    nbytes = model_bytes(model)
    budget = int(nbytes * a.budget_fraction)
    res.update({"model_bytes": nbytes, "vram_budget_bytes": budget,
                "pinned_h2d_peak_gb_per_s": pinned_h2d_peak(device)})
    x = torch.tensor([[1]], device=device)
    outputs = {}

    # 1. resident (reference), if it fits
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if free is None or nbytes < 0.85 * free:
        model.to(device)
        times, outputs["resident"] = timed(model, x, a.passes, device)
        res["resident"] = {"pass_s": times, "tokens_per_s": len(times) / sum(times)}
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        res["resident"] = f"not run: model {nbytes} bytes, {free} bytes free"

    # 2. synapse.stream
    with synapse.stream(model, vram_budget=budget, prefetch_depth=a.depth, device=device) as h:
        times, outputs["synapse"] = timed(model, x, a.passes, device)
    st = h.stats
    timed_fw = st["per_forward"][1:]  # the first is the warm-up
    span = sum(times)
    streamed = sum(f["streamed_bytes"] for f in timed_fw)
    res["synapse_stream"] = {
        "pass_s": times, "tokens_per_s": len(times) / span,
        "effective_gb_per_s": streamed / span / 1e9, "streamed_bytes_per_pass": streamed / len(times),
        "stall_s_per_pass": [f["stall_s"] for f in timed_fw], "ring_bytes": st["ring_bytes"],
        "resident_bytes": st["resident_bytes"], "prefetch_depth": st["prefetch_depth"],
        "layers": st["layers"]}
    if res["pinned_h2d_peak_gb_per_s"]:
        res["synapse_stream"]["fraction_of_h2d_peak"] = (
            res["synapse_stream"]["effective_gb_per_s"] / res["pinned_h2d_peak_gb_per_s"])
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. accelerate cpu_offload (changes the model: last)
    if accelerate is not None:
        from accelerate import cpu_offload
        cpu_offload(model, execution_device=device)
        times, outputs["accelerate"] = timed(model, x, a.passes, device)
        span = sum(times)
        res["accelerate_cpu_offload"] = {
            "pass_s": times, "tokens_per_s": len(times) / span,
            "effective_gb_per_s": nbytes / (span / len(times)) / 1e9}
        if res["pinned_h2d_peak_gb_per_s"]:
            res["accelerate_cpu_offload"]["fraction_of_h2d_peak"] = (
                res["accelerate_cpu_offload"]["effective_gb_per_s"] / res["pinned_h2d_peak_gb_per_s"])
    else:
        res["accelerate_cpu_offload"] = "not run: accelerate is not installed"

    # Stall: time per pass beyond the resident model's (the same kernels without waiting
    # on weights); only where the resident run fitted on the device.
    if isinstance(res["resident"], dict):
        base = sorted(res["resident"]["pass_s"])[len(res["resident"]["pass_s"]) // 2]
        for k in ("synapse_stream", "accelerate_cpu_offload"):
            if isinstance(res.get(k), dict):
                med = sorted(res[k]["pass_s"])[len(res[k]["pass_s"]) // 2]
                res[k]["excess_over_resident_s_per_pass"] = med - base
    ref = "resident" if "resident" in outputs else "accelerate"
    res["output_vs_" + ref] = {k: compare(v, outputs[ref]) for k, v in outputs.items() if k != ref}
    res["summary"] = {}
    for k, label in (("resident", "resident"), ("synapse_stream", "synapse.stream"),
                     ("accelerate_cpu_offload", "accelerate cpu_offload")):
        v = res.get(k)
        if isinstance(v, dict):
            res["summary"][f"{label} tokens/s"] = round(v["tokens_per_s"], 2)
            if "effective_gb_per_s" in v:
                res["summary"][f"{label} GB/s"] = round(v["effective_gb_per_s"], 1)
            if "fraction_of_h2d_peak" in v:
                res["summary"][f"{label} fraction of H2D peak"] = round(v["fraction_of_h2d_peak"], 3)
            if "excess_over_resident_s_per_pass" in v:
                res["summary"][f"{label} stall s/pass (vs resident)"] = round(
                    v["excess_over_resident_s_per_pass"], 4)
    stalls = sorted(res["synapse_stream"]["stall_s_per_pass"])
    res["summary"]["synapse.stream stall s/pass (its events)"] = round(stalls[len(stalls) // 2], 4)
    for k, v in res["output_vs_" + ref].items():
        res["summary"][f"{k} output == {ref}"] = v["equal"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    summary = {k: (v.get("tokens_per_s"), v.get("effective_gb_per_s")) for k, v in res.items()
               if isinstance(v, dict) and "tokens_per_s" in v}
    print(json.dumps({"tokens_per_s, GB/s": summary, "outputs": res["output_vs_" + ref]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
