"""Weight streaming on the GPU: Synapse's skip-end ring versus Accelerate's cpu_offload,
on the same 32-layer MLP stack (fp16, 8 GiB) with a quarter of it resident.

Synapse: the shipped `streaming` scenario on the cuda backend (layers in pinned L2, a
2 GiB ring, copies of layer i+2 on the high-priority H2D stream while layer i computes).
Accelerate: `accelerate.cpu_offload` of an `nn.Sequential` with the same layer shapes and
weights (W1 [h, f], W2 [f, h], GELU, RMS norm as in the scenario), its documented way to
run a model larger than VRAM: weights stay on the CPU and each submodule's weights are
moved to the GPU when it runs. Both run 4 forward passes of 1 token after one warm-up
pass; effective bandwidth = weight bytes moved / time of the passes (CUDA events).
Outputs are compared with each other (same weights, same input) where both ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def synapse_ring(passes: int) -> dict:
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    sc = load_scenario("streaming", [f"workload.passes={passes}", "checks.data=false"])
    r = run_scenario(sc, "cuda")
    m = r.metrics
    return {"effective_gb_per_s": m["effective_gb_per_s"], "stall_s": m["stall_s"],
            "tokens_per_s": m["tokens_per_s"], "span_s": m["stream_span_s"],
            "model_bytes": m["model_bytes"], "ring_bytes": m["ring_bytes"],
            "streamed_bytes": m["streamed_bytes"]}


def accelerate_offload(passes: int, layers=32, hidden=4096, ffn=16384) -> dict:
    import torch
    from accelerate import cpu_offload

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Linear(hidden, ffn, bias=False, dtype=torch.float16)
            self.w2 = torch.nn.Linear(ffn, hidden, bias=False, dtype=torch.float16)

        def forward(self, x):
            x = x + self.w2(torch.nn.functional.gelu(self.w1(x), approximate="tanh"))
            return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)

    torch.manual_seed(0)
    with torch.no_grad():
        model = torch.nn.Sequential(*[Block() for _ in range(layers)])
        for b in model:
            b.w1.weight.mul_(1 / np.sqrt(hidden) / b.w1.weight.std())
            b.w2.weight.mul_(1 / np.sqrt(ffn) / b.w2.weight.std())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cpu_offload(model, execution_device=torch.device("cuda:0"))
    x = torch.randn(1, hidden, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        model(x)  # warm-up
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(passes):
            a.record()
            y = model(x)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
    span = sum(times)
    return {"effective_gb_per_s": passes * model_bytes / span / 1e9, "tokens_per_s": passes / span,
            "span_s": span, "model_bytes": model_bytes, "pass_s_median": float(np.median(times)),
            "output_finite": bool(torch.isfinite(y).all())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--passes", type=int, default=4)
    a = ap.parse_args(argv)
    res = {"method": __doc__.strip().splitlines()[0]}
    res["synapse_ring"] = synapse_ring(a.passes)
    print("synapse ring       ", json.dumps(res["synapse_ring"]))
    try:
        import accelerate
        res["accelerate_version"] = accelerate.__version__
        t0 = time.perf_counter()
        res["accelerate_cpu_offload"] = accelerate_offload(a.passes)
        res["accelerate_setup_and_run_s"] = time.perf_counter() - t0
        print("accelerate offload ", json.dumps(res["accelerate_cpu_offload"]))
    except ImportError as e:
        res["accelerate_cpu_offload"] = f"not run: {e}"
        print("accelerate not installed:", e)
    s = res["synapse_ring"]
    acc = res["accelerate_cpu_offload"]
    res["summary"] = {"synapse ring GB/s": round(s["effective_gb_per_s"], 1),
                      "synapse stall s": round(s["stall_s"], 3),
                      "synapse tokens/s": round(s["tokens_per_s"], 2)}
    if isinstance(acc, dict):
        res["summary"].update({"accelerate cpu_offload GB/s": round(acc["effective_gb_per_s"], 1),
                               "accelerate tokens/s": round(acc["tokens_per_s"], 2)})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
