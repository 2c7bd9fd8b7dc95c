"""Print the GPU session's figures next to their goals and peers, and write summary.json.

Reads what benchmarks/gpu_session.sh left in OUT: the calibration record, the scenario
pairs (and compare outputs), the streaming-versus-Accelerate and slab benchmarks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def main(out: Path) -> int:
    rows = []

    def row(figure, value, goal="", peer="", unit=""):
        rows.append({"figure": figure, "value": value, "unit": unit, "goal": goal, "peer": peer})

    meas = None
    for p in sorted((out / "profiles").glob("*.measurements.json")) if (out / "profiles").exists() else []:
        meas = _load(p)
    if meas:
        from synapse.calibrate import build_profile
        prof, quality = build_profile("session", meas)
        dev_copy = meas["device_copy_gb_per_s"]
        row("pinned H2D bandwidth (fit, 64 KiB-256 MiB)", round(prof.link.h2d_gb_per_s, 1), unit="GB/s",
            peer="published ~55 (PCIe Gen5 x16)")
        row("pinned D2H bandwidth (fit)", round(prof.link.d2h_gb_per_s, 1), unit="GB/s")
        row("per-copy fixed cost", round(prof.link.copy_latency_us, 1), unit="us", peer="published 2-7")
        row("H2D + D2H at once", round(meas["duplex_gb_per_s"], 1), goal=">= 80", unit="GB/s",
            peer="published ~83")
        row("device-to-device copy (read+write)", round(dev_copy), unit="GB/s")
        for k in ("int4_quantize", "int4_dequantize"):
            r = getattr(prof.kernels, k).gb_per_s
            row(f"{k} (read+write bytes)", f"{r:.0f} ({r / dev_copy:.0%} of copy)", goal=">= 85% of copy",
                unit="GB/s")
        row("attention decode kernel", round(prof.kernels.attention.gb_per_s), unit="GB/s")
        row("calibration fit, worst relative error", f"{max(quality.values()):.1%}")
    pairs = _load(out / "scenario_pairs.json")
    if pairs:
        for name, p in pairs.items():
            row(f"{name}: decisions sim == cuda", p["decisions_identical"], goal="identical")
            row(f"{name}: simulator end-to-end time error", f"{p['run_time_rel_error']:+.1%}",
                goal="within 5%")
    for name, label in (("stream_vs_accelerate.json", "streaming (transformers model)"),
                        ("ring_vs_accelerate.json", "streaming (MLP stack)")):
        st = _load(out / name)
        for k, v in (st or {}).get("summary", {}).items():
            goal = ">= 0.90" if "fraction of H2D" in k and "synapse" in k else ""
            row(f"{label}: {k}", v, goal=goal)
    hf = _load(out / "hf_caches.json")
    for name, c in ((hf or {}).get("caches") or {}).items():
        if c.get("status") != "ok":
            row(f"KV cache {name}", c.get("status"))
            continue
        agree = c.get("agreement") or {}
        row(f"KV cache {name}: decode tokens/s", round(c["decode_tokens_per_s"], 2),
            peer=f"KV held {c['kv_held_peak_bytes'] / 2**20:.0f} MiB; "
                 f"tokens = dynamic {agree.get('overall_match', 1.0):.2f}")
    slab = _load(out / "slab_vs_torch.json")
    if slab:
        for r in slab["rows"]:
            kib = r["object_bytes"] // 1024
            row(f"slab alloc+free, {kib} KiB", round(r["slab_alloc_free_us"], 2), unit="us",
                peer=f"torch.empty {r['torch_empty_free_us']:.2f} us; cuMemAlloc {r['cuMemAlloc_free_us']:.0f} us")
    w = max((len(r["figure"]) for r in rows), default=10)
    for r in rows:
        print(f"{r['figure']:<{w}}  {str(r['value']):>22} {r['unit']:<5} goal {r['goal'] or '-':<16} "
              f"peer {r['peer'] or '-'}")
    (out / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
