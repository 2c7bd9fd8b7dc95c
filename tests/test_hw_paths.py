"""The hardware path end to end with real bytes: host mode on any machine, and the same
checks on the GPU (``cuda`` marker). Plus sim/hardware decision parity, fault handling and
the residency audit."""

import numpy as np
import pytest

from conftest import SMALL_NEEDLE, run
from synapse.scenarios.tiny import TINY_NEEDLE, TINY_STREAM, TINY_TENANTS, TINY_TSUNAMI


def _cuda_or_skip():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        CudaBackend().close()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")


BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_needle_output_matches_dense_attention_where_the_needle_is_kept(backend):
    if backend == "cuda":
        _cuda_or_skip()
    m = run("needle", TINY_NEEDLE + ["policy.demote=l2", "policy.eviction=belady"], backend).metrics
    assert m["needle_retained"] is True
    # fp16 KV and exact block masses: what remains is fp16 rounding of V and the
    # low-mass blocks left in L2 this step (below the access threshold).
    assert m["output_rel_error"] < 1e-3
    assert m["score_model_max_abs_err"] < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_budget_attention_equals_dense(backend):
    if backend == "cuda":
        _cuda_or_skip()
    m = run("needle", TINY_NEEDLE + ["memory.l1_budget=64MiB", "policy.high_watermark=1.0",
                                     "policy.low_watermark=1.0"], backend).metrics
    assert m["evictions"] == 0
    assert m["output_rel_error"] < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_layers_equal_the_resident_model(backend):
    if backend == "cuda":
        _cuda_or_skip()
    m = run("streaming", TINY_STREAM, backend).metrics
    assert m["output_equal"] is True
    assert m["streamed_bytes"] > m["ring_bytes"], "the ring must have been reused"


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trips_are_bit_exact_and_freed_slabs_read_zero(backend):
    if backend == "cuda":
        _cuda_or_skip()
    m = run("tsunami", TINY_TSUNAMI + ["checks.invariants=true"], backend).metrics
    assert m["roundtrip_checked"] > 0 and m["roundtrip_mismatches"] == 0
    assert m["zero_on_free_checked"] > 0 and m["zero_on_free_violations"] == 0
    assert m["lost_blocks"] == 0 and m["refusals"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_tenant_reads_are_refused_on_real_memory(backend):
    if backend == "cuda":
        _cuda_or_skip()
    m = run("tenants", TINY_TENANTS, backend).metrics
    assert m["cross_tenant_denied"] > 0 and m["cross_tenant_leaks"] == 0


@pytest.mark.cuda
def test_residency_audit_passes_on_the_gpu():
    _cuda_or_skip()
    m = run("needle", TINY_NEEDLE + ["checks.residency=true"], "cuda").metrics
    assert m["residency_checked_l1"] > 0 and m["residency_checked_l2"] > 0
    assert m["residency_violations"] == 0, m["residency_first_violation"]


@pytest.mark.parametrize("scenario,overrides", [
    ("needle", TINY_NEEDLE + ["policy.eviction=h2o", "policy.demote=l2_int4"]),
    ("needle", TINY_NEEDLE + ["policy.eviction=lru", "policy.demote=l2_int4",
                              "memory.int4_keys=token"]),
    ("needle", TINY_NEEDLE + ["policy.eviction=lru", "policy.demote=drop"]),
    ("streaming", TINY_STREAM),
    ("tsunami", TINY_TSUNAMI),
])
def test_sim_and_cpu_make_identical_decisions(scenario, overrides):
    sim = run(scenario, overrides, "sim")
    cpu = run(scenario, overrides, "cpu")
    assert sim.decisions == cpu.decisions
    assert len(sim.decisions) > 0


def _needle_driver(backend_name):
    from synapse.drivers.needle import NeedleDriver
    from synapse.runner import make_backend
    from synapse.scenarios.loader import load_scenario
    from synapse.sim.profile import load_profile
    prof = load_profile("h100-sxm")
    be = make_backend(backend_name, prof)
    return NeedleDriver(load_scenario("needle", TINY_NEEDLE), be, prof), be


@pytest.mark.parametrize("kind", ["copy_d2h", "int4_quantize"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_demotion_leaves_every_block_where_it_was(kind, backend):
    from synapse.blocks import Tier
    from synapse.errors import KernelError
    from synapse.policy import Demotion
    if backend == "cuda":
        _cuda_or_skip()
    d, be = _needle_driver(backend)
    try:
        d.mgr.demotion = Demotion.L2_INT4
        gen = d.process()
        be.run(_steps(gen, 3))  # three steps of real work
        before = d.table.tier[: len(d.table)].copy()
        l1_used = d.mgr.l1_used()
        victims = d.mgr._evictable(np.zeros(0, np.int64))[:4]
        moves = d.mgr._evict(victims, 99, forced=True)
        be.fail_next[kind] = 1
        with pytest.raises(KernelError, match=kind):
            be.run(d.mover.execute(moves, 99))
        d.mgr.check()
        assert np.array_equal(d.table.tier[: len(d.table)], before)
        assert d.mgr.l1_used() == l1_used
        assert all(d.table.tier[b] == Tier.L1 for b in victims)
        # and the same moves succeed once the fault is gone
        moves = d.mgr._evict(victims, 100, forced=True)
        be.run(d.mover.execute(moves, 100))
        assert all(d.table.tier[b] == Tier.L2 for b in victims)
    finally:
        be.close()


def _steps(gen, n):
    """Run only the first ``n`` yields of a driver generator."""
    for _ in range(n):
        yield next(gen)


def test_residency_audit_flags_blocks_that_are_not_where_the_table_says():
    from synapse.blocks import BlockSpec, Tier
    from synapse.hw.residency import audit
    from synapse.page_table import PageTable

    class Mem:
        def __init__(self, base):
            self.base = base

        def address(self, off):
            return self.base + off

    class H:
        def __init__(self, offset):
            self.offset = offset

    t = PageTable()
    t.add([BlockSpec(16)] * 2, Tier.L1, [H(0), H(16)])
    t.add([BlockSpec(16)], Tier.L2, [H(0)])
    mems = {"l1": Mem(0x1000), "l2": Mem(0x9000)}
    ok = audit(t, mems, lambda p: "device" if p < 0x9000 else "host")
    assert ok.ok and ok.checked == {"L1": 2, "L2": 1}
    bad = audit(t, mems, lambda p: "device" if p != 0x1010 else "unregistered")
    assert bad.violations == 2  # block 1 (pageable) and the L2 block (device memory)
    assert "block 1" in bad.first


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_channel_keys_keep_a_demoted_needle_answering(backend):
    """LRU demotes the needle's block to INT4 and the question fetches it back. Its key
    is the one the question matches; per token, the block's other channels set that
    token's steps and the match is lost (the output is off by more than its own size);
    per channel (KIVI), it stays within 15%."""
    if backend == "cuda":
        _cuda_or_skip()
    base = TINY_NEEDLE + ["policy.eviction=lru", "policy.demote=l2_int4"]
    err = {keys: run("needle", base + [f"memory.int4_keys={keys}"], backend).metrics
           for keys in ("channel", "token")}
    for m in err.values():
        assert m["fetches"] > 0 and m["needle_tier_at_question"] is not None
    assert err["channel"]["output_rel_error"] < 0.15 < 1.0 < err["token"]["output_rel_error"]


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_the_simulator_moves_the_int4_bytes_of_the_key_format(keys):
    """Every demotion and fetch of an INT4 block moves KVShape.int4_bytes: L layer rows of
    the format's key row plus the value row (the cpu backend writes exactly those)."""
    from synapse.drivers.kv_common import shape_of
    from synapse.scenarios.loader import load_scenario
    over = TINY_NEEDLE + ["policy.eviction=lru", "policy.demote=l2_int4",
                          f"memory.int4_keys={keys}"]
    shape = shape_of(load_scenario("needle", over))
    assert shape.int4_keys == keys
    for backend in ("sim", "cpu"):
        m = run("needle", over, backend).metrics
        by = m["bytes_by_purpose"]
        assert by["demote_d2h"] == m["demotions"] * shape.int4_bytes
        assert by["fetch_h2d"] == m["fetches"] * shape.int4_bytes


@pytest.mark.cuda
def test_dma_ingest_with_device_written_keys_equals_the_host_filled_bytes():
    """The cuda backend DMAs needle payloads from the pinned pool and writes each block's
    structured key on the device; the bytes must equal what the host fill path writes."""
    _cuda_or_skip()
    from synapse.hw.cuda_backend import CudaBackend
    from synapse.ops import Ingest, Region, Stream
    from synapse.workloads.payload import PayloadPool
    L, H, D, T, kd = 2, 2, 64, 16, 5
    tok = 2 * L * H * D
    be = CudaBackend()
    try:
        be.memory("l1", 4 * T * tok * 2, "device")
        pool = PayloadPool.for_backend(3, be)
        assert pool.pinned
        keys = np.arange(3 * kd, dtype=np.float16).reshape(3, kd) + 1
        items = [(0, 0, T), (1, 0, T), (2, 4, 7)]  # (block, first token, end token)
        regions = tuple(Region("l1", i * T * tok * 2, (hi - lo) * tok * 2)
                        for i, (_, lo, hi) in enumerate(items))

        def expect(i):
            b, lo, hi = items[i]
            kv = pool.take((b,), T * tok, copy=True).reshape(T, 2, L, H, D)[lo:hi]
            kv[:, 0, :, :, :kd] = keys[b]
            return kv.view(np.uint8).reshape(-1)

        def pinned(i):
            b, lo, _ = items[i]
            return pool.address(pool.window_start((b,), T * tok) + lo * tok), keys[b]
        op = Ingest(purpose="test", dst=regions, fill=lambda i, out: None, pinned=pinned,
                    key_rows=L * H, head_dim=D)
        be.result(be.submit(op, Stream.H2D))
        for i, r in enumerate(regions):
            np.testing.assert_array_equal(be.read_region(r), expect(i))
    finally:
        be.close()
