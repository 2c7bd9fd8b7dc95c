"""A TieredCache's prefill chunks after the first run on SDPA's fused bottom-right causal
path (``synapse.hf.chunk_attention``) where nothing was dropped: the same tokens,
decisions and (within a kernel's rounding) logits as over transformers' explicit mask,
and the model's own attention back after every pass."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402
from test_hf_prefix_attention import FusedCalls  # noqa: E402 (SDPA calls on the bias)

from synapse.hf import TieredCache  # noqa: E402
from synapse.hf.chunk_attention import ChunkAttention  # noqa: E402


def prompt(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def run(model, demote, monkeypatch=None, fused=True, chunk=16, family_seed=0):
    if not fused:
        monkeypatch.setattr(ChunkAttention, "_before", lambda self, *a: None)
    ids = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(family_seed))
    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=32, demote=demote,
                        block_tokens=8, model=model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=cache,
                             prefill_chunk_size=chunk, output_logits=True,
                             return_dict_in_generate=True)
    return out, cache


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("demote", ["int4", "l2"])
def test_chunks_after_the_first_attend_on_the_fused_path_with_the_same_results(
        family, demote, monkeypatch):
    model = tiny_model(family)
    spy = FusedCalls(monkeypatch)
    fused, cf = run(model, demote)
    layers = model.config.num_hidden_layers
    assert spy.calls == layers * (64 // 16 - 1)  # chunks 2, 3 and 4, every layer
    assert cf.chunk_attention.passes == 64 // 16 - 1
    assert model.config._attn_implementation == "sdpa"
    plain, cp = run(model, demote, monkeypatch, fused=False)
    assert cf.telemetry()["demotions"] > 0  # the chunks read L2 through
    assert torch.equal(fused.sequences, plain.sequences)
    assert cf.decisions() == cp.decisions()
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_after_a_dropped_block_the_chunks_keep_the_explicit_mask(monkeypatch):
    """demote='drop': the kept keys start after an offset, the mask is not the bias, and
    PREFIX_SDPA hands the pass to sdpa's own mask: the same tokens as without it."""
    model = tiny_model("llama")
    spy = FusedCalls(monkeypatch)
    fused, cf = run(model, "drop")
    assert cf.telemetry()["drops"] > 0
    plain, _ = run(model, "drop", monkeypatch, fused=False)
    assert torch.equal(fused.sequences, plain.sequences)
    assert spy.calls < model.config.num_hidden_layers * 3  # not every chunk took the bias


def test_the_models_attention_is_restored_when_a_chunk_fails(monkeypatch):
    model = tiny_model("llama")
    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                        block_tokens=8, model=model)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:, :16], past_key_values=cache, use_cache=True)
        monkeypatch.setattr(TieredCache, "_update",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            model(ids[:, 16:], past_key_values=cache, use_cache=True)
    assert model.config._attn_implementation == "sdpa"
    assert cache.chunk_attention.active is None and cache.chunk_attention.passes == 1


def test_a_model_on_another_attention_runs_its_chunks_as_before():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    _, cache = run(model, "int4")
    assert cache.chunk_attention.passes == 0
    assert model.config._attn_implementation == "eager"
    assert cache.telemetry()["demotions"] > 0


@pytest.mark.cuda
def test_on_cuda_the_chunks_take_the_fused_kernels_with_the_same_logits(monkeypatch):
    """fp16 on CUDA: SDPA runs the bias on flash (or memory-efficient) attention with its
    bottom-right causal mask; the logits stay within fp16 rounding of the explicit mask's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the fused bottom-right kernels run there")
    model = tiny_model("llama").to("cuda", torch.float16)

    def go(fused):
        if not fused:
            monkeypatch.setattr(ChunkAttention, "_before", lambda self, *a: None)
        ids = torch.randint(3, VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
        cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                            block_tokens=8, model=model, backend="cuda")
        with torch.no_grad():
            return model.generate(ids.cuda(), max_new_tokens=8, do_sample=False,
                                  past_key_values=cache, prefill_chunk_size=16,
                                  output_logits=True, return_dict_in_generate=True), cache
    spy = FusedCalls(monkeypatch)
    fused, cf = go(True)
    assert spy.calls == model.config.num_hidden_layers * 3
    assert cf.telemetry()["demotions"] > 0
    plain, _ = go(False)
    torch.testing.assert_close(fused.logits[0], plain.logits[0], atol=2e-2, rtol=2e-2)


def test_a_decode_step_on_the_cpu_keeps_sdpa_and_the_function_falls_back_to_it():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from synapse.hf import decode_attention as da
    m = tiny_model("qwen2", layers=2)
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=256, block_tokens=8, model=m)
    seen = []
    m.register_forward_pre_hook(lambda mod, a, k: seen.append(mod.config._attn_implementation),
                                with_kwargs=True)
    with torch.no_grad():
        m.generate(prompt(24), max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert seen and set(seen) == {"sdpa"}  # the CPU is never switched
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g)
    k, v = torch.randn(2, 1, 2, 40, 32, generator=g).unbind(0)
    attn = m.model.layers[0].self_attn
    got, _ = da.decode_attention(attn, q, k, v, None, scaling=0.2)
    want, _ = sdpa_attention_forward(attn, q, k, v, None, scaling=0.2)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_decode_steps_run_on_flash_and_the_model_gets_sdpa_back():
    from transformers import DynamicCache
    from synapse.hf import decode_attention as da
    m = tiny_model("qwen2", layers=2, dtype=torch.float16).cuda()
    ids = prompt(40).cuda()
    da.used.clear()

    def run(cache):
        with torch.no_grad():
            return m.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache,
                              output_logits=True, return_dict_in_generate=True)

    ref = run(DynamicCache(config=m.config))
    assert "flash" not in da.used
    out = run(TieredCache(m.config, policy="fifo", l1_budget_tokens=256, block_tokens=8,
                          backend="cuda", model=m))
    assert "flash" in da.used
    assert m.config._attn_implementation == "sdpa"
    for x, y in zip(out.logits, ref.logits):  # flash against SDPA's choice, fp16
        torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=0)
