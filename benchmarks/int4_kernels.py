"""Every INT4 quantize / dequantize kernel variant against a device-to-device copy, on one GPU.

Issue 11 item 4: the INT4 kernels should reach 90% of the measured device copy bandwidth.
For each variant of ``synapse.hw.kernels.INT4_QUANT_VARIANTS`` / ``INT4_DEQUANT_VARIANTS``
and each group size, at the sizes ``synapse calibrate`` uses (2^20, 2^23, 2^26 elements):

* checks that the variant's output bytes equal the committed "warp" kernel's on the timed
  input (the full buffer) and NumPy's (``synapse.hw.int4``) on an edge-case sample (ties,
  subnormal scales, signed zeros; ``int4.edge_case_input``), outputs poisoned first;
* times it with CUDA events, median of ``--repeats`` after warm-up, two ways: one launch
  between the events, fitted over the sizes exactly as calibrate fits its profile
  (``fit_rate``: the launch's host cost becomes the fixed term), and ``--batch``
  launches back to back between the events (the host cost hidden: kernel time only);
* measures the device copy in the same process (cuMemcpyDtoD of 1 GiB, read + written
  counted, as calibrate does) and reports every rate as a fraction of it.

Bytes of a kernel = fp16 read + INT4 written (or the reverse), as in calibrate. Each
variant runs in its own child process with a timeout, so a variant that faults or hangs
is reported as such and the others still run. Prints a table and the variant to set in
kernels.py (the fastest bit-exact one by calibrate's fitted rate at G = 64), writes JSON.
Needs an NVIDIA GPU, PyCUDA and nvcc.

    python benchmarks/int4_kernels.py --out $OUT/int4_kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synapse.calibrate import fit_rate  # noqa: E402
from synapse.hw import int4, kernels  # noqa: E402

SIZES = (1 << 20, 1 << 23, 1 << 26)  # synapse.hw.measure.int4_sweep's numels
COPY_BYTES = 1 << 30  # synapse.hw.measure: Buffers(1 GiB) in measure_all
CALIBRATE_GROUP = 64  # the group size calibrate measures
SAMPLE_GROUPS = 3000  # groups of the NumPy-checked sample
# KV blocks (block_tokens, channels = layers * kv_heads * head_dim): a scenario block of a
# 32-layer, 8-head, 128-dim model at 16 tokens (2 MiB of fp16), and larger ones.
KV_SHAPES = ((16, 32768), (64, 32768), (256, 32768))
POISON = 0xA5


def _events_time(cuda, fn, repeats: int, warmup: int = 2, batch: int = 1) -> float:
    """Median seconds per call of ``fn`` (``batch`` calls between two events)."""
    a, b = cuda.Event(), cuda.Event()
    times = []
    for i in range(warmup + repeats):
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(b.time_since(a) * 1e-3 / batch)
    return statistics.median(times)


def _download(cuda, dev, nbytes: int) -> np.ndarray:
    cuda.Context.synchronize()
    host = np.empty(nbytes, np.uint8)
    cuda.memcpy_dtoh(host, dev)
    return host


def _first_difference(got: np.ndarray, want: np.ndarray) -> str:
    if got.size != want.size:
        return f"size {got.size} != {want.size}"
    bad = np.flatnonzero(got != want)
    return "" if bad.size == 0 else (f"{bad.size} bytes differ, first at byte {int(bad[0])}: "
                                     f"{int(got[bad[0]]):#04x} vs {int(want[bad[0]]):#04x}")


def measure_variant(direction: str, variant: str, group_sizes, sizes, repeats: int,
                    batch: int) -> dict:
    """One variant on the current GPU (run in a child process): checks, then timings."""
    import pycuda.driver as cuda
    kernels.use_primary_context(0)
    dev = cuda.Context.get_device()
    rng = np.random.default_rng(11)
    res = {"direction": direction, "variant": variant, "device": dev.name(),
           "driver": cuda.get_driver_version(),
           "nvcc": kernels.nvcc_version(kernels.nvcc_path()).splitlines()[-1],
           "kernel": kernels.int4_kernel(direction, variant)[0], "groups": {}}
    quantize = direction == "quantize"
    run = kernels.quantize_int4 if quantize else kernels.dequantize_int4

    res["device_copy"] = _copy_rate(cuda, repeats)
    copy = res["device_copy"]["gb_per_s"]

    for g in group_sizes:
        out = res["groups"][str(g)] = {"checks": {}, "sizes": []}
        # the edge-case sample against NumPy
        n = g * SAMPLE_GROUPS
        x = int4.edge_case_input(rng, n, g)
        if quantize:
            src_host, want = x, np.zeros(int4.int4_nbytes(n, g), np.uint8)
            int4.pack_into(x, g, want)
        else:
            src_host = int4.edge_case_buffer(rng, n, g)
            want = int4.unpack_from(src_host, n, g, np.float16).view(np.uint8)
        src = cuda.to_device(src_host)
        dst = cuda.mem_alloc(want.size)
        cuda.memset_d8(dst, POISON, want.size)
        run(src, dst, n, g, variant=variant)
        out["checks"]["numpy_sample"] = _first_difference(_download(cuda, dst, want.size), want) or "equal"
        src.free(), dst.free()
        # the timed inputs, against the committed kernel on the device
        for n in sizes:
            n -= n % g
            fp16 = (rng.standard_normal(n, dtype=np.float32) * 2).astype(np.float16)
            q_bytes = int4.int4_nbytes(n, g)
            if quantize:
                src = cuda.to_device(fp16)
                out_bytes = q_bytes
            else:
                src = cuda.mem_alloc(q_bytes)
                x_dev = cuda.to_device(fp16)
                kernels.quantize_int4(x_dev, src, n, g, variant="warp")
                x_dev.free()
                out_bytes = 2 * n
            ref, dst = cuda.mem_alloc(out_bytes), cuda.mem_alloc(out_bytes)
            cuda.memset_d8(ref, POISON, out_bytes)
            cuda.memset_d8(dst, POISON ^ 0xFF, out_bytes)
            run(src, ref, n, g, variant="warp")
            run(src, dst, n, g, variant=variant)
            same = _first_difference(_download(cuda, dst, out_bytes), _download(cuda, ref, out_bytes))
            moved = 2 * n + q_bytes
            single = _events_time(cuda, lambda: run(src, dst, n, g, variant=variant), repeats)
            batched = _events_time(cuda, lambda: run(src, dst, n, g, variant=variant), repeats,
                                   batch=batch)
            out["sizes"].append({"numel": n, "bytes": moved, "seconds": single,
                                 "batched_seconds": batched,
                                 "batched_gb_per_s": moved / batched / 1e9,
                                 "batched_of_copy": moved / batched / 1e9 / copy,
                                 "equal_to_warp": same or "equal"})
            for p in (src, ref, dst):
                p.free()
        rate = fit_rate([s["bytes"] for s in out["sizes"]], [s["seconds"] for s in out["sizes"]])
        out["fitted"] = {"gb_per_s": rate.gb_per_s, "fixed_us": rate.fixed_us,
                         "of_copy": rate.gb_per_s / copy}
        out["bit_exact"] = (out["checks"]["numpy_sample"] == "equal"
                            and all(s["equal_to_warp"] == "equal" for s in out["sizes"]))
    return res


def measure_kv_block(variant: str, shapes, group_size: int, repeats: int, batch: int) -> dict:
    """The channel-key KV block quantize kernel (the scenario path's demotion) at block
    shapes (block_tokens, channels): kernel-only rates against the device copy, bytes
    against the warp kernel on the timed block and against kv_layout's NumPy on a sample."""
    import pycuda.driver as cuda
    from synapse.hw.kv_layout import KVLayout
    kernels.use_primary_context(0)
    rng = np.random.default_rng(12)
    res = {"direction": "kv_block_quantize", "variant": variant,
           "device": cuda.Context.get_device().name(), "group_size": group_size, "shapes": []}
    res["device_copy"] = _copy_rate(cuda, repeats)
    checks = []
    for bt, c in shapes:
        lay = KVLayout(c // 1024, 8, 128, bt, group_size, "channel")  # L x 8 heads x 128
        assert lay.channels == c, (c, lay.channels)
        kv = np.empty((bt, 2, c), np.float16)
        g = min(size for size in int4.GROUP_SIZES if size >= bt) if bt <= 128 else None
        kv[:, 0] = (rng.standard_normal((bt, c)) * 10.0 ** rng.uniform(-3, 3, (1, c))).astype(np.float16)
        if g:  # the edge-case columns as channels
            kv[:, 0, : c] = int4.edge_case_input(rng, g * c, g).reshape(c, g)[:, :bt].T
        kv[:, 1] = int4.edge_case_input(rng, bt * c, group_size).reshape(bt, c)
        want = lay.pack(kv.reshape(lay.shape), "int4")
        src = cuda.to_device(kv)
        ref, dst = cuda.mem_alloc(want.size), cuda.mem_alloc(want.size)
        cuda.memset_d8(ref, POISON, want.size)
        cuda.memset_d8(dst, POISON ^ 0xFF, want.size)
        kernels.quantize_kv_block_int4(src, ref, bt, c, group_size, variant="warp")
        kernels.quantize_kv_block_int4(src, dst, bt, c, group_size, variant=variant)
        got = _download(cuda, dst, want.size)
        check = {"numpy": _first_difference(got, want) or "equal",
                 "warp": _first_difference(got, _download(cuda, ref, want.size)) or "equal"}
        moved = kv.nbytes + want.size
        t = _events_time(cuda, lambda: kernels.quantize_kv_block_int4(src, dst, bt, c, group_size,
                                                                       variant=variant),
                         repeats, batch=batch)
        res["shapes"].append({"block_tokens": bt, "channels": c, "bytes": moved,
                              "batched_seconds": t, "batched_gb_per_s": moved / t / 1e9,
                              "batched_of_copy": moved / t / 1e9 / res["device_copy"]["gb_per_s"],
                              "checks": check})
        checks.append(check)
        for p in (src, ref, dst):
            p.free()
    res["bit_exact"] = all(v == "equal" for ch in checks for v in ch.values())
    return res


def _copy_rate(cuda, repeats: int) -> dict:
    src, dst = cuda.mem_alloc(COPY_BYTES), cuda.mem_alloc(COPY_BYTES)
    cuda.memset_d8(src, 0x3C, COPY_BYTES)
    t = _events_time(cuda, lambda: cuda.memcpy_dtod_async(dst, src, COPY_BYTES), repeats)
    src.free(), dst.free()
    return {"bytes": 2 * COPY_BYTES, "seconds": t, "gb_per_s": 2 * COPY_BYTES / t / 1e9}


def _child(direction: str, variant: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{direction}:{variant}",
           "--group-sizes", ",".join(map(str, a.group_sizes)),
           "--sizes", ",".join(map(str, a.sizes)), "--repeats", str(a.repeats),
           "--batch", str(a.batch)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout)
    except subprocess.TimeoutExpired:
        return {"direction": direction, "variant": variant,
                "error": f"no result within {a.child_timeout} s (hung or too slow)"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"direction": direction, "variant": variant,
                "error": f"exit {done.returncode}: {tail}"}
    res = json.loads(lines[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def pick(results: list[dict], direction: str) -> tuple[str, str]:
    """The bit-exact variant with the highest fitted rate at calibrate's group size (KV
    blocks: the highest kernel-only rate at the largest block)."""
    best, why = "warp", "no variant was measured"
    best_rate = -1.0
    if direction == "kv_block_quantize":
        for r in results:
            if r["direction"] == direction and "error" not in r and r["bit_exact"]:
                last = r["shapes"][-1]
                if last["batched_gb_per_s"] > best_rate:
                    best, best_rate = r["variant"], last["batched_gb_per_s"]
                    why = (f"{best_rate:.0f} GB/s = {last['batched_of_copy']:.0%} of the device "
                           f"copy at {last['block_tokens']} x {last['channels']}")
        return best, why
    for r in results:
        g = r.get("groups", {}).get(str(CALIBRATE_GROUP))
        if r["direction"] != direction or "error" in r or not g:
            continue
        if not all(gr["bit_exact"] for gr in r["groups"].values()):
            continue
        if g["fitted"]["gb_per_s"] > best_rate:
            best, best_rate = r["variant"], g["fitted"]["gb_per_s"]
            why = f"{best_rate:.0f} GB/s = {g['fitted']['of_copy']:.0%} of the device copy"
    return best, why


def report(results: list[dict]) -> list[str]:
    lines = [f"{'kernel':<22} {'G':>4} {'fitted GB/s':>11} {'of copy':>7}   "
             f"{'kernel-only GB/s (of copy) per size':<44} bytes"]
    for r in results:
        name = f"{r['direction']} {r['variant']}"
        if "error" in r:
            lines.append(f"{name:<22} ERROR {r['error']}")
            continue
        if r["direction"] == "kv_block_quantize":
            per = "  ".join(f"{s['batched_gb_per_s']:5.0f} ({s['batched_of_copy']:4.0%})" for s in r["shapes"])
            ok = "equal" if r["bit_exact"] else "DIFFER: " + "; ".join(
                f"{s['block_tokens']}x{s['channels']} {s['checks']}" for s in r["shapes"])
            lines.append(f"{name:<22} {r['group_size']:>4} {'-':>11} {'-':>7}   {per:<44} {ok}")
            continue
        for g, gr in r["groups"].items():
            per = "  ".join(f"{s['batched_gb_per_s']:5.0f} ({s['batched_of_copy']:4.0%})" for s in gr["sizes"])
            ok = "equal" if gr["bit_exact"] else "DIFFER: " + "; ".join(
                [f"numpy {gr['checks']['numpy_sample']}"] +
                [f"n={s['numel']} {s['equal_to_warp']}" for s in gr["sizes"]])
            lines.append(f"{name:<22} {g:>4} {gr['fitted']['gb_per_s']:11.0f} "
                         f"{gr['fitted']['of_copy']:7.0%}   {per:<44} {ok}")
    copies = [r["device_copy"]["gb_per_s"] for r in results if "device_copy" in r]
    if copies:
        lines.append(f"device copy (1 GiB, read + written): {min(copies):.0f}-{max(copies):.0f} GB/s "
                     f"over the {len(copies)} processes")
    return lines


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("int4_kernels.json"), help="JSON written here")
    ap.add_argument("--group-sizes", default="32,64,128", help="comma-separated, of 32,64,128")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="element counts (default: calibrate's)")
    ap.add_argument("--repeats", type=int, default=9, help="timed repeats per point (median)")
    ap.add_argument("--batch", type=int, default=10, help="launches between events, kernel-only time")
    ap.add_argument("--child-timeout", type=int, default=90, help="seconds per variant process")
    ap.add_argument("--variants", default=None,
                    help="comma list of direction:variant to time (e.g. dequantize:bulk,"
                         "quantize:staged); default every variant of every direction")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:
        a.group_sizes = [int4.check_group_size(int(x)) for x in a.group_sizes.split(",")]
        a.sizes = [int(x) for x in a.sizes.split(",")]
        if len(a.sizes) < 2 or min(a.sizes) < 128 or a.repeats < 1 or a.batch < 1:
            raise ValueError("need two or more sizes >= 128, --repeats >= 1, --batch >= 1")
        tables = {"quantize": kernels.INT4_QUANT_VARIANTS, "dequantize": kernels.INT4_DEQUANT_VARIANTS,
                  "kv_block_quantize": kernels.KV_QUANT_VARIANTS}
        wanted = None
        if a.variants is not None:
            wanted = {tuple(x.split(":", 1)) for x in a.variants.split(",") if x}
            bad = sorted(f"{d}:{v}" for d, v in (w if len(w) == 2 else (w[0], "") for w in wanted)
                         if d not in tables or v not in tables[d])
            if bad or not wanted:
                raise ValueError(f"--variants: unknown {', '.join(bad) or 'empty list'}; expected "
                                 f"direction:variant with direction in {', '.join(tables)}")
    except ValueError as exc:
        print(f"int4_kernels.py: bad arguments: {exc}", file=sys.stderr)
        return 2
    if a.child:
        direction, variant = a.child.split(":")
        if direction == "kv_block_quantize":
            res = measure_kv_block(variant, KV_SHAPES, CALIBRATE_GROUP, a.repeats, a.batch)
        else:
            res = measure_variant(direction, variant, a.group_sizes, a.sizes, a.repeats, a.batch)
        print(json.dumps(res))
        return 0
    results = []
    for direction, table in (("quantize", kernels.INT4_QUANT_VARIANTS),
                             ("dequantize", kernels.INT4_DEQUANT_VARIANTS),
                             ("kv_block_quantize", kernels.KV_QUANT_VARIANTS)):
        for variant in table:
            if wanted is not None and (direction, variant) not in wanted:
                continue
            print(f"... {direction} {variant}", flush=True)
            results.append(_child(direction, variant, a))
            _write(a.out, {"results": results, "complete": False})  # survives a kill
    lines = report(results)
    choice = {}
    for direction, const, current in (("quantize", "QUANT_VARIANT", kernels.QUANT_VARIANT),
                                      ("dequantize", "DEQUANT_VARIANT", kernels.DEQUANT_VARIANT),
                                      ("kv_block_quantize", "KV_QUANT_VARIANT",
                                       kernels.KV_QUANT_VARIANT)):
        if not any(r["direction"] == direction for r in results):
            continue  # not timed in this run (--variants)
        best, why = pick(results, direction)
        choice[const] = {"variant": best, "why": why, "current": current}
        lines.append(f"set {const} = {best!r} in synapse/hw/kernels.py ({why}; now {current!r})")
    print("\n".join(lines))
    _write(a.out, {"results": results, "choice": choice, "table": lines, "complete": True})
    ok = all("error" not in r and (r["bit_exact"] if "shapes" in r else
                                   all(g["bit_exact"] for g in r["groups"].values()))
             for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
