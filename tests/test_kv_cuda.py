"""The KV engine on the GPU (``cuda`` marker; skipped elsewhere with the reason): the
virtual-memory L1 arena maps exactly the pages the live blocks need, in a needle run and
under TieredCache, and TieredCache on CUDA equals DynamicCache at a full budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run
from synapse.scenarios.tiny import TINY_NEEDLE

pytestmark = pytest.mark.cuda


def _cuda_backend_or_skip():
    try:
        from synapse.hw.cuda_backend import CudaBackend
        CudaBackend().close()
    except Exception as e:  # ImportError, BackendUnavailable
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    try:
        import cuda.bindings  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs NVIDIA cuda-bindings for virtual memory: {e}")


def _torch_cuda_or_skip():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    return torch


@pytest.mark.parametrize("policy", ["h2o", "lru"])
def test_a_needle_run_maps_exactly_the_pages_its_live_blocks_need(policy):
    _cuda_backend_or_skip()
    # blocks of 512 KiB (8 layers, 8 KV heads of 128): a 20% budget spans several pages
    r = run("needle", TINY_NEEDLE + [f"policy.eviction={policy}", "policy.demote=l2_int4",
                                     "memory.l1_budget=20%", "model.layers=8", "model.kv_heads=8",
                                     "model.head_dim=128", "checks.data=false"], "cuda")
    assert "virtual memory" in r.result["environment"]["backend"]["l1_arena"]
    tl = r.result["timeline"]
    page = 2 << 20
    pages = np.asarray(tl["l1_pages"])
    live = np.asarray(tl["l1_bytes"])
    assert len(pages) == len(live) > 10
    assert np.array_equal(pages, -(-live // page)), "pages mapped != ceil(live KV bytes / 2 MiB)"
    assert r.metrics["evictions"] > 0 and pages.max() > pages.min()


def test_tiered_cache_on_cuda_virtual_memory_equals_dynamic_cache_and_maps_its_live_blocks():
    torch = _torch_cuda_or_skip()
    from transformers import DynamicCache
    from hf_models import VOCAB, tiny_model
    from synapse.hf import TieredCache
    m = tiny_model("qwen2", layers=2, dtype=torch.float16).cuda()
    ids = torch.randint(3, VOCAB, (1, 300), generator=torch.Generator().manual_seed(0)).cuda()

    def gen(cache):
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=24, do_sample=False, past_key_values=cache)

    ref = gen(DynamicCache(config=m.config))
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=1024, demote="l2",
                        block_tokens=16, backend="cuda", vmm=True)
    assert torch.equal(gen(cache), ref)
    t = cache.telemetry()
    assert "virtual memory" in t["l1_arena"]
    sh = cache.shape
    per_plane = cache.device_kv_bytes() // sh.planes
    assert t["vmm"]["pages_mapped"] == sh.planes * math.ceil(per_plane / t["vmm"]["page_bytes"])


def test_tiered_cache_on_cuda_keeps_its_budget_with_int4_demotion():
    torch = _torch_cuda_or_skip()
    from hf_models import VOCAB, tiny_model
    from synapse.hf import TieredCache
    m = tiny_model("llama", dtype=torch.float16).cuda()
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(1)).cuda()
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=64, demote="int4",
                        block_tokens=16, backend="cuda", model=m)
    with torch.no_grad():
        m.generate(ids, max_new_tokens=48, do_sample=False, past_key_values=cache,
                   prefill_chunk_size=32)
    t = cache.telemetry()
    assert t["l1_peak_bytes"] <= t["l1_budget_bytes"]
    assert t["demotions"] > 0 and t["l2_hits"] > 0 and t["bytes_h2d"] > 0
    assert 0 < t["int4_rel_rmse"] < 0.2


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_the_fused_read_through_kernel_equals_the_torch_path_bit_for_bit(keys):
    torch = _torch_cuda_or_skip()
    try:
        from synapse.hw import kernels
        kernels.use_primary_context(torch.cuda.current_device())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs PyCUDA: {e}")
    from synapse.hf.int4 import dequantize_layer_rows, quantize_layer_rows
    g = torch.Generator(device="cuda").manual_seed(0)
    bt, heads, dim, group = 16, 4, 128, 64
    tok = heads * dim
    l1k = torch.randn((300, heads, dim), generator=g, device="cuda").half()
    l1v = torch.randn((300, heads, dim), generator=g, device="cuda").half()
    m, cut, n = 7, 160, 181  # L1: 160 tokens before the tail, 21 from it on
    k = torch.randn((m, bt, tok), generator=g, device="cuda").half()
    v = torch.randn((m, bt, tok), generator=g, device="cuda").half()
    k[:, :, 5] *= 50.0  # an outlier channel
    rows = quantize_layer_rows(k, v, keys, group)  # the layer's L2 run: m layer rows
    dk, dv = dequantize_layer_rows(rows, bt, tok, keys, group, torch.float16)
    want_k = torch.cat((l1k[:cut], dk.view(m * bt, heads, dim), l1k[cut:n]))
    want_v = torch.cat((l1v[:cut], dv.view(m * bt, heads, dim), l1v[cut:n]))
    got_k, got_v = torch.empty_like(want_k), torch.empty_like(want_v)
    kernels.kv_assemble_int4(l1k.data_ptr(), l1v.data_ptr(), rows.data_ptr(), got_k.data_ptr(),
                             got_v.data_ptr(), cut, m, bt, tok, n + m * bt, group,
                             key_channel=keys == "channel", stream=None)
    torch.cuda.synchronize()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_tiered_cache_int4_on_cuda_equals_the_same_cache_on_the_cpu(keys):
    """The fused read-through and the device-side quantization give the CPU path's logits
    (fp16 model, teacher-forced): the same INT4 bytes and the same dequantized keys."""
    torch = _torch_cuda_or_skip()
    from hf_models import VOCAB, tiny_model
    from synapse.hf import TieredCache
    ids = torch.randint(3, VOCAB, (1, 96), generator=torch.Generator().manual_seed(2))
    steps = [ids[:, :16]] + [ids[:, i:i + 1] for i in range(16, 96)]
    out = {}
    for backend in ("cpu", "cuda"):
        m = tiny_model("llama", seed=1, dtype=torch.float16)
        m = m.cuda() if backend == "cuda" else m
        cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=32, demote="int4",
                            block_tokens=16, backend=backend, int4_keys=keys)
        with torch.no_grad():
            out[backend] = [m(x.to(m.device), past_key_values=cache, use_cache=True).logits[:, -1].float().cpu()
                            for x in steps]
        assert cache.telemetry()["l2_hits"] > 0
        if backend == "cuda":
            assert cache._assemble_kernel(), getattr(cache, "_fused_reason", "")
    worst = max(float((a - b).abs().max()) for a, b in zip(out["cpu"], out["cuda"]))
    scale = max(float(a.abs().max()) for a in out["cpu"])
    assert worst <= 0.02 * scale, (worst, scale)  # fp16 matmuls differ between CPU and GPU
