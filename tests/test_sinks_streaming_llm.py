"""TieredCache(policy="sinks", demote="drop") is StreamingLLM, the replacement for the
SinkCache that transformers v5 removed.

StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453) keeps the KV of the first few tokens (the attention sinks) and of a
rolling window of the most recent tokens, and drops everything between. TieredCache
keeps whole blocks of ``block_tokens``, so the rule below is written at block
granularity: the first ``sink_blocks`` blocks plus the most recent ``cache_blocks -
sink_blocks`` blocks, the newest (partial) one included.

Each test decodes a fixed token sequence one token per forward pass (teacher forcing) with
TieredCache and with DynamicCache. Layer 0's inputs are then the same in both runs, so the
keys TieredCache hands to layer 0's attention can be named by position (they equal the
reference's keys at those positions bit for bit), and layer 0's attention output can be
recomputed densely from the reference's keys and values at exactly the rule's positions.
Positions are the original ones: TieredCache does not re-rotate kept keys to positions
within the cache, as the paper and the old SinkCache did (docs/hf.md).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402

from synapse.hf import TieredCache  # noqa: E402

BLOCK = 4          # block_tokens: with one sink block, the paper's 4 sink tokens
SINK_BLOCKS = 1
CACHE_BLOCKS = 6   # l1_budget_tokens = 24
STEPS = 56


def streaming_llm_positions(t: int, block_tokens: int, sink_blocks: int, cache_blocks: int) -> list[int]:
    """Positions the query at position ``t`` attends to under StreamingLLM at block
    granularity: the first ``sink_blocks`` blocks and the ``cache_blocks - sink_blocks``
    most recent ones (the one holding ``t`` included), each up to ``t``."""
    newest = t // block_tokens
    sinks = set(range(min(sink_blocks, newest + 1)))
    recent = set(range(max(0, newest - (cache_blocks - sink_blocks) + 1), newest + 1))
    return [p for b in sorted(sinks | recent)
            for p in range(b * block_tokens, min((b + 1) * block_tokens, t + 1))]


class Layer0Recorder:
    """What layer 0's attention is given and gives, per forward pass: the keys returned by
    ``cache.update``, the module's input (hidden states, rotary embeddings) and output."""

    def __init__(self, model, cache):
        self.keys, self.inputs, self.outputs = [], [], []
        inner = cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            k, v = inner(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx == 0:
                self.keys.append(k[0].detach().clone())
            return k, v

        cache.update = update
        attn = model.model.layers[0].self_attn
        self._hooks = [
            attn.register_forward_pre_hook(self._pre, with_kwargs=True),
            attn.register_forward_hook(lambda _m, _a, out: self.outputs.append(out[0].detach().clone())),
        ]

    def _pre(self, _mod, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.inputs.append((hidden.detach().clone(), kwargs["position_embeddings"]))

    def remove(self):
        for h in self._hooks:
            h.remove()


def decode(model, ids, cache):
    rec = Layer0Recorder(model, cache)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
    rec.remove()
    return rec


def positions_of(keys, ref_keys):
    """The reference position of every key row (per KV head; all heads must agree)."""
    found = []
    for h in range(keys.shape[0]):
        equal = (keys[h][:, None, :] == ref_keys[h][None, :, :]).all(dim=-1)  # [kept, positions]
        assert torch.all(equal.sum(dim=-1) == 1), "a key that is at no (or more than one) position"
        found.append(equal.int().argmax(dim=-1).tolist())
    assert all(f == found[0] for f in found), "KV heads kept different positions"
    return found[0]


def dense_attention_output(model, hidden, position_embeddings, ref_k, ref_v, positions):
    """Layer 0's attention output for one query, computed here from the module's weights
    over the reference's keys and values at exactly ``positions``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    attn = model.model.layers[0].self_attn
    cfg = model.config
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    q = attn.q_proj(hidden).view(1, 1, heads, dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    idx = torch.tensor(positions)
    out = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        k, v = ref_k[g, idx], ref_v[g, idx]
        w = torch.softmax((q[0, h] @ k.T) / math.sqrt(dim), dim=-1)
        out.append(w @ v)
    return attn.o_proj(torch.cat(out, dim=-1).view(1, 1, heads * dim))


@pytest.fixture(scope="module")
def run():
    from transformers import DynamicCache
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, STEPS), generator=torch.Generator().manual_seed(7))
    ref_cache = DynamicCache(config=model.config)
    decode(model, ids, ref_cache)
    ref_k = ref_cache.layers[0].keys[0]
    ref_v = ref_cache.layers[0].values[0]

    def sinks(**kw):
        cache = TieredCache(model.config, policy="sinks", demote="drop",
                            l1_budget_tokens=CACHE_BLOCKS * BLOCK, block_tokens=BLOCK,
                            sink_blocks=SINK_BLOCKS, **kw)
        rec = decode(model, ids, cache)
        found = [positions_of(k, ref_k) for k in rec.keys]
        # the KV engine keeps L1 compacted, so past keys come in any order (attention does
        # not depend on it); this step's token is always last
        assert all(f[-1] == t for t, f in enumerate(found)), "the step's own token is not last"
        return cache, rec, [sorted(f) for f in found]

    return model, ref_k, ref_v, sinks


def test_the_reference_rule_keeps_sinks_and_a_window_of_whole_blocks():
    rule = lambda t: streaming_llm_positions(t, 4, 1, 3)  # noqa: E731
    assert rule(5) == [0, 1, 2, 3, 4, 5]
    assert rule(12) == [0, 1, 2, 3, 8, 9, 10, 11, 12]     # block 1 left the window
    assert rule(15) == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]


def test_full_watermarks_keep_exactly_the_streaming_llm_tokens(run):
    """high = low = 1.0: nothing is dropped before the budget is full, so the kept tokens
    are the rule's at every step, and layer 0's output is dense attention over them."""
    model, ref_k, ref_v, sinks = run
    cache, rec, kept = sinks(high_watermark=1.0, low_watermark=1.0)
    for t in range(STEPS):
        assert kept[t] == streaming_llm_positions(t, BLOCK, SINK_BLOCKS, CACHE_BLOCKS), f"step {t}"
    assert len(kept[-1]) < STEPS // 2, "the run must be long enough to evict"
    for t in range(STEPS):
        hidden, pe = rec.inputs[t]
        want = dense_attention_output(model, hidden, pe, ref_k, ref_v, kept[t])
        torch.testing.assert_close(rec.outputs[t], want, rtol=1e-5, atol=1e-6, msg=f"step {t}")
    assert cache.telemetry()["drops"] == math.ceil(STEPS / BLOCK) - CACHE_BLOCKS


def test_default_watermarks_keep_the_rule_with_a_window_cut_to_the_low_watermark(run):
    """With the default watermarks (high 0.95, low 0.85) background demotion drops the
    oldest window block as soon as the budget is crossed: every step still sees the sinks
    plus a contiguous recent window (the rule), but of between floor(0.85 x 6) = 5 and 6
    blocks: 6 only on the steps that open a new block."""
    model, ref_k, ref_v, sinks = run
    cache, rec, kept = sinks()
    low_blocks = math.floor(0.85 * CACHE_BLOCKS)
    for t in range(STEPS):
        sizes = [c for c in range(low_blocks, CACHE_BLOCKS + 1)
                 if kept[t] == streaming_llm_positions(t, BLOCK, SINK_BLOCKS, c)]
        assert sizes, f"step {t}: {kept[t]} is not sinks + a recent window"
        if t >= CACHE_BLOCKS * BLOCK:
            opens_block = t % BLOCK == 0
            assert min(sizes) == (CACHE_BLOCKS if opens_block else low_blocks), f"step {t}"
    for t in range(STEPS):
        hidden, pe = rec.inputs[t]
        want = dense_attention_output(model, hidden, pe, ref_k, ref_v, kept[t])
        torch.testing.assert_close(rec.outputs[t], want, rtol=1e-5, atol=1e-6, msg=f"step {t}")
