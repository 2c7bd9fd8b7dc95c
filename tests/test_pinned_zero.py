"""Zero-on-free of pinned host ranges (the L2 pool) by a copy engine: a D2H copy from a
device page of zeros (``PinnedZero``) on the stream that next writes the space, instead
of a host memset on the loop's thread. The simulator charges it as such a copy (host
time where the host runs the ops, as the cpu backend zeroes by memset); the cuda backend
does it, and a host view of the space waits for it (``cuda`` marker)."""

from __future__ import annotations

import numpy as np
import pytest

from synapse.ops import ZERO_PAGE_BYTES, Copy, Ingest, PinnedZero, Region, Stream
from synapse.sim.backend import SimBackend
from synapse.sim.profile import load_profile


def test_a_pinned_zero_is_one_d2h_batch_from_the_page_of_zeros_cut_into_pages():
    op = PinnedZero.of("l2", [(0, 4096), (1 << 30, ZERO_PAGE_BYTES + 100)])
    assert (op.kind, op.direction, op.src_space, op.dst_space) == ("memset", "d2h", "zeros", "l2")
    assert op.dst_offsets.tolist() == [0, 1 << 30, (1 << 30) + ZERO_PAGE_BYTES]
    assert op.sizes.tolist() == [4096, ZERO_PAGE_BYTES, 100]
    assert op.src_offsets.tolist() == [0, 0, 0] and op.nbytes == 4096 + ZERO_PAGE_BYTES + 100


DEMOTE = Copy.between("demote", "d2h", Region("l1", 0, 4096), Region("l2", 0, 4096))


def _zero_then_submit(profile):
    """Two freed L2 slabs, then an op that does not write L2 (H2D) and one that does."""
    be = SimBackend(profile)
    l2 = be.memory("l2", 64 << 20, "pinned_host")
    be.memory("l1", 64 << 20, "device")

    def proc():
        l2.zero(0, 2 << 20)
        l2.zero(8 << 20, 2 << 20)
        t = be.submit(Ingest(purpose="next", dst=(Region("l1", 0, 4096),)), Stream.H2D)
        yield be.wait([t])
        t = be.submit(DEMOTE, Stream.D2H, [t])
        yield be.wait([t])
    be.run(proc())
    return be


def test_freed_pinned_ranges_are_zeroed_in_one_batch_before_the_next_op_that_writes_them():
    be = _zero_then_submit(load_profile("h200"))
    order = [(r.purpose, r.stream) for r in sorted(be.records(), key=lambda r: r.start_s)]
    assert order == [("next", "h2d"), ("zero_pinned", "d2h"), ("demote", "d2h")]


def test_the_simulator_charges_freed_pinned_ranges_as_a_d2h_copy_off_the_host():
    prof = load_profile("h200")
    be = _zero_then_submit(prof)
    zero = [r for r in be.records() if r.purpose == "zero_pinned"]
    assert [(r.kind, r.stream, r.count, r.nbytes) for r in zero] == [("memset", "d2h", 2, 4 << 20)]
    link = (4 << 20) / (prof.link.d2h_gb_per_s * 1e9) + 2 * prof.link.copy_latency_us * 1e-6
    assert zero[0].duration_s == pytest.approx(link, rel=0.01)  # the link model: a copy engine
    # the host pays three submits (the ingest, the zeroing batch, the demotion), no memset
    p = be.predictor
    submits = p.submit_seconds(PinnedZero.of("l2", [(0, 2 << 20), (8 << 20, 2 << 20)])) \
        + p.submit_seconds(Ingest(purpose="next", dst=(Region("l1", 0, 4096),))) \
        + p.submit_seconds(DEMOTE)
    assert be.host_busy_s() == pytest.approx(submits)


def test_where_the_host_runs_the_ops_a_pinned_zero_is_host_memset_time():
    from dataclasses import replace
    prof = load_profile("h200")
    on_host = replace(prof, host=replace(prof.host, runs_ops=True))
    be = _zero_then_submit(on_host)
    zero = [r for r in be.records() if r.purpose == "zero_pinned"]
    assert zero[0].duration_s == pytest.approx((4 << 20) / (prof.host.memset_gb_per_s * 1e9))


@pytest.mark.cuda
def test_the_cuda_backend_zeroes_a_freed_pinned_range_before_the_host_sees_it():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        be = CudaBackend()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    try:
        l2 = be.memory("l2", 3 * ZERO_PAGE_BYTES, "pinned_host")
        l2.array[:] = 0xA5
        size = ZERO_PAGE_BYTES + 4096  # two rows: a page and a tail
        l2.zero(4096, size)
        be.memory("l1", 1 << 20, "device")
        be.submit(Ingest(purpose="next", dst=(Region("l1", 0, 4096),),
                         source=lambda i: np.ones(4096, np.uint8)), Stream.H2D)
        # owed, not done on the host, nor yet queued (no op that writes L2 came)
        assert (l2.array[4096:4096 + size] == 0xA5).all()
        got = l2.view(0, 3 * ZERO_PAGE_BYTES)  # flushes and waits
        assert (got[4096:4096 + size] == 0).all()
        assert (got[:4096] == 0xA5).all() and (got[4096 + size:] == 0xA5).all()
        zero = [r for r in be.records() if r.purpose == "zero_pinned"]
        assert [(r.kind, r.stream, r.count) for r in zero] == [("memset", "d2h", 2)]
    finally:
        be.close()
