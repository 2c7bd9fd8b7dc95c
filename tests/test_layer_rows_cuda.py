"""The fused demotion kernel on the GPU (marked cuda; skipped without PyCUDA and a device):
kv_quantize_layer_rows_int4 gives the bytes of ``quantize_layer_rows`` (torch ops, on the
same device and on the CPU) and its error telemetry, and a TieredCache run with it gives the
L2 bytes, logits, tokens and decisions of the same run on torch ops. The indexing and the
arithmetic are checked on any machine by tests/test_int4_layer_rows.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from synapse.hf.int4 import dequantize_layer_rows, quantize_layer_rows  # noqa: E402
from synapse.hw import int4  # noqa: E402

GUARD = 512

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("pycuda.driver", reason="needs PyCUDA")
    from synapse.hw import kernels
    kernels.use_primary_context(0)
    return kernels


def edge_data(shape, seed: int, group_size: int) -> torch.Tensor:
    import numpy as np
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = int4.edge_case_input(rng, max(n, 10 * group_size) // group_size * group_size + group_size,
                             group_size)[:n]
    return torch.from_numpy(x.copy()).view(shape).cuda()


def torch_reference(kt, vt, keys, g):
    """quantize_layer_rows' bytes and the float64 (err, ref) of the torch ops' definition."""
    rows, bt, c = kt.shape
    want = quantize_layer_rows(kt, vt, keys, g)
    bk, bv = dequantize_layer_rows(want, bt, c, keys, g, torch.float32)
    rk, rv = kt.reshape(rows, -1).float(), vt.reshape(rows, -1).float()
    err = ((bk - rk).double() ** 2).sum() + ((bv - rv).double() ** 2).sum()
    ref = (rk.double() ** 2).sum() + (rv.double() ** 2).sum()
    return want, float(err), float(ref)


def where_they_differ(got, want, bt, c, keys, g) -> str:
    """Which sections of which rows differ (key codes / scales / zeros, value ...), for a
    failure message that says what broke rather than that something did."""
    from synapse.hf.int4 import key_row_bytes
    n = bt * c
    kb = key_row_bytes(bt, c, keys, g)
    kg = c if keys == "channel" else n // g
    vg = n // g
    sections = [("key codes", 0, n // 2), ("key scales", n // 2, n // 2 + 2 * kg),
                ("key zeros", n // 2 + 2 * kg, kb), ("value codes", kb, kb + n // 2),
                ("value scales", kb + n // 2, kb + n // 2 + 2 * vg),
                ("value zeros", kb + n // 2 + 2 * vg, kb + n // 2 + 4 * vg)]
    diff = (got.view(want.shape[0], -1) != want.view(want.shape[0], -1)).cpu()
    parts = []
    for name, lo, hi in sections:
        d = diff[:, lo:hi]
        if d.any():
            rows = d.any(dim=1).nonzero().flatten()
            first = int(rows[0])
            cols = d[first].nonzero().flatten()
            parts.append(f"{name}: {int(d.sum())} bytes in {rows.numel()} of {diff.shape[0]} rows "
                         f"(first row {first}, offsets {cols[:6].tolist()} of {hi - lo}; "
                         f"got {got.view(want.shape[0], -1)[first, lo + cols[:6]].tolist()}, "
                         f"want {want.view(want.shape[0], -1)[first, lo + cols[:6]].tolist()})")
    return "; ".join(parts) or "no byte differs"


# Per-channel keys failed the first assertion below on the H200 in the seventh session (10
# of 12 cases): torch ops on CUDA against torch ops on the CPU, before any kernel ran
# (synapse.hf.int4._quantize_groups divided by a Python scalar, which CUDA multiplies by its
# reciprocal). Every key format is held to the same bytes now.
KEYS = int4.KEY_FORMATS


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("g", int4.GROUP_SIZES)
@pytest.mark.parametrize("layers, blocks, bt, heads, dim", [
    (1, 1, 4, 1, 128), (2, 3, 16, 2, 128), (28, 37, 16, 4, 128), (3, 700, 8, 8, 128)])
def test_the_kernel_writes_the_bytes_of_the_torch_ops(kernels, keys, g, layers, blocks, bt, heads, dim):
    c = heads * dim
    n = bt * c
    x = edge_data((2 * layers, blocks, n), layers * 131 + blocks + g, g)  # the gathered blocks
    kv = x.view(layers, 2, blocks, bt, c)
    kt = kv[:, 0].reshape(-1, bt, c)
    vt = kv[:, 1].reshape(-1, bt, c)
    want, err, ref = torch_reference(kt, vt, keys, g)
    assert torch.equal(want.cpu(), quantize_layer_rows(kt.cpu(), vt.cpu(), keys, g))
    rows = layers * blocks
    for poison in (0xA5, 0x5A):  # a byte left unwritten cannot match both times
        out = torch.full((want.numel() + GUARD,), poison, dtype=torch.uint8, device="cuda")
        sums = torch.zeros(2, dtype=torch.float64, device="cuda")
        kernels.quantize_layer_rows_int4(x.data_ptr(), x.data_ptr() + blocks * n * 2, out.data_ptr(),
                                         sums.data_ptr(), rows, bt, c, g, keys,
                                         run_rows=blocks, run_stride=2 * blocks * n)
        torch.cuda.synchronize()
        got = out[:want.numel()].view_as(want)
        assert torch.equal(got, want), (keys, g, poison, where_they_differ(got, want, bt, c, keys, g))
        assert (out[want.numel():] == poison).all(), "wrote past the last row"
        got_err, got_ref = sums.tolist()
        assert got_ref == pytest.approx(ref, rel=1e-6)
        assert got_err == pytest.approx(err, rel=1e-5)
    # plain [rows][n] operands: one run
    out = torch.empty_like(want)
    sums = torch.zeros(2, dtype=torch.float64, device="cuda")
    kc, vc = kt.contiguous(), vt.contiguous()
    kernels.quantize_layer_rows_int4(kc.data_ptr(), vc.data_ptr(), out.data_ptr(), sums.data_ptr(),
                                     rows, bt, c, g, keys)
    torch.cuda.synchronize()
    assert torch.equal(out, want), where_they_differ(out, want, bt, c, keys, g)


@pytest.mark.parametrize("keys", KEYS)
def test_a_tiered_cache_run_on_the_kernel_equals_the_run_on_torch_ops(keys, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("pycuda.driver", reason="needs PyCUDA")
    from hf_models import VOCAB, tiny_model
    from synapse.hf import TieredCache
    from synapse.hw import kernels as hw_kernels
    from synapse.kv import torch_backend

    launched = []  # rows of each fused launch: the run must take the kernel, not just resolve it
    real = hw_kernels.kv_quantize_layer_rows_launcher

    def counting(*args, **kw):
        launch = real(*args, **kw)

        def counted(*a):
            launched.append(a[4])
            return launch(*a)
        return counted
    monkeypatch.setattr(hw_kernels, "kv_quantize_layer_rows_launcher", counting)

    m = tiny_model("llama", dtype=torch.float16).cuda()
    ids = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(4)).cuda()

    def run(fused: bool):
        monkeypatch.setattr(torch_backend, "FUSED_QUANTIZE", fused)
        monkeypatch.setattr(torch_backend, "FUSED_CHANNEL_KEYS", fused)  # the kernel, even held back
        cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                            block_tokens=8, backend="cuda", model=m, int4_keys=keys)
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache,
                             output_logits=True, return_dict_in_generate=True,
                             prefill_chunk_size=16)
        be = cache._backend
        assert be.q_count > 0, "nothing was demoted: the test would compare nothing"
        return cache, be, out

    fast_cache, fast, a = run(True)
    assert launched and callable(fast._fused_quantize), fast.fused_quantize_reason
    launched.clear()
    slow_cache, slow, b = run(False)
    assert not launched and slow._fused_quantize is False
    torch.cuda.synchronize()
    fl, sl = fast.space("l2").t, slow.space("l2").t
    assert torch.equal(fl, sl), f"{int((fl != sl).sum())} of {fl.numel()} L2 bytes differ"
    assert fast.q_count == slow.q_count
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)
    assert fast_cache.decisions() == slow_cache.decisions()
    assert fast.q_count == slow.q_count
    fe, fr = fast.int4_error()
    se, sr = slow.int4_error()
    assert fr == pytest.approx(sr, rel=1e-6) and fe == pytest.approx(se, rel=1e-5)
    ft, st = fast_cache.telemetry(), slow_cache.telemetry()
    assert ft["int4_rel_rmse"] == pytest.approx(st["int4_rel_rmse"], rel=1e-5)
