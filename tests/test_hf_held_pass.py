"""TieredCache(pass_over_budget="hold"): a forward pass longer than the L1 budget is taken
whole, its tokens attending to their own keys and values at full precision, and stored
within the budget afterwards (synapse.hf.held_pass). Tiny random Llama, CPU, seeded."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402

from synapse.blocks import Tier  # noqa: E402
from synapse.errors import CapacityError  # noqa: E402
from synapse.hf import TieredCache  # noqa: E402

BT, BUDGET, PROMPT = 8, 32, 60  # a 60-token prompt through a 32-token (4-block) budget


def prompt(n=PROMPT, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def held(m, policy="h2o", demote="int4", budget=BUDGET, **kw):
    return TieredCache(m.config, policy=policy, l1_budget_tokens=budget, demote=demote,
                       block_tokens=BT, model=m, pass_over_budget="hold", **kw)


def forward(m, ids, cache):
    with torch.no_grad():
        return m(ids, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("policy", ["h2o", "lru", "sinks", "fifo"])
@pytest.mark.parametrize("demote", ["int4", "l2", "drop"])
def test_a_pass_beyond_the_budget_attends_as_dynamic_cache_and_stores_within_it(policy, demote):
    from transformers import DynamicCache
    m = tiny_model("llama")
    ids = prompt()
    dyn = DynamicCache(config=m.config)
    ref = forward(m, ids, dyn)
    cache = held(m, policy, demote)
    out = forward(m, ids, cache)
    assert torch.equal(out.logits, ref.logits)  # the whole prompt at full precision
    mgr = cache.manager
    assert mgr.spaces.l1.used_bytes <= cache.l1_budget_bytes
    assert cache.seen_tokens == PROMPT and cache.planner.tokens == PROMPT
    # the blocks L1 keeps hold the model's own keys, in slot order
    layer0 = cache.inspect_layer(0)["l1_keys"]
    ref_k = dyn.layers[0].keys[0].transpose(0, 1)  # [tokens, heads, dim]
    pos = np.concatenate([np.arange(b * BT, min((b + 1) * BT, PROMPT))
                          for b in mgr.spaces.l1.blocks()])
    assert torch.equal(layer0, ref_k[torch.from_numpy(pos)])
    tiers = mgr.tiers(np.arange(len(mgr.table)))
    if demote == "drop":
        assert (tiers == Tier.NONE).any() and not (tiers == Tier.L2).any()
    else:
        assert (tiers == Tier.L2).sum() + (tiers == Tier.L1).sum() == len(tiers)
    # the device held the pass's KV of every layer besides L1, and says so
    pass_bytes = 2 * m.config.num_hidden_layers * PROMPT * 2 * 32 * 4
    t = cache.telemetry()
    assert t["l1_peak_bytes"] <= cache.l1_budget_bytes
    assert pass_bytes < t["pass_peak_bytes"] <= pass_bytes + cache.l1_budget_bytes


def test_by_default_a_pass_beyond_the_budget_is_refused_naming_both_ways_out():
    m = tiny_model("llama")
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=BUDGET, block_tokens=BT)
    with pytest.raises(CapacityError, match=r"prefill_chunk_size=24.*pass_over_budget='hold'"):
        forward(m, prompt(), cache)
    with pytest.raises(ValueError, match="pass_over_budget must be 'refuse' or 'hold'"):
        TieredCache(m.config, pass_over_budget="chunk")


@pytest.mark.parametrize("policy", ["fifo", "sinks"])
def test_storage_makes_the_choices_of_a_one_block_chunked_prefill(policy):
    """Without scores the policy's choices depend on positions only: a held pass leaves
    every block where a prompt fed one block per pass leaves it, and with a lossless L2
    the next steps' logits agree up to rounding (the chunked prompt attended to the same
    values, read back from L2)."""
    m = tiny_model("llama")
    ids, nxt = prompt(), prompt(6, seed=3)
    a, b = held(m, policy, "l2"), held(m, policy, "l2")
    forward(m, ids, a)
    for lo in range(0, PROMPT, BT):
        forward(m, ids[:, lo:lo + BT], b)
    for c in (a, b):
        c.settle()
    ta, tb = a.manager.table, b.manager.table
    assert np.array_equal(ta.tier[:len(ta)], tb.tier[:len(tb)])
    for j in range(nxt.shape[1]):
        la, lb = forward(m, nxt[:, j:j + 1], a).logits, forward(m, nxt[:, j:j + 1], b).logits
        torch.testing.assert_close(la, lb, rtol=0, atol=1e-5)


def test_h2o_scores_each_stored_block_with_its_queries_attention():
    """The masses the policy is fed at each storage step are the eager attention weights
    of that block's queries over every key before them, summed per block, averaged over
    heads and queries (the partial tail block first when the cache holds one)."""
    m = tiny_model("llama", seed=4)
    ids = prompt(44, seed=9)
    cache = held(m, "h2o", "int4", record_masses=True)
    forward(m, ids[:, :4], cache)  # a partial tail block: the pass's first piece is 4 tokens
    steps = len(cache.layer_masses)
    forward(m, ids[:, 4:], cache)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        full = m(ids, output_attentions=True)
    m.set_attn_implementation("sdpa")
    cuts = [4, 8, 16, 24, 32, 40, 44]
    assert len(cache.layer_masses) == steps + len(cuts) - 1
    for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
        rows = cache.layer_masses[steps + j]  # [layers, live blocks]: INT4 drops none
        nb = (b + BT - 1) // BT
        assert rows.shape == (m.config.num_hidden_layers, nb)
        for layer, att in enumerate(full.attentions):
            w = att[0, :, a:b, :b].float().mean(dim=(0, 1))  # [keys]
            blocks = torch.zeros(nb).index_add_(0, torch.arange(b) // BT, w)
            np.testing.assert_allclose(rows[layer], blocks.numpy(), atol=2e-6)


@pytest.mark.parametrize("policy", ["h2o", "lru", "sinks"])
def test_generate_takes_a_long_prompt_whole_and_decodes_within_the_budget(policy):
    m = tiny_model("llama")
    m.generation_config.eos_token_id = None
    cache = held(m, policy, "int4")
    with torch.no_grad():
        out = m.generate(prompt(), max_new_tokens=20, do_sample=False, past_key_values=cache)
        more = m.generate(out, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.shape[1] == PROMPT + 20 and more.shape[1] == PROMPT + 24
    t = cache.telemetry()
    assert t["l1_peak_bytes"] <= cache.l1_budget_bytes and t["demotions"] > 0
    assert cache.seen_tokens == PROMPT + 23


def test_a_batch_still_asks_for_chunks_that_fit_each_sequence():
    """The batch path keeps its per-sequence checks: a held pass serves one unpadded
    sequence; a padded prompt beyond a row's share is refused before any row begins."""
    m = tiny_model("llama")
    m.generation_config.eos_token_id = None
    ids = prompt().repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    cache = held(m, "fifo", "drop", budget=2 * BUDGET)
    with pytest.raises(CapacityError, match="prefill_chunk_size"):
        with torch.no_grad():
            m.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                       past_key_values=cache, pad_token_id=0)
    assert all(s.seen_tokens == 0 for s in cache.sequences)


def test_a_copy_after_a_held_pass_continues_as_the_original():
    import copy
    m = tiny_model("llama")
    cache = held(m, "h2o", "int4")
    forward(m, prompt(), cache)
    twin = copy.deepcopy(cache)
    nxt = prompt(4, seed=5)
    for j in range(nxt.shape[1]):
        a = forward(m, nxt[:, j:j + 1], cache).logits
        b = forward(m, nxt[:, j:j + 1], twin).logits
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_held_passes_attend_as_dynamic_cache_and_keep_the_budget(dtype):
    """On the device, fp16 taking the fused INT4 read-through in the second pass (its L2
    blocks from the first)."""
    from transformers import DynamicCache
    m = tiny_model("llama", dtype=dtype).cuda()
    ids = prompt(2 * PROMPT).cuda()
    dyn = DynamicCache(config=m.config)
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=BUDGET, demote="int4",
                        block_tokens=BT, backend="cuda", model=m, pass_over_budget="hold")
    ref, out = forward(m, ids[:, :PROMPT], dyn), forward(m, ids[:, :PROMPT], cache)
    assert torch.equal(out.logits, ref.logits)
    second = forward(m, ids[:, PROMPT:], cache).logits
    assert torch.isfinite(second).all()
    assert cache.manager.spaces.l1.used_bytes <= cache.l1_budget_bytes
    assert cache.seen_tokens == 2 * PROMPT and cache.telemetry()["l2_hits"] > 0


@pytest.mark.parametrize("policy", ["h2o", "sinks"])
def test_a_second_held_pass_over_l2_blocks_and_a_partial_tail_sees_every_token(policy):
    """With a lossless L2 every token is still attended: a second pass beyond the budget
    (the first left a partial tail block and most blocks in L2) gives DynamicCache's
    logits up to the order of the sums."""
    from transformers import DynamicCache
    m = tiny_model("llama")
    ids = prompt(PROMPT + 37, seed=6)
    dyn = DynamicCache(config=m.config)
    cache = held(m, policy, "l2")
    for lo, hi in ((0, PROMPT), (PROMPT, PROMPT + 37)):
        ref = forward(m, ids[:, lo:hi], dyn).logits
        got = forward(m, ids[:, lo:hi], cache).logits
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    t = cache.telemetry()
    assert t["l2_hits"] > 0 and t["drops"] == 0
    assert cache.kept_tokens() == PROMPT + 37
