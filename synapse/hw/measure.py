"""Measurements on the GPU, for ``synapse calibrate`` and the benchmarks.

Method (device tool METHOD.md): CUDA events around the measured region, warm-up first,
the median of repeats, fresh random data, outputs poisoned before kernel runs. Every
function returns plain data (bytes, seconds, calls) so fitting and reporting happen
elsewhere and can be tested without a GPU.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from . import driver_api as drv

KiB, MiB, GiB = 2**10, 2**20, 2**30
LINK_SIZES = [64 * KiB * 4**i for i in range(7)]  # 64 KiB .. 256 MiB


def _timed(stream: int, fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` enqueued on ``stream``, timed with events."""
    a, b = drv.event_create(), drv.event_create()
    times = []
    for i in range(warmup + repeats):
        drv.event_record(a, stream)
        fn()
        drv.event_record(b, stream)
        drv.event_synchronize(b)
        if i >= warmup:
            times.append(drv.event_elapsed_ms(a, b) * 1e-3)
    drv.event_destroy(a)
    drv.event_destroy(b)
    return statistics.median(times)


class Buffers:
    """A device buffer and a pinned host buffer of ``nbytes``, filled with random bytes."""

    def __init__(self, nbytes: int):
        import pycuda.driver as cuda
        self.nbytes = nbytes
        self.dev = drv.mem_alloc(nbytes)
        self.dev2 = drv.mem_alloc(nbytes)
        self.host = cuda.pagelocked_empty(nbytes, np.uint8)
        self.host[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        self.hptr = int(self.host.ctypes.data)

    def free(self):
        drv.mem_free(self.dev)
        drv.mem_free(self.dev2)
        self.host.base.free()


def link_sweep(buf: Buffers, stream: int, direction: str, sizes=LINK_SIZES, calls: int = 8,
               rounds: int = 5):
    """Per size: ``calls`` back-to-back copies of that size; returns bytes, seconds, calls.

    Sizes are visited in a shuffled order in each of ``rounds`` rounds and the median over
    rounds is kept: a single pass in size order let one slow moment (another process on
    the host, a page-table walk) bend the whole fit; the first H100 record had a 64 MiB
    point at 28 GB/s between 46 GB/s neighbours and a 44 % fit error.
    """
    ks = [max(1, min(calls, buf.nbytes // n)) for n in sizes]

    def fn_for(n, k):
        if direction == "h2d":
            return lambda: [drv.memcpy_htod_async(buf.dev + i * n, buf.hptr + i * n, n, stream)
                            for i in range(k)]
        return lambda: [drv.memcpy_dtoh_async(buf.hptr + i * n, buf.dev + i * n, n, stream)
                        for i in range(k)]

    rng = np.random.default_rng(1)
    samples: list[list[float]] = [[] for _ in sizes]
    for _ in range(rounds):
        for j in rng.permutation(len(sizes)):
            samples[j].append(_timed(stream, fn_for(sizes[j], ks[j]), repeats=3, warmup=1))
    return {"bytes": [n * k for n, k in zip(sizes, ks)],
            "seconds": [statistics.median(x) for x in samples],
            "calls": ks,
            "spread": [round(max(x) / min(x) - 1, 4) for x in samples]}


def duplex(buf: Buffers, s_h2d: int, s_d2h: int, nbytes: int = 256 * MiB) -> dict:
    """H2D and D2H of ``nbytes`` each, at once on two streams: GB/s together."""
    half = min(nbytes, buf.nbytes // 2)
    a, b, c = drv.event_create(), drv.event_create(), drv.event_create()
    times = []
    for i in range(6):
        drv.event_record(a, s_h2d)
        drv.stream_wait_event(s_d2h, a)
        drv.memcpy_htod_async(buf.dev, buf.hptr, half, s_h2d)
        drv.memcpy_dtoh_async(buf.hptr + half, buf.dev + half, half, s_d2h)
        drv.event_record(b, s_h2d)
        drv.event_record(c, s_d2h)
        drv.event_synchronize(b)
        drv.event_synchronize(c)
        if i >= 1:
            times.append(max(drv.event_elapsed_ms(a, b), drv.event_elapsed_ms(a, c)) * 1e-3)
    t = statistics.median(times)
    return {"bytes": 2 * half, "seconds": t, "gb_per_s": 2 * half / t / 1e9}


def device_copy(buf: Buffers, stream: int) -> dict:
    """Device-to-device copy; bytes counted read + written (METHOD.md's ceiling)."""
    n = buf.nbytes
    t = _timed(stream, lambda: drv.memcpy_dtod_async(buf.dev2, buf.dev, n, stream))
    return {"bytes": 2 * n, "seconds": t, "gb_per_s": 2 * n / t / 1e9}


def memset_sweep(buf: Buffers, stream: int, sizes=(1 * MiB, 16 * MiB, 256 * MiB)):
    out = {"bytes": [], "seconds": []}
    for n in sizes:
        n = min(n, buf.nbytes)
        out["bytes"].append(n)
        out["seconds"].append(_timed(stream, lambda n=n: drv.memset_d8_async(buf.dev, 0, n, stream)))
    return out


def int4_sweep(buf: Buffers, pystream, stream: int, group_size: int = 64,
               numels=(1 << 20, 1 << 23, 1 << 26)):
    """Quantize and dequantize rates: bytes = fp16 read + INT4 written (and reverse)."""
    from . import int4, kernels
    q = {"bytes": [], "seconds": []}
    d = {"bytes": [], "seconds": []}
    rng = np.random.default_rng(1)
    for n in numels:
        n = min(n, buf.nbytes // 2 // 2 * 2)
        n -= n % group_size
        src = rng.standard_normal(n, dtype=np.float32).astype(np.float16)
        buf.host[: 2 * n] = src.view(np.uint8)
        drv.memcpy_htod_async(buf.dev, buf.hptr, 2 * n, stream)
        drv.memset_d8_async(buf.dev2, 0xFF, int4.int4_nbytes(n, group_size), stream)
        tq = _timed(stream, lambda: kernels.quantize_int4(buf.dev, buf.dev2, n, group_size, pystream))
        td = _timed(stream, lambda: kernels.dequantize_int4(buf.dev2, buf.dev, n, group_size, pystream))
        moved = 2 * n + int4.int4_nbytes(n, group_size)
        q["bytes"].append(moved)
        q["seconds"].append(tq)
        d["bytes"].append(moved)
        d["seconds"].append(td)
    return q, d


def attention_sweep(pystream, stream: int, layers=32, heads=8, head_dim=128, block_tokens=16,
                    group_size=64, blocks=(16, 128, 512, 2048)):
    """Decode attention over ``nb`` fp16 blocks of the given shape: bytes = KV read."""
    from . import kernels
    from .kv_layout import KVLayout
    lay = KVLayout(layers, heads, head_dim, block_tokens, group_size)
    nmax = max(blocks)
    arena = drv.mem_alloc(nmax * lay.fp16_bytes)
    drv.memset_d8_async(arena, 0x3C, nmax * lay.fp16_bytes, stream)  # fp16 ~1.0 patterns
    q = drv.mem_alloc(4 * layers * heads * head_dim)
    out = drv.mem_alloc(4 * layers * heads * head_dim)
    lse = drv.mem_alloc(4 * layers * heads * nmax)
    drv.memset_d8_async(q, 0, 4 * layers * heads * head_dim, stream)
    res = {"bytes": [], "seconds": [], "blocks": []}
    for nb in blocks:
        table = kernels.upload_block_table([arena + i * lay.fp16_bytes for i in range(nb)],
                                           ["fp16"] * nb, [block_tokens] * nb, block_tokens)
        t = _timed(stream, lambda: kernels.attention_decode(
            q, table, layers, heads, head_dim, block_tokens, group_size, 1.0, out, lse,
            stream=pystream))
        res["bytes"].append(nb * lay.fp16_bytes)
        res["seconds"].append(t)
        res["blocks"].append(nb)
    for p in (arena, q, out, lse):
        drv.mem_free(p)
    return res


def gemm_rate(stream_handle: int) -> dict:
    """fp16 matmul through PyTorch: fixed cost (tiny GEMV) and TFLOP/s (large GEMM)."""
    import torch
    ext = torch.cuda.ExternalStream(stream_handle)
    res = {}
    with torch.cuda.stream(ext):
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
        w = torch.randn(4096, 16384, device="cuda", dtype=torch.float16)
        t_big = _timed(stream_handle, lambda: a @ b)
        t_gemv = _timed(stream_handle, lambda: x @ w, repeats=21)
        xs = torch.randn(1, 64, device="cuda", dtype=torch.float16)
        ws = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        t_tiny = _timed(stream_handle, lambda: xs @ ws, repeats=21)
    res["tflops"] = 2 * 8192**3 / t_big / 1e12
    gemv_bytes = 4096 * 16384 * 2
    res["fixed_us"] = t_tiny * 1e6
    res["gb_per_s"] = gemv_bytes / max(1e-9, t_gemv - t_tiny) / 1e9
    return res


def host_submit_us(backend, n: int = 2000, items: int = 1) -> float:
    """Host time to submit one op of ``items`` rows (a memset each) through the cuda
    backend's Python path."""
    from ..ops import Region, Stream, Zero
    mem = backend.memory("calib", 1 * MiB, "device")
    op = Zero(purpose="calibrate", regions=tuple(Region("calib", 256 * i, 256) for i in range(items)))
    for _ in range(50):
        backend.submit(op, Stream.COMPUTE)
    backend.synchronize_all()
    t0 = time.perf_counter()
    for _ in range(n):
        backend.submit(op, Stream.COMPUTE)
    t = (time.perf_counter() - t0) / n
    backend.synchronize_all()
    backend._tickets.clear()
    mem.free()
    backend._mem.pop("calib", None)
    return t * 1e6


def host_memset_gb_per_s(nbytes: int = 256 * MiB) -> float:
    a = np.ones(nbytes, np.uint8)
    t0 = time.perf_counter()
    for _ in range(3):
        a[:] = 0
    return 3 * nbytes / (time.perf_counter() - t0) / 1e9


def host_stage_gb_per_s(block_bytes: int = 2 * MiB, blocks: int = 64, repeats: int = 5) -> float:
    """The hardware backends' ingest path on the host: payload windows of one KV block
    taken from the payload pool and written into pinned staging (what an ``Ingest`` costs
    before launch)."""
    import pycuda.driver as cuda
    from ..workloads.payload import PayloadPool
    pool = PayloadPool(0)
    dst = cuda.pagelocked_empty(block_bytes * blocks, np.uint8)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for i in range(blocks):
            dst[i * block_bytes:(i + 1) * block_bytes] = \
                pool.take((r, i), block_bytes // 2).view(np.uint8)
        times.append(time.perf_counter() - t0)
    dst.base.free()
    return block_bytes * blocks / statistics.median(times[1:]) / 1e9


def measure_all(progress=print, quick: bool = False) -> dict:
    """Everything a profile holds, measured on the current GPU with a CudaBackend."""
    import pycuda.driver as cuda
    from .cuda_backend import CudaBackend
    from ..ops import Stream

    be = CudaBackend()
    try:
        s = be.streams
        dev = be.device
        m = {"environment": be.environment()}
        buf = Buffers(256 * MiB if quick else 1 * GiB)
        progress("pinned host-to-device copies by size")
        m["h2d"] = link_sweep(buf, s[Stream.H2D], "h2d")
        progress("pinned device-to-host copies by size")
        m["d2h"] = link_sweep(buf, s[Stream.D2H], "d2h")
        progress("both directions at once")
        dup = duplex(buf, s[Stream.H2D], s[Stream.D2H])
        m["duplex_gb_per_s"] = dup["gb_per_s"]
        m["duplex"] = dup
        progress("device-to-device copy")
        m["device_copy"] = device_copy(buf, s[Stream.COMPUTE])
        m["device_copy_gb_per_s"] = m["device_copy"]["gb_per_s"]
        progress("memset")
        m["memset"] = memset_sweep(buf, s[Stream.COMPUTE])
        progress("INT4 quantize / dequantize kernels")
        m["int4_quantize"], m["int4_dequantize"] = int4_sweep(buf, be.compute, s[Stream.COMPUTE])
        buf.free()
        progress("attention decode kernel")
        m["attention"] = attention_sweep(be.compute, s[Stream.COMPUTE])
        progress("fp16 GEMM (PyTorch)")
        m["gemm"] = gemm_rate(s[Stream.COMPUTE])
        progress("host submit overhead")
        m["host_submit_us"] = host_submit_us(be)
        m["host_per_item_us"] = (host_submit_us(be, n=200, items=64) - m["host_submit_us"]) / 63
        m["host_memset_gb_per_s"] = host_memset_gb_per_s()
        m["host_stage_gb_per_s"] = host_stage_gb_per_s()
        free_b, total_b = cuda.mem_get_info()
        m["hbm_bytes"] = int(total_b)
        from .pinned_pool import host_available_bytes, memlock_limit_bytes
        lim = memlock_limit_bytes()
        avail = host_available_bytes() or 0
        m["host_pinned_bytes"] = int(min(lim, avail) if lim else avail)
        m["copy_engines"] = int(dev.get_attribute(cuda.device_attribute.ASYNC_ENGINE_COUNT))
        return m
    finally:
        be.close()
