"""The new tokens' attention over a cached prefix on fused kernels
(``synapse.hf.prefix_attention``: two flash-attention calls merged by log-sum-exp, or
SDPA's bottom-right causal bias where flash refuses): the same logits and tokens as the
model's own ``sdpa``, on tiny random Llama and Qwen2 models (CPU, seeded, no
downloads)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402
from torch.nn.attention.bias import CausalBias  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function  # noqa: E402

from synapse.hf.prefix import generate_with_prefix, prefill_with_prefix, prefix_fingerprint  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from synapse.hf import prefix_attention as pa  # noqa: E402
from synapse.hf.prefix_attention import (PREFIX_SDPA, prefix_mask, prefix_sdpa,  # noqa: E402
                                         split_attention)
from synapse.prefix import PrefixStore  # noqa: E402

# fp32 on the CPU: SDPA over the bias and over transformers' boolean mask sum the same
# terms; the stated bound leaves room for a different kernel's order of summation.
ATOL = RTOL = 1e-5


def ids(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


class FusedCalls:
    """Counts attention calls that took the fused branch: the split flash calls, or SDPA
    over the bottom-right causal bias where flash refused."""

    def __init__(self, monkeypatch):
        self.calls = 0
        split, bias = pa.split_attention, CausalBias._dispatch

        def counted_split(*args, **kwargs):
            out = split(*args, **kwargs)
            self.calls += out is not None
            return out

        def counted_bias(*args, **kwargs):
            self.calls += 1
            return bias(*args, **kwargs)
        monkeypatch.setattr(pa, "split_attention", counted_split)
        monkeypatch.setattr(CausalBias, "_dispatch", staticmethod(counted_bias))


def lower_right_reference(q, k, v):
    """Softmax attention with the bottom-right causal mask, written out in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, 1).double() for t in (k, v))
    n, s = q.shape[-2], k.shape[-2]
    scores = (q.double() @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~causal_lower_right(n, s)._materialize("cpu"), float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("heads, kv_heads, new, prefix", [
    (4, 4, 7, 3), (4, 2, 5, 12), (8, 2, 16, 100), (2, 1, 33, 1)])
def test_split_flash_attention_is_softmax_over_prefix_and_new_keys(heads, kv_heads, new, prefix):
    g = torch.Generator().manual_seed(heads * 1000 + new)
    q = torch.randn(2, heads, new, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, prefix + new, 16, generator=g) for _ in range(2))
    got = split_attention(q, k, v, prefix)
    torch.testing.assert_close(got.double(), lower_right_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_where_flash_refuses_the_bias_kernel_runs_and_the_refusal_is_remembered(monkeypatch):
    model = tiny_model("qwen2")
    prompt = ids(100)
    own = logits_over_new_tokens(model, prompt, 64, fused=False)
    tried = []

    def refuse(*args, **kwargs):
        tried.append(1)
        raise RuntimeError("no kernel for these inputs")
    monkeypatch.setattr(pa, "_attend", refuse)
    monkeypatch.setattr(pa, "_refused", set())
    spy = FusedCalls(monkeypatch)
    fused = logits_over_new_tokens(model, prompt, 64, fused=True)
    assert len(tried) == 1  # asked once, not once a layer
    assert spy.calls == model.config.num_hidden_layers  # every layer on the bias kernel
    torch.testing.assert_close(fused, own, atol=ATOL, rtol=RTOL)


def logits_over_new_tokens(model, prompt, cached: int, fused: bool):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :cached], past_key_values=cache)
        with prefix_sdpa(model, fused):
            return model(prompt[:, cached:], past_key_values=cache).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_new_tokens_attending_to_a_prefix_get_the_models_own_logits(family, monkeypatch):
    model = tiny_model(family)
    prompt = ids(100)
    own = logits_over_new_tokens(model, prompt, 64, fused=False)
    spy = FusedCalls(monkeypatch)
    fused = logits_over_new_tokens(model, prompt, 64, fused=True)
    assert spy.calls == model.config.num_hidden_layers  # one per layer: the fused branch ran
    torch.testing.assert_close(fused, own, atol=ATOL, rtol=RTOL)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_reuse_with_the_fused_attention_gives_the_same_greedy_tokens(family, monkeypatch):
    model = tiny_model(family)
    prompt = ids(90, seed=4)
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=10, do_sample=False,
                               past_key_values=DynamicCache(config=model.config))
    spy = FusedCalls(monkeypatch)
    with PrefixStore(prefix_fingerprint(model, 16), l2_bytes=1 << 24) as store:
        with torch.no_grad():
            prefill_with_prefix(model, prompt[:, :70], store=store)  # saves 4 chunks
            out = generate_with_prefix(model, prompt, store=store, max_new_tokens=10,
                                       do_sample=False)
    assert spy.calls == model.config.num_hidden_layers  # the prefill over 26 new tokens only
    assert torch.equal(out, plain)


def test_the_models_own_attention_is_restored_when_the_call_fails():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"), prefix_sdpa(model):
        assert model.config._attn_implementation == PREFIX_SDPA
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_on_another_attention_is_left_alone():
    model = tiny_model()
    model.set_attn_implementation("eager")
    with prefix_sdpa(model):
        assert model.config._attn_implementation == "eager"


def mask_args(**kw):
    args = dict(batch_size=1, q_length=4, kv_length=10, q_offset=6, kv_offset=0,
                attention_mask=None, allow_is_causal_skip=True, device="cpu")
    return args | kw


def test_an_exactly_causal_mask_with_an_offset_becomes_the_bottom_right_bias():
    bias = prefix_mask(**mask_args())
    assert isinstance(bias, CausalBias)
    assert torch.equal(bias._materialize("cpu"), sdpa_mask(**mask_args())[0, 0])


@pytest.mark.parametrize("case", ["padding", "sliding window", "batch of two",
                                  "no skip allowed", "not at the end"])
def test_any_other_mask_is_sdpas_own(case):
    pad = torch.ones(1, 10, dtype=torch.bool)
    pad[0, 2] = False
    kw = {"padding": dict(attention_mask=pad),
          "sliding window": dict(mask_function=sliding_window_causal_mask_function(3)),
          "batch of two": dict(batch_size=2),
          "no skip allowed": dict(allow_is_causal_skip=False),
          "not at the end": dict(q_offset=5)}[case]
    got, want = prefix_mask(**mask_args(**kw)), sdpa_mask(**mask_args(**kw))
    assert not isinstance(got, CausalBias)
    assert torch.equal(got, want)


@pytest.mark.parametrize("q_length, q_offset", [(1, 9), (10, 0)])
def test_decode_steps_and_a_prefill_without_prefix_keep_sdpas_path(q_length, q_offset):
    args = mask_args(q_length=q_length, q_offset=q_offset)
    assert prefix_mask(**args) is None and sdpa_mask(**args) is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_on_the_gpu_the_split_flash_kernels_run_and_match_the_mask(family, monkeypatch):
    model = tiny_model(family, dtype=torch.float16).cuda()
    prompt = ids(600).cuda()
    own = logits_over_new_tokens(model, prompt, 512, fused=False).float()
    monkeypatch.setattr(pa, "_refused", set())
    monkeypatch.setattr(pa, "used", set())
    spy = FusedCalls(monkeypatch)
    fused = logits_over_new_tokens(model, prompt, 512, fused=True).float()
    assert pa.used == {"cudnn"} and not pa._refused  # fp16, grouped key heads, no bias kernel
    assert spy.calls == model.config.num_hidden_layers
    torch.testing.assert_close(fused, own, atol=2e-2, rtol=2e-2)  # fp16, another kernel


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_on_the_gpu_split_attention_matches_the_float64_reference_with_grouped_heads(kernel):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 200, 128, device="cuda", dtype=torch.float16, generator=g)
    k, v = (torch.randn(1, 2, 1224, 128, device="cuda", dtype=torch.float16, generator=g)
            for _ in range(2))
    got = split_attention(q, k, v, 1024, kernels=(kernel,))
    assert got is not None, f"{kernel} refused fp16 [1, 8, 200, 128] over 2 key heads"
    want = lower_right_reference(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype, head_dim, asked", [
    (torch.float16, 128, True), (torch.bfloat16, 64, True), (torch.float32, 128, False),
    (torch.float16, 320, False), (torch.float16, 12, False)])
def test_the_cuda_kernels_are_asked_for_half_precision_and_their_head_sizes_only(
        dtype, head_dim, asked):
    assert pa._cuda_takes(torch.empty(1, 4, 8, head_dim, dtype=dtype)) is asked


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_fp32_takes_the_bias_kernel_and_matches_the_mask(monkeypatch):
    model = tiny_model("llama").cuda()
    prompt = ids(600).cuda()
    own = logits_over_new_tokens(model, prompt, 512, fused=False)
    monkeypatch.setattr(pa, "used", set())
    fused = logits_over_new_tokens(model, prompt, 512, fused=True)
    assert not pa.used  # neither cuDNN nor flash ran fp32
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, own, atol=1e-4, rtol=1e-4)
