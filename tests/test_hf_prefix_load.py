"""A restored prefix moved to the device layer by layer (``synapse.hf.prefix_load``):
what lands in the cache, and the order in which the forward pass waits for it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from synapse.hf.prefix import prefill_with_prefix, prefix_fingerprint  # noqa: E402
from synapse.hf.prefix_load import LayerwiseLoad, _attention_modules  # noqa: E402
from synapse.prefix import PrefixStore  # noqa: E402

LAYERS, HEADS, CHUNK, DIM = 3, 2, 4, 8


def chunks(n=5):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(LAYERS, 2, HEADS, CHUNK, DIM, generator=g) for _ in range(n)]


def test_each_layers_planes_are_the_chunks_joined_along_the_tokens():
    cs = chunks()
    load = LayerwiseLoad(cs, torch.device("cpu"), torch.float32)
    for i in range(LAYERS):
        want = torch.cat([c[i] for c in cs], dim=-2)  # [2, heads, tokens, dim]
        assert torch.equal(load.planes[i], want)
    assert set(load.finish()) == {"to_device"}


def test_a_dynamic_cache_holds_the_prefix_before_the_forward_without_a_copy():
    cs = chunks()
    model = tiny_model(layers=LAYERS)
    cache = DynamicCache(config=model.config)
    load = LayerwiseLoad(cs, torch.device("cpu"), torch.float32)
    load.into(cache)
    assert cache.get_seq_length() == 5 * CHUNK
    for i, layer in enumerate(cache.layers):
        assert layer.keys.data_ptr() == load.planes[i][0].data_ptr()
        assert torch.equal(layer.values[0], load.planes[i][1])


def test_the_prompts_rest_is_written_behind_the_prefix_not_concatenated():
    """With room for the prompt's rest, the prefill's update writes the new keys behind the
    prefix in the same planes: the cache's tensors are views of them, equal to the cache a
    recompute leaves; the decode step after it is DynamicLayer's own update again."""
    model = tiny_model(layers=LAYERS)
    prompt = torch.randint(3, VOCAB, (1, 50), generator=torch.Generator().manual_seed(2))
    with PrefixStore(prefix_fingerprint(model, 16), l2_bytes=1 << 24) as store:
        prefill_with_prefix(model, prompt[:, :40], store=store)
        out, cache, reuse = prefill_with_prefix(model, prompt, store=store, save=False)
    assert reuse.restored_tokens == 32
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        want = model(prompt, past_key_values=ref).logits[0, -1]
    assert torch.allclose(out.logits[0, -1], want, atol=1e-5)
    for layer, r in zip(cache.layers, ref.layers):
        assert "update" not in layer.__dict__  # the class's update is back
        assert layer.keys.shape == r.keys.shape == (1, layer.keys.shape[1], 50, layer.keys.shape[3])
        assert torch.allclose(layer.keys, r.keys, atol=1e-5)
        assert torch.allclose(layer.values, r.values, atol=1e-5)
    # one buffer a layer: values sit right behind the keys in it (no concatenation made them)
    k, v = cache.layers[0].keys, cache.layers[0].values
    assert v.data_ptr() - k.data_ptr() == k.stride(1) * k.shape[1] * k.element_size()
    nxt = torch.randint(3, VOCAB, (1, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(nxt, past_key_values=cache).logits[0, -1]
        b = model(nxt, past_key_values=ref).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-5) and cache.get_seq_length() == 51


def test_an_update_that_does_not_fit_the_room_goes_to_dynamic_layers_own():
    cs = chunks()
    model = tiny_model(layers=LAYERS)
    cache = DynamicCache(config=model.config)
    load = LayerwiseLoad(cs, torch.device("cpu"), torch.float32, room=3)
    load.into(cache)
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, HEADS, 5, DIM, generator=g), torch.randn(1, HEADS, 5, DIM, generator=g)
    layer = cache.layers[0]
    keys, values = cache.update(k, v, 0)  # 5 tokens, room for 3: concatenated
    assert torch.equal(keys[0], torch.cat((load.planes[0][0, :, :5 * CHUNK], k[0]), dim=1))
    assert keys.shape[-2] == 5 * CHUNK + 5 and "update" not in layer.__dict__
    keys, _ = cache.update(k[:, :, :3], v[:, :, :3], 1)  # exactly the room: written behind
    assert keys.data_ptr() == load.planes[1][0].data_ptr() and keys.shape[-2] == 5 * CHUNK + 3
    assert "update" not in cache.layers[1].__dict__


def test_the_forward_waits_for_layer_i_just_before_layer_is_attention():
    """The timeline of one forward pass with a deferred load (as on CUDA): each layer's
    wait comes right before its own attention, not all before the first layer; a second
    forward waits for nothing."""
    model = tiny_model(layers=LAYERS)
    timeline = []
    load = LayerwiseLoad(chunks(), torch.device("cpu"), torch.float32)
    load.deferred = True  # what ``into`` sets on CUDA
    load._wait = lambda i: timeline.append(("wait", i))
    attn = _attention_modules(model, LAYERS)
    cache = DynamicCache(config=model.config)
    new = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), load.waits(model):
        hooks = [m.register_forward_pre_hook(lambda m, a, i=i: timeline.append(("attn", i)))
                 for i, m in enumerate(attn)]
        model(new, past_key_values=cache)
        model(new[:, :1], past_key_values=cache)
    for h in hooks:
        h.remove()
    first = [e for i in range(LAYERS) for e in (("wait", i), ("attn", i))]
    assert timeline == first + [("attn", i) for i in range(LAYERS)]


def test_attention_modules_are_found_by_layer_for_llama_and_qwen2():
    for family in ("llama", "qwen2"):
        model = tiny_model(family, layers=LAYERS)
        found = _attention_modules(model, LAYERS)
        assert [m.layer_idx for m in found] == list(range(LAYERS))


def test_the_prefill_reports_its_phases():
    model = tiny_model()
    prompt = torch.randint(3, VOCAB, (1, 50), generator=torch.Generator().manual_seed(2))
    with PrefixStore(prefix_fingerprint(model, 16), l2_bytes=1 << 24) as store:
        prefill_with_prefix(model, prompt[:, :40], store=store)
        _, _, reuse = prefill_with_prefix(model, prompt, store=store, save=False)
    assert reuse.restored_tokens == 32
    assert {"store_load", "to_device", "into_cache", "forward"} <= set(reuse.phases_s)
    assert all(v >= 0 for v in reuse.phases_s.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_the_layerwise_load_gives_the_tokens_of_recomputing():
    """With the copies on a side stream and the waits on the device, the greedy next token
    and the logits equal those of recomputing (fp16: the prefix's KV is bit-identical,
    the attention kernel over it may differ, hence the tolerance), and every phase is
    measured by CUDA events. Whether the copies overlapped the forward is a figure
    (``copy_end_after_forward_start``), not asserted: at this size they may end first."""
    model = tiny_model(layers=8, dtype=torch.float16).cuda()
    model.config.max_position_embeddings = 8192
    prompt = torch.randint(3, VOCAB, (1, 4096), generator=torch.Generator().manual_seed(3)).cuda()
    with torch.no_grad():
        ref = model(prompt, past_key_values=DynamicCache(config=model.config)).logits[0, -1]
    with PrefixStore(prefix_fingerprint(model, 256), l2_bytes=1 << 30) as store:
        prefill_with_prefix(model, prompt[:, :3840], store=store)
        out, cache, reuse = prefill_with_prefix(model, prompt, store=store, save=False)
    assert reuse.restored_tokens == 3840 and cache.get_seq_length() == 4096
    assert int(out.logits[0, -1].argmax()) == int(ref.argmax())
    torch.testing.assert_close(out.logits[0, -1].float(), ref.float(), atol=2e-2, rtol=2e-2)
    ph = reuse.phases_s
    assert ph["to_device"] > 0 and ph["forward"] > 0 and ph["into_cache"] == 0.0
    assert "copy_end_after_forward_start" in ph
