"""The simulator's time model, op by op: copies, the duplex cap, and overlap."""

import pytest

from synapse.ops import Copy, LayerCompute, Region, Stream
from synapse.sim.backend import SimBackend
from synapse.sim.profile import load_profile

N = 64 * 2**20


@pytest.fixture
def backend():
    return SimBackend(load_profile("h100-sxm"))


def _copy(direction, nbytes=N, calls=1):
    import numpy as np
    return Copy(direction=direction, src_offsets=np.zeros(calls, np.int64),
                dst_offsets=np.zeros(calls, np.int64),
                sizes=np.full(calls, nbytes // calls, np.int64))


def _durations(backend, ops):
    def drv():
        t = [backend.submit(op, stream) for op, stream in ops]
        yield backend.wait(t)
    backend.run(drv())
    return {r.kind: r for r in backend.records()}


def test_one_copy_takes_latency_plus_bytes_over_bandwidth(backend):
    link = backend.profile.link
    r = _durations(backend, [(_copy("h2d"), Stream.H2D)])["copy_h2d"]
    expected = link.copy_latency_us * 1e-6 + N / (link.h2d_gb_per_s * 1e9)
    assert r.duration_s == pytest.approx(expected, rel=1e-9)


def test_each_call_of_a_batch_pays_the_fixed_cost(backend):
    link = backend.profile.link
    r = _durations(backend, [(_copy("d2h", calls=8), Stream.D2H)])["copy_d2h"]
    expected = 8 * link.copy_latency_us * 1e-6 + N / (link.d2h_gb_per_s * 1e9)
    assert r.duration_s == pytest.approx(expected, rel=1e-9)


def test_opposite_directions_share_the_duplex_cap(backend):
    link = backend.profile.link
    rs = _durations(backend, [(_copy("h2d"), Stream.H2D), (_copy("d2h"), Stream.D2H)])
    # Both run together for (almost) the whole time at duplex/2 each (equal bandwidths).
    share = link.duplex_gb_per_s * 1e9 / 2
    for r in rs.values():
        assert r.duration_s == pytest.approx(link.copy_latency_us * 1e-6 + N / share, rel=2e-3)
    assert rs["copy_h2d"].duration_s > N / (link.h2d_gb_per_s * 1e9)


def test_same_direction_copies_split_the_direction(backend):
    link = backend.profile.link
    ops = [(_copy("h2d"), Stream.H2D), (_copy("h2d"), Stream.COMPUTE)]  # two streams
    def drv():
        t = [backend.submit(op, s) for op, s in ops]
        yield backend.wait(t)
    backend.run(drv())
    start = min(r.start_s for r in backend.records())
    end = max(r.end_s for r in backend.records())
    # Fixed costs overlap (two copy engines); the bytes share one direction's bandwidth.
    both = 2 * N / (link.h2d_gb_per_s * 1e9)
    assert end - start == pytest.approx(both + link.copy_latency_us * 1e-6, abs=20e-6)


def test_a_stream_runs_its_ops_in_order(backend):
    def drv():
        a = backend.submit(_copy("h2d"), Stream.H2D)
        b = backend.submit(_copy("h2d"), Stream.H2D)
        yield backend.wait([a, b])
    backend.run(drv())
    first, second = backend.records()
    assert second.start_s >= first.end_s


def _streaming(prefetch: bool):
    from conftest import run
    # Compute-heavy enough (4096 tokens per pass) that overlap matters.
    return run("streaming", ["workload.layers=8", "workload.hidden=1024", "workload.passes=2",
                             "workload.batch_tokens=65536", "workload.vram_budget=50%",
                             f"policy.prefetch={str(prefetch).lower()}"]).metrics


def test_prefetch_overlaps_copy_and_compute_and_no_prefetch_serialises():
    prof = load_profile("h100-sxm")
    with_pf, without = _streaming(True), _streaming(False)
    layer_bytes = 2 * 1024 * 4096 * 2
    copy_s = prof.link.copy_latency_us * 1e-6 + layer_bytes / (prof.link.h2d_gb_per_s * 1e9)
    flops = 2.0 * 65536 * 2 * 1024 * 4096
    comp_s = prof.kernels.gemm.seconds(layer_bytes, 1, flops)
    steps = 16  # 8 layers x 2 passes
    # Serial: every layer pays copy + compute; overlapped: about max(copy, compute) each.
    assert without["stream_span_s"] == pytest.approx(steps * (copy_s + comp_s), rel=0.02)
    assert with_pf["stream_span_s"] < without["stream_span_s"] - 0.5 * steps * min(copy_s, comp_s)
    assert with_pf["stream_span_s"] >= steps * max(copy_s, comp_s) * 0.98
