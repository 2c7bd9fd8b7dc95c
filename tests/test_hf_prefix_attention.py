"""The new tokens' attention over a cached prefix on SDPA's fused causal path
(``synapse.hf.prefix_attention``): the same logits and tokens as the model's own
``sdpa``, on tiny random Llama and Qwen2 models (CPU, seeded, no downloads)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402
from torch.nn.attention.bias import CausalBias  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function  # noqa: E402

from synapse.hf.prefix import generate_with_prefix, prefill_with_prefix, prefix_fingerprint  # noqa: E402
from synapse.hf.prefix_attention import PREFIX_SDPA, prefix_mask, prefix_sdpa  # noqa: E402
from synapse.prefix import PrefixStore  # noqa: E402

# fp32 on the CPU: SDPA over the bias and over transformers' boolean mask sum the same
# terms; the stated bound leaves room for a different kernel's order of summation.
ATOL = RTOL = 1e-5


def ids(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


class FusedCalls:
    """Counts SDPA calls that took the bottom-right causal bias."""

    def __init__(self, monkeypatch):
        self.calls = 0
        inner = CausalBias._dispatch

        def counted(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)
        monkeypatch.setattr(CausalBias, "_dispatch", staticmethod(counted))


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
def test_on_the_gpu_the_fused_kernels_take_the_bias_and_match_the_mask(family):
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention
    model = tiny_model(family, dtype=torch.float16).cuda()
    prompt = ids(600).cuda()
    own = logits_over_new_tokens(model, prompt, 512, fused=False).float()
    fused = logits_over_new_tokens(model, prompt, 512, fused=True).float()
    q = torch.empty(1, 4, 88, 32, device="cuda", dtype=torch.float16)
    k = torch.empty(1, 4, 600, 32, device="cuda", dtype=torch.float16)
    params = SDPAParams(q, k, k, None, 0.0, False, False)
    assert can_use_flash_attention(params) or can_use_efficient_attention(params)
    torch.testing.assert_close(fused, own, atol=2e-2, rtol=2e-2)  # fp16, another kernel
