"""TieredCache for real generation: batches with left padding, beam search, the batch
verbs, copies, and the errors that say what to do. Tiny random Llama, Qwen2, Mistral,
Gemma and GPT-J models (CPU, seeded, no downloads), against ``DynamicCache``."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, one_thread, tiny_model  # noqa: E402,F401

from synapse.errors import CapacityError  # noqa: E402
from synapse.hf import TieredCache, UnsupportedModel  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gptj"]
POLICIES = ["h2o", "lru", "sinks", "fifo"]
DEMOTES = ["l2", "int4", "drop"]
PROMPT, NEW = 20, 5
PADS = (0, 5, 11)  # left pads of each row of the batch of 3
CONFIGS = [(1, 1), (3, 2), (1, 2), (3, 1)]  # (rows, num_beams)
# with evictions: every model x policy x demotion, the batch configuration rotating over
# them (each model meets each configuration 3 times)
EVICTING = [(f, p, d) for f in FAMILIES for p in POLICIES for d in DEMOTES]


@functools.lru_cache(maxsize=None)
def model(family, attn="sdpa"):
    m = tiny_model(family)
    if any(hasattr(x, "_attn") for x in m.modules()):
        attn = "eager"  # GPT-J before transformers 5.24: its attention is eager only
    m.config._attn_implementation = attn
    m.generation_config.eos_token_id = None  # every row generates NEW tokens
    return m


def batch(rows: int):
    """``rows`` prompts of PROMPT ids, row i left-padded with PADS[i] pads (batch 1: the
    most padded row, so padding is always there)."""
    ids = torch.randint(3, VOCAB, (3, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for i, p in enumerate(PADS):
        mask[i, :p] = 0
    return (ids[2:], mask[2:]) if rows == 1 else (ids, mask)


def generate(m, rows, cache, pad=0, beams=1, **kw):
    ids, mask = batch(rows)
    ids = ids.masked_fill(mask == 0, pad)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         num_beams=beams, past_key_values=cache, pad_token_id=pad, **kw)
    return out[:, PROMPT:]


@functools.lru_cache(maxsize=None)
def reference(family, rows, beams):
    from transformers import DynamicCache
    m = model(family)
    return generate(m, rows, DynamicCache(config=m.config), beams=beams)


def tiered(m, rows, beams=1, policy="h2o", demote="int4", per_row_tokens=256, **kw):
    scored = policy in ("h2o", "lru") or kw.get("record_masses")
    if scored and m.config.model_type == "gptj" and not hasattr(m.transformer.h[0].attn,
                                                                 "scaling"):
        # transformers < 5.24's GPT-J rotates inside its attention from position_ids:
        # scores are refused by name, before anything is cached
        with pytest.raises(UnsupportedModel, match="GPTJAttention .* Use policy 'fifo'"):
            TieredCache(m.config, policy=policy, l1_budget_tokens=256, model=m, **kw)
        pytest.skip("GPT-J's attention of this transformers version cannot be scored")
    return TieredCache(m.config, policy=policy, demote=demote, block_tokens=4,
                       l1_budget_tokens=per_row_tokens * rows * beams, model=m, **kw)


# -- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_at_full_budget_a_padded_batch_generates_dynamic_cache_tokens(family, policy):
    """Batch 1 and 3 with left padding, greedy and beam search 2: the same tokens as
    DynamicCache (the demotion format rotates over the matrix: nothing is demoted)."""
    m = model(family)
    demote = DEMOTES[(FAMILIES.index(family) + POLICIES.index(policy)) % 3]
    for rows, beams in CONFIGS:
        cache = tiered(m, rows, beams, policy, demote)
        got = generate(m, rows, cache, beams=beams)
        assert torch.equal(got, reference(family, rows, beams)), (rows, beams)
        t = cache.telemetry()
        assert t["evictions"] == 0 and t["batch"] == rows * beams


@pytest.mark.parametrize("family,policy,demote", EVICTING)
def test_with_evictions_no_pad_is_stored_or_attended_and_the_pad_id_changes_nothing(
        family, policy, demote):
    """16 tokens of L1 per sequence (4 blocks), prompts of up to 20 real tokens fed in
    chunks of 8: blocks are evicted. Pads never reach a sequence's stack (each holds its
    real tokens only, so the blocks its policy credits with attention hold no pad), and
    the generated tokens are the same whatever the pad token's id. Batch configuration: rotating over CONFIGS."""
    m = model(family)
    rows, beams = CONFIGS[EVICTING.index((family, policy, demote)) % 4]
    outs = []
    for pad in (0, 7):
        cache = tiered(m, rows, beams, policy, demote, per_row_tokens=16, record_masses=True)
        outs.append(generate(m, rows, cache, pad=pad, beams=beams, prefill_chunk_size=8))
        assert cache.telemetry()["evictions"] > 0
        real = PROMPT - np.array(PADS[3 - rows:]).repeat(beams)
        seen = [s.seen_tokens for s in cache.sequences]
        assert seen == list(real + NEW - 1)  # the last token is not fed back
        for s in cache.sequences:  # the blocks credited with mass: real tokens only
            assert all(len(step) <= -(-s.seen_tokens // 4) for step in s.masses)
    assert torch.equal(outs[0], outs[1]), (rows, beams)


def test_eager_attention_puts_no_weight_on_the_padded_key_slots():
    """What the model really attends with (eager attention's weights): per sequence, the
    keys past its own count get exactly zero."""
    m = model("llama", "eager")
    cache = tiered(m, 3, per_row_tokens=16, policy="sinks", demote="drop", record_masses=True)
    ids, mask = batch(3)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         past_key_values=cache, prefill_chunk_size=8, output_attentions=True,
                         return_dict_in_generate=True)
    lengths = cache.batch_lengths[-len(out.attentions):]
    assert cache.telemetry()["evictions"] > 0
    for step, lens in zip(out.attentions, lengths):
        for w in step:  # [B, heads, q, N] per layer
            for b, n in enumerate(lens):
                assert float(w[b, :, -1, n:].abs().sum()) == 0.0
                assert abs(float(w[b, :, -1, :n].sum(-1).mean()) - 1.0) < 1e-5


@pytest.mark.parametrize("policy", ["h2o", "fifo"])
def test_an_unpadded_batch_needs_no_mask_and_generates_dynamic_cache_tokens(policy):
    """Equal lengths, nothing evicted: sdpa's own causal mask for the prompt, none for a
    decode step (no mask tensor is built), DynamicCache's tokens."""
    from transformers import DynamicCache
    m = model("mistral")
    ids, _ = batch(3)
    outs, caches = [], (DynamicCache(config=m.config), tiered(m, 3, policy=policy))
    for cache in caches:
        with torch.no_grad():
            outs.append(m.generate(ids, max_new_tokens=NEW, do_sample=False,
                                   past_key_values=cache))
    assert torch.equal(outs[0], outs[1]) and caches[1]._batch.mask is None


def test_num_return_sequences_with_beams_gives_dynamic_cache_sequences():
    m = model("qwen2")
    from transformers import DynamicCache
    ids, mask = batch(3)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=2,
              num_return_sequences=2)
    with torch.no_grad():
        ref = m.generate(ids, past_key_values=DynamicCache(config=m.config), **kw)
        got = m.generate(ids, past_key_values=tiered(m, 3, 2), **kw)
    assert got.shape[0] == 6 and torch.equal(got, ref)


@pytest.mark.parametrize("family", ["gptj", "gemma", "mistral"])
def test_one_unpadded_sequence_scores_every_family_and_matches_dynamic_cache(family):
    """The batch-1 path (no padding: no per-sequence stacks) with h2o's scores: GPT-J's
    partial rotary query is rebuilt (it raised a TypeError before)."""
    from transformers import DynamicCache
    m = model(family)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(6))
    outs = []
    for cache in (DynamicCache(config=m.config), tiered(m, 1, record_masses=True)):
        with torch.no_grad():
            outs.append(m.generate(ids, max_new_tokens=NEW, do_sample=False,
                                   past_key_values=cache))
    assert torch.equal(outs[0], outs[1])
    assert cache.sequences == [cache] and len(cache.masses) == NEW
    assert all(abs(float(x.sum()) - 1.0) < 1e-4 for x in cache.masses)


def test_a_batch_scores_its_decode_step_as_each_sequence_would_alone():
    """decode_mass over the padded view: per row, token_mass of that row's own keys."""
    from synapse.hf.batch import decode_mass
    from synapse.hf.scores import token_mass
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(3, 4, 1, 32, generator=gen), torch.randn(3, 2, 9, 32, generator=gen)
    lengths = [9, 4, 6]
    allowed = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    got = decode_mass(q, k, 0.2, allowed[:, None, None])
    for i, n in enumerate(lengths):
        want = token_mass(q[i:i + 1], k[i:i + 1, :, :n], 0.2, n - 1)
        assert torch.allclose(got[i, :n], want, atol=1e-6) and float(got[i, n:].sum()) == 0.0


# -- continuing, verbs, copies --------------------------------------------------------------------
def test_continuing_generate_with_the_same_padded_cache_equals_dynamic_cache():
    from transformers import DynamicCache
    m = model("llama")
    ids, mask = batch(3)
    outs = []
    for cache in (DynamicCache(config=m.config), tiered(m, 3)):
        with torch.no_grad():
            a = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           past_key_values=cache)
            mask2 = torch.cat((mask, torch.ones((3, 4), dtype=mask.dtype)), 1)
            b = m.generate(a, attention_mask=mask2, max_new_tokens=4, do_sample=False,
                           past_key_values=cache)
        outs.append(b)
    assert torch.equal(outs[0], outs[1])


def test_batch_verbs_reorder_and_copy_the_sequences():
    m = model("llama")
    cache = tiered(m, 3)
    generate(m, 3, cache)
    seen = [s.seen_tokens for s in cache.sequences]
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert [s.seen_tokens for s in cache.sequences] == [seen[2], seen[0]]
    cache.batch_repeat_interleave(2)
    seqs = cache.sequences
    assert [s.seen_tokens for s in seqs] == [seen[2], seen[2], seen[0], seen[0]]
    assert seqs[0] is not seqs[1] and seqs[0].stack is not seqs[1].stack
    cache.reorder_cache(torch.tensor([1, 1, 2, 3]))
    assert len(cache.sequences) == 4


def test_a_batch_dumps_in_the_runner_format_with_each_sequence(tmp_path):
    from synapse.results import load_run
    m = model("llama")
    cache = tiered(m, 3, per_row_tokens=16)
    generate(m, 3, cache, prefill_chunk_size=8)
    cache.dump(tmp_path / "run")
    load_run(tmp_path / "run")
    t = cache.telemetry()
    assert len(t["sequences"]) == 3
    assert t["evictions"] == sum(s["evictions"] for s in t["sequences"]) > 0
    with pytest.raises(UnsupportedModel, match=r"cache.sequences\[i\].inspect_layer"):
        cache.inspect_layer(0)
    assert cache.sequences[2].inspect_layer(0)["l1_keys"].shape[1:] == (2, 32)


def test_a_single_sequence_repeated_becomes_a_batch_that_continues():
    m = model("llama")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    cache = tiered(m, 1)
    with torch.no_grad():
        a = m.generate(ids, max_new_tokens=3, do_sample=False, past_key_values=cache)
        cache.batch_repeat_interleave(2)
        b = m.generate(a.repeat(2, 1), max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert torch.equal(b[0], b[1]) and len(cache.sequences) == 2


@pytest.mark.parametrize("policy", ["h2o", "sinks"])
def test_a_deep_copy_is_a_working_cache_on_the_same_model(policy):
    """The copy holds the same blocks and observes the same model (not a copy of it):
    continuing both gives the same tokens."""
    m = model("llama")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    cache = tiered(m, 1, policy=policy, per_row_tokens=12)
    with torch.no_grad():
        a = m.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache,
                       prefill_chunk_size=4)
        twin = copy.deepcopy(cache)
        b1 = m.generate(a, max_new_tokens=4, do_sample=False, past_key_values=cache)
        b2 = m.generate(a, max_new_tokens=4, do_sample=False, past_key_values=twin)
    assert torch.equal(b1, b2)
    assert twin.telemetry()["evictions"] == cache.telemetry()["evictions"] > 0


# -- clear errors, before any token ----------------------------------------------------------
def test_flash_or_flex_attention_with_a_batch_is_refused_naming_what_to_use():
    m = tiny_model("llama")
    m.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModel, match="'llama' with attn_implementation="
                                               "'flex_attention'.*'sdpa'"):
        generate(m, 3, tiered(m, 3))


def test_a_budget_share_below_two_blocks_names_the_batch():
    m = model("llama")
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=18, block_tokens=4, model=m)
    with pytest.raises(CapacityError, match="batch of 3 sequences gets l1_budget_tokens=18 // 3"):
        generate(m, 3, cache)
    assert cache.sequences == [cache] and cache.planner is None  # untouched: reusable


def test_a_cache_is_reusable_after_a_capacity_error():
    m = model("llama")
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=16, block_tokens=4, model=m)
    with pytest.raises(CapacityError, match="prefill_chunk_size"):
        with torch.no_grad():
            m.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache)
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache,
                         prefill_chunk_size=8)
    assert out.shape[1] == 22 and cache.seen_tokens == 21


def test_a_batch_is_reusable_after_a_capacity_error():
    """The least padded row's chunk does not fit its share: refused before any sequence
    begins its step; the same cache then runs with chunks that fit."""
    m = model("llama")
    cache = tiered(m, 3, per_row_tokens=16, policy="fifo", demote="drop")
    with pytest.raises(CapacityError, match="prefill_chunk_size"):
        generate(m, 3, cache)
    assert all(s.seen_tokens == 0 for s in cache.sequences)
    assert generate(m, 3, cache, prefill_chunk_size=8).shape == (3, NEW)


@pytest.mark.parametrize("demote", ["drop", "l2"])
def test_a_one_layer_head_dim_1_cache_with_an_8_token_budget_runs(demote):
    """The shape of issue 16's internal page-size error (1 layer, 1 KV head of head_dim 1,
    fp16, 8 tokens of L1): it demotes and keeps serving."""
    from hf_models import tiny_config
    cfg = tiny_config(layers=1)
    cfg.head_dim, cfg.num_key_value_heads = 1, 1
    cache = TieredCache(cfg, policy="fifo", l1_budget_tokens=8, block_tokens=4, demote=demote)
    for _ in range(6):
        k = torch.randn(1, 1, 2, 1, dtype=torch.float16)
        kv_len, _ = cache.get_mask_sizes(2)
        keys, _ = cache.update(k, k, 0)
        assert keys.shape[-2] == kv_len
    assert cache.seen_tokens == 12 and cache.telemetry()["evictions"] > 0


def test_crop_within_the_last_block_continues_as_dynamic_cache_does():
    """Cut 2 of 15 tokens (inside the last block of 4), then generate on: the tokens a
    DynamicCache cropped the same way gives."""
    from transformers import DynamicCache
    m = model("llama")
    ids = torch.randint(3, VOCAB, (1, 15), generator=torch.Generator().manual_seed(5))
    outs = []
    for cache in (DynamicCache(config=m.config), tiered(m, 1)):
        with torch.no_grad():
            m(ids, past_key_values=cache, use_cache=True)
            cache.crop(-2)
            assert cache.get_seq_length() == 13
            outs.append(m.generate(ids[:, :14], max_new_tokens=4, do_sample=False,
                                   past_key_values=cache))
    assert torch.equal(outs[0], outs[1])


def test_crop_that_would_remove_whole_blocks_says_why_and_changes_nothing():
    m = model("llama")
    cache = tiered(m, 3)
    generate(m, 3, cache)
    seen = [s.seen_tokens for s in cache.sequences]
    with pytest.raises(UnsupportedModel, match="cannot crop to .* remove whole blocks"):
        cache.crop(-6)
    assert [s.seen_tokens for s in cache.sequences] == seen
    cache.crop(cache.seen_tokens)  # nothing to cut: a no-op


# -- on a GPU ------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_padded_batch_with_beams_on_cuda_matches_dynamic_cache_and_copies_its_stacks():
    """fp32 on CUDA (fp16 rounding over another key order can tip near ties): DynamicCache's
    tokens at full budget with beams (sequence stacks copied on the device, one allocation
    each: a VMM arena cannot be copied); with evictions (INT4 read-through) the pad id
    changes nothing."""
    from transformers import DynamicCache
    m = tiny_model("llama").cuda().eval()
    m.generation_config.eos_token_id = None
    ids, mask = batch(3)
    ids, mask = ids.cuda(), mask.cuda()

    def run(cache, pad=0, **kw):
        with torch.no_grad():
            return m.generate(ids.masked_fill(mask == 0, pad), attention_mask=mask,
                              max_new_tokens=NEW, do_sample=False, past_key_values=cache,
                              pad_token_id=pad, **kw)[:, PROMPT:]
    ref = run(DynamicCache(config=m.config), num_beams=2)
    cache = TieredCache(m.config, l1_budget_tokens=6 * 256, block_tokens=4, backend="cuda",
                        model=m)
    assert torch.equal(run(cache, num_beams=2), ref)
    outs = [run(TieredCache(m.config, policy="h2o", l1_budget_tokens=3 * 16, block_tokens=4,
                            demote="int4", backend="cuda", model=m), pad=p,
                prefill_chunk_size=8) for p in (0, 7)]
    assert torch.equal(outs[0], outs[1])
