"""One attention op for several requests (``Attention.segments``): each request gets what
its own op would have given, the serving driver issues one op per decode step, the tenant
check stays per request, and the simulator charges the batch as one launch of all bytes.

The backend tests run on the cpu backend anywhere and on the cuda backend (``cuda``
marker) on a GPU."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from conftest import run
from synapse.blocks import Fmt
from synapse.errors import AccessDenied
from synapse.hw.attention_ref import BlockRef, attention_decode_ref
from synapse.hw.kv_layout import KVLayout
from synapse.ops import Attention, Ingest, Region, Stream
from synapse.scenarios.tiny import TINY_TENANTS, TINY_TSUNAMI

LAYOUT = KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=16, group_size=32,
                  int4_keys="token")
# (format, valid tokens) of each block, per request: one block, several, a request whose
# only block has no valid token, a request without blocks, INT4 blocks among fp16 ones
REQUESTS = [[("fp16", 16)],
            [("fp16", 16), ("fp16", 16), ("fp16", 9)],
            [("fp16", 0)],
            [],
            [("int4", 16), ("fp16", 5), ("int4", 3), ("fp16", 16), ("fp16", 1)]]
_FMT = {"fp16": int(Fmt.FP16), "int4": int(Fmt.INT4)}


def _backend(name):
    if name == "cpu":
        from synapse.hw.host_backend import HostBackend
        return HostBackend()
    try:
        from synapse.hw.cuda_backend import CudaBackend
        return CudaBackend()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")


BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _blocks_in_l1(backend, rng):
    """Every request's blocks written into one L1 space; returns the columns of each
    request and the host buffers (for the reference)."""
    stride = -(-LAYOUT.fp16_bytes // 256) * 256
    nblocks = sum(map(len, REQUESTS))
    backend.memory("l1", max(nblocks, 1) * stride, "device")
    bufs, cols, regions = [], [], []
    for req in REQUESTS:
        offs, fmts, nvs, sizes, refs = [], [], [], [], []
        for fmt, nv in req:
            kv = (2.0 * rng.standard_normal(LAYOUT.shape)).astype(np.float16)
            buf = LAYOUT.pack(kv, fmt)
            off = len(regions) * stride
            regions.append(Region("l1", off, buf.size))
            bufs.append(buf)
            offs.append(off), fmts.append(_FMT[fmt]), nvs.append(nv), sizes.append(buf.size)
            refs.append(BlockRef(buf, fmt, nv))
        cols.append((np.array(offs, np.int64), np.array(fmts, np.int8),
                     np.array(nvs, np.int64), np.array(sizes, np.int64), refs))
    t = backend.submit(Ingest(purpose="test", dst=tuple(regions),
                              source=lambda i: bufs[i]), Stream.H2D)
    return cols, t


def _op(cols, queries, segments=None):
    cat = [np.concatenate([c[k] for c in cols]).astype(cols[0][k].dtype) for k in range(4)]
    return Attention(purpose="decode", offsets=cat[0], fmts=cat[1], n_valid=cat[2],
                     sizes=cat[3], query=queries, layout=LAYOUT, group_size=LAYOUT.group_size,
                     softmax_scale=0.125, segments=segments)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_one_op_over_segments_gives_each_request_its_own_op_s_result(backend_name):
    rng = np.random.default_rng(zlib.crc32(backend_name.encode()))
    be = _backend(backend_name)
    try:
        cols, ingest = _blocks_in_l1(be, rng)
        queries = [(2.0 * rng.standard_normal((2, 2, 64))).astype(np.float32) for _ in REQUESTS]
        alone = [be.submit(_op([c], q), Stream.COMPUTE, [ingest]) for c, q in zip(cols, queries)]
        seg = np.concatenate([[0], np.cumsum([len(r) for r in REQUESTS])]).astype(np.int64)
        batched = be.result(be.submit(_op(cols, queries, seg), Stream.COMPUTE, [ingest]))
        assert len(batched) == len(REQUESTS)
        for (out, lse), t, c, q in zip(batched, alone, cols, queries):
            want_out, want_lse = be.result(t)
            ref_out, ref_lse = attention_decode_ref(q, c[4], LAYOUT, 0.125)
            assert out.shape == (2, 2, 64) and lse.shape == (2, 2, len(c[4]))
            if backend_name == "cpu":  # the reference, request by request: exactly equal
                np.testing.assert_array_equal(out, want_out)
                np.testing.assert_array_equal(lse, want_lse)
                np.testing.assert_array_equal(out, ref_out)
                np.testing.assert_array_equal(lse, ref_lse)
            else:  # the kernel splits a batch's blocks differently: fp32 merge order only
                np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
                np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
                fin = np.isfinite(ref_lse)
                np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-5, atol=5e-5)
        assert (batched[3][0] == 0).all()  # no blocks: output 0, as alone
        assert np.isneginf(batched[2][1]).all()  # no valid token: -inf lse
    finally:
        be.close()


def _skip_without_gpu(backend_name):
    if backend_name == "cuda":
        _backend("cuda").close()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_serving_step_issues_one_attention_op_for_all_running_requests(backend_name):
    _skip_without_gpu(backend_name)
    r = run("tsunami", TINY_TSUNAMI, backend_name)
    att = [i for i, k in enumerate(r.ops["kind"]) if k == "attention"]
    steps = r.result["metrics"]["latency"]["step"]["count"]
    assert 0 < len(att) <= steps
    # each op reads every running request's blocks: more blocks than one request holds
    assert max(r.ops["count"][i] for i in att) > 64 // 16 + 2
    assert r.result["metrics"]["served"] > 0


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("scenario, overrides", [("tsunami", TINY_TSUNAMI),
                                                 ("tenants", TINY_TENANTS)])
def test_batched_attention_leaves_the_policy_s_decisions_as_on_the_simulator(scenario, overrides,
                                                                             backend_name):
    _skip_without_gpu(backend_name)
    sim, hw = run(scenario, overrides, "sim"), run(scenario, overrides, backend_name)
    assert sim.decisions == hw.decisions and len(sim.decisions) > 0
    assert sim.result["metrics"]["l1_hits"] == hw.result["metrics"]["l1_hits"]
    if "roundtrip_checked" in hw.result["metrics"]:  # data checks on real bytes
        assert hw.result["metrics"]["roundtrip_mismatches"] == 0
        assert hw.result["metrics"]["zero_on_free_violations"] == 0


def _driver_with_two_tenants_running():
    from synapse.drivers.serving import ServingDriver
    from synapse.scenarios.loader import load_scenario
    from synapse.sim.backend import SimBackend
    from synapse.sim.profile import load_profile
    s = load_scenario("tenants", TINY_TENANTS)
    profile = load_profile(s.profile)
    be = SimBackend(profile)
    d = ServingDriver(s, be, profile)
    proc = d.process()
    seen = {}

    def watch():  # run the driver's steps until requests of both tenants hold blocks
        while True:
            ev = next(proc)
            yield ev
            for r in d.requests:
                if r.state == "running" and r.blocks:
                    seen.setdefault(r.tenant, r)
            if len(seen) == 2:
                return
    be.run(watch())
    return d, seen["a"], seen["b"]


def test_a_batch_that_reads_another_tenant_s_block_is_refused_naming_the_reader():
    d, a, b = _driver_with_two_tenants_running()
    ids = np.array([a.blocks[0], b.blocks[0]], np.int64)
    nv = np.ones(2, np.int64)
    before = d.mgr.spaces.l1.num_denied
    # each request reads its own block: accepted
    d.mover.attention_batch(ids, nv, np.array([0, 1, 2]), ["a", "b"], None, 1.0, LAYOUT)
    # tenant a's segment holds b's block
    with pytest.raises(AccessDenied, match=r"tenant 'a' denied: block %d" % b.blocks[0]):
        d.mover.attention_batch(ids[::-1], nv, np.array([0, 1, 2]), ["a", "b"], None, 1.0,
                                LAYOUT)
    assert d.mgr.spaces.l1.num_denied == before + 2  # both misplaced blocks counted


def test_the_simulator_charges_a_batch_as_one_launch_of_every_request_s_bytes():
    from synapse.sim.predictor import ProfilePredictor
    from synapse.sim.profile import load_profile
    p = ProfilePredictor(load_profile("h200"))
    k = p.profile.kernels.attention
    sizes = [np.full(n, LAYOUT.fp16_bytes, np.int64) for n in (4, 100, 9)]
    flops = [1e6 * len(s) for s in sizes]

    def op(s, f, seg=None):
        return Attention(sizes=s, offsets=np.zeros(len(s), np.int64), flops=f, segments=seg)
    alone = [p.op_seconds(op(s, f)) for s, f in zip(sizes, flops)]
    batch = op(np.concatenate(sizes), sum(flops), np.array([0, 4, 104, 113]))
    assert p.op_seconds(batch) == pytest.approx(k.seconds(batch.nbytes, 1, sum(flops)))
    # one launch's fixed cost instead of three, the same bytes
    assert p.op_seconds(batch) == pytest.approx(sum(alone) - 2 * k.fixed_us * 1e-6)
    assert p.submit_seconds(batch) == p.submit_seconds(op(sizes[0], flops[0]))
