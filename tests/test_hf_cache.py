"""TieredCache: a transformers Cache over Synapse's tiers, on tiny random Llama and Qwen2
models built from configs (CPU, seeded, no downloads)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import ECHO, NEEDLE, VOCAB, needle_model, tiny_config, tiny_model  # noqa: E402

from synapse.blocks import Tier  # noqa: E402
from synapse.errors import CapacityError  # noqa: E402
from synapse.hf import TieredCache, UnsupportedModel  # noqa: E402
from synapse.hf.int4 import dequantize, quantize  # noqa: E402


def greedy(model, ids, cache, new=16, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, past_key_values=cache,
                              output_logits=True, return_dict_in_generate=True, **kw)


def prompt(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# -- exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("policy", ["h2o", "lru", "fifo"])
def test_budget_above_context_gives_dynamic_cache_tokens_and_logits(family, policy):
    from transformers import DynamicCache
    m = tiny_model(family)
    ids = prompt(40)
    ref = greedy(m, ids, DynamicCache(config=m.config), new=24)
    cache = TieredCache(m.config, policy=policy, l1_budget_tokens=128, demote="int4",
                        block_tokens=8, model=m)
    out = greedy(m, ids, cache, new=24)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    t = cache.telemetry()
    assert t["evictions"] == 0 and t["l2_hits"] == 0 and t["misses"] == 0
    assert t["l1_hits"] > 0


def test_int4_torch_is_bit_exact_with_the_numpy_reference():
    from synapse.hw import int4 as ref
    x = torch.randn(3, 2, 5, 64, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    x[0, 0, 0, :32] = 0.25  # a flat group: scale 0
    for g in (32, 64):
        q = quantize(x, g)
        r = ref.quantize(x.numpy(), g)
        assert np.array_equal(q.packed.reshape(-1).numpy(), r.packed)
        assert np.array_equal(q.scales.reshape(-1).numpy(), r.scales)
        assert np.array_equal(q.zeros.reshape(-1).numpy(), r.zeros)
        assert np.array_equal(dequantize(q).numpy(), ref.dequantize(r))


def test_int4_per_channel_rows_are_bit_exact_with_the_numpy_reference():
    """Keys per channel (a group per (head, dim) over a block's tokens): the torch rows
    hold the reference's bytes for fp16 and fp32 planes, and decode to its values."""
    from synapse.hf.int4 import dequantize_channel_rows, quantize_channel_rows
    from synapse.hw import int4 as ref
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float16, torch.float32):
        x = (torch.randn(5, 16, 2, 64, generator=gen) * 3).to(dtype)  # 5 planes [BT, H, D]
        x[1, :, 0, 7] = -0.5  # a flat channel: scale 0
        q = quantize_channel_rows(x.reshape(5, 16, 128))
        back = dequantize_channel_rows(q, 16, 128, dtype)
        for r in range(5):
            t = ref.quantize_channels(x[r].numpy())
            want = np.concatenate([t.packed, t.scales.view(np.uint8), t.zeros.view(np.uint8)])
            assert np.array_equal(q[r].numpy(), want)
            assert np.array_equal(back[r].numpy(), ref.dequantize_channels(t).reshape(-1))


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_a_layer_row_is_the_key_row_then_the_value_row(keys):
    from synapse.hf.int4 import dequantize_layer_rows, quantize_layer_rows
    from synapse.hw import int4 as ref
    gen = torch.Generator().manual_seed(8)
    k = torch.randn(3, 8, 128, generator=gen).half()
    v = torch.randn(3, 8, 128, generator=gen).half()
    rows = quantize_layer_rows(k, v, keys, 64)
    for r in range(3):
        kt = ref.quantize_channels(k[r].numpy()) if keys == "channel" \
            else ref.quantize(k[r].numpy(), 64)
        vt = ref.quantize(v[r].numpy(), 64)
        want = b"".join(a.tobytes() for a in (kt.packed, kt.scales, kt.zeros,
                                              vt.packed, vt.scales, vt.zeros))
        assert rows[r].numpy().tobytes() == want
    bk, bv = dequantize_layer_rows(rows, 8, 128, keys, 64, torch.float32)
    assert bk.shape == bv.shape == (3, 8 * 128)
    assert float((bv - v.reshape(3, -1).float()).abs().max()) < 0.5


def test_an_unknown_int4_key_format_is_refused():
    with pytest.raises(ValueError, match="int4_keys must be one of channel, token"):
        TieredCache(tiny_config(), l1_budget_tokens=64, int4_keys="head")


# -- INT4 demotion: bounded error ------------------------------------------------------------
def element_bound(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Per-group bound on |x - x_hat| (docs/hf.md, "INT4 error bound"): half a step, plus
    what rounding the scale and zero to fp16 can add (2**-11 relative each)."""
    s, z = scales.float(), zeros.float()
    return s * (0.5 + 15 * 2.0**-11) + z.abs() * 2.0**-11 + 1e-7


def teacher_forced(model, cache, ids, chunk):
    """Feed ``ids`` (prompt in chunks, then one token per step); logits of every step."""
    out = []
    with torch.no_grad():
        for i in range(0, ids.shape[1], chunk):
            out.append(model(ids[:, i:i + chunk], past_key_values=cache, use_cache=True).logits[:, -1])
    return out


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_int4_demotion_stays_within_the_int4_bound(keys):
    """INT4 demotion of old blocks (budget 32 tokens of a 96-token run), per layer 0's
    attention and end to end, with keys per channel or per token.

    Layer 0 sees identical inputs in both runs (teacher forcing), so its attention output
    differs only through the INT4 keys and values, and obeys the bound derived in
    docs/hf.md: |o' - o| <= eps_V + (exp(2 * Delta) - 1) * max|V|, with
    Delta = scaling * max_h ||q_h||_1 * eps_K. That bound is checked at every step.
    End to end the logits must stay within 5% of the logits' largest magnitude: the
    per-layer bound is proven, its growth through later layers and the MLPs is not
    bounded analytically, so that tolerance is stated, not derived.
    """
    from transformers import DynamicCache
    m = tiny_model("llama", seed=1)
    ids = prompt(96, seed=5)
    grabs = {}

    def grab(name):
        def hook(_mod, args):
            grabs.setdefault(name, []).append(args[0][:, -1].clone())
        return hook

    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                        block_tokens=8, model=m, int4_keys=keys)
    q_tap, bounds = {}, []

    def bound_hook(_mod, args):  # layer 0's attention is done: its blocks are as it read them
        bounds.append(_layer0_bound(cache, m, q_tap["q"]))

    attn = m.model.layers[0].self_attn
    h = attn.o_proj.register_forward_pre_hook(grab("cur"))
    hb = attn.o_proj.register_forward_pre_hook(bound_hook)
    qh = attn.q_proj.register_forward_hook(lambda mod, a, o: q_tap.__setitem__("q", o))
    steps = [ids[:, :16]] + [ids[:, i:i + 1] for i in range(16, 96)]
    with torch.no_grad():
        logits = [m(x, past_key_values=cache, use_cache=True).logits[:, -1] for x in steps]
    hb.remove()
    h.remove()
    qh.remove()
    cur = grabs.pop("cur")
    h = m.model.layers[0].self_attn.o_proj.register_forward_pre_hook(grab("ref"))
    ref_cache = DynamicCache(config=m.config)
    with torch.no_grad():
        ref_logits = [m(x, past_key_values=ref_cache, use_cache=True).logits[:, -1] for x in steps]
    h.remove()
    ref = grabs.pop("ref")
    t = cache.telemetry()
    assert t["demotions"] > 0 and t["l2_hits"] > 0
    checked = 0
    for step, (a, b, bound) in enumerate(zip(cur, ref, bounds)):
        diff = float((a - b).abs().max())
        assert diff <= bound + 1e-5, (step, diff, bound)
        checked += bound > 0
    assert checked > 40  # most steps read INT4 blocks
    scale = max(float(x.abs().max()) for x in ref_logits)
    worst = max(float((x - y).abs().max()) for x, y in zip(logits, ref_logits))
    assert worst <= 0.05 * scale, (worst, scale)
    assert 0 < t["int4_rel_rmse"] < 0.2


def _layer0_bound(cache, model, q_out):
    """docs/hf.md's attention-output bound for layer 0 at this step (0 without INT4)."""
    a = model.model.layers[0].self_attn
    held = cache.inspect_layer(0)
    vmax = float(held["l1_values"].abs().max())
    if "l2_key_scales" not in held:
        return 0.0
    eps_k = float(element_bound(held["l2_key_scales"], held["l2_key_zeros"]).max())
    eps_v = float(element_bound(held["l2_value_scales"], held["l2_value_zeros"]).max())
    vmax = max(vmax, float(held["l2_values"].abs().max()) + eps_v)
    # q after RoPE has the same per-pair norm; ||q||_1 <= sqrt(2) * sum of pair norms
    q = q_out[:, -1].view(-1, a.head_dim).float()
    half = a.head_dim // 2
    pair = torch.sqrt(q[:, :half] ** 2 + q[:, half:] ** 2)
    q1 = float((math.sqrt(2) * pair.sum(-1)).max())
    delta = a.scaling * q1 * eps_k
    return eps_v + (math.exp(2 * delta) - 1) * vmax


# -- budget --------------------------------------------------------------------------------
@pytest.mark.parametrize("demote", ["int4", "l2", "drop"])
def test_device_kv_never_exceeds_the_budget(demote):
    m = tiny_model("llama", seed=2)
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=48, demote=demote,
                        block_tokens=8, model=m)
    seen = []
    h = m.register_forward_hook(lambda *a: seen.append(cache.device_kv_bytes()))
    out = greedy(m, prompt(64, seed=7), cache, new=40, prefill_chunk_size=16)
    h.remove()
    budget = cache.l1_budget_bytes
    assert len(seen) == cache.step + 1 == len(out.logits) + 64 // 16 - 1
    assert max(seen) <= budget
    assert cache.l1_peak_bytes <= budget  # measured after every layer's update and move
    assert cache.telemetry()["evictions"] > 0
    assert cache.telemetry()["tokens"] == 64 + 40 - 1


@pytest.mark.parametrize("policy,demote", [("h2o", "int4"), ("fifo", "l2"), ("sinks", "drop")])
def test_the_mask_sizes_count_of_kept_keys_is_the_page_tables(policy, demote):
    """``mask_sizes`` takes the keys kept before a step from the step's layout (L1's and
    L2's slots); that is ``kept_tokens()``, the page table's count, at every step, with
    blocks demoted, dropped and read through."""
    m = tiny_model("llama", seed=2)
    cache = TieredCache(m.config, policy=policy, l1_budget_tokens=48, demote=demote,
                        block_tokens=8, model=m)
    orig, seen = cache.mask_sizes, []

    def spy(q):
        out = orig(q)
        if cache._step is not None:  # None: the first pass, before any block
            seen.append((cache._step["kept"], cache.kept_tokens()))
        return out
    cache.mask_sizes = spy
    greedy(m, prompt(64, seed=7), cache, new=30, prefill_chunk_size=16)
    assert len(seen) == cache.step > 15 and all(a == b for a, b in seen), seen
    assert cache.telemetry()["evictions"] > 0


# -- H2O keeps a planted needle, LRU does not ------------------------------------------------
def needle_run(policy):
    """The needle is planted in the weights (tests/hf_models.needle_model): ECHO queries
    put almost all their attention on the NEEDLE token's key, other queries spread theirs.
    48-token prompt with the needle at position 20 (block 2), fed in chunks of 16; then
    90 single-token steps, ECHO at steps 1, 3, 5, 7 and filler after; L1 budget 64 tokens
    (8 blocks of 8), demote=drop. The needle is heavily attended early and never again."""
    m = needle_model()
    cache = TieredCache(m.config, policy=policy, l1_budget_tokens=64, demote="drop",
                        block_tokens=8, model=m, record_masses=True)
    p = prompt(48, seed=1)
    p[0, 20] = NEEDLE
    d = prompt(90, seed=2)
    d[0, [1, 3, 5, 7]] = ECHO
    teacher_forced(m, cache, p, 16)
    with torch.no_grad():
        for j in range(90):
            m(d[:, j:j + 1], past_key_values=cache, use_cache=True)
    return cache


def test_h2o_retains_a_planted_needle_that_lru_drops():
    h2o, lru = needle_run("h2o"), needle_run("lru")
    # the plant works: at an ECHO step the needle's block takes nearly all the attention
    assert h2o.masses[4][2] > 0.9
    assert h2o.manager.table.tier[2] == Tier.L1
    assert lru.manager.table.tier[2] == Tier.NONE
    for c in (h2o, lru):
        assert c.telemetry()["drops"] > 5


# -- scores ---------------------------------------------------------------------------------
def test_scores_equal_eager_attention_weights_per_block():
    """The cache's per-block masses (from hooked queries, under sdpa) equal the eager
    attention weights summed per block, averaged over heads and queries."""
    m = tiny_model("llama", seed=4)
    ids = prompt(20, seed=9)
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=256, block_tokens=8, model=m,
                        record_masses=True)
    with torch.no_grad():
        m(ids[:, :12], past_key_values=cache, use_cache=True)
        m(ids[:, 12:13], past_key_values=cache, use_cache=True)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        full = m(ids[:, :13], output_attentions=True)
    m.set_attn_implementation("sdpa")
    for step, rows in ((0, slice(0, 12)), (1, slice(12, 13))):
        for layer, att in enumerate(full.attentions):
            w = att[0, :, rows, : rows.stop].float().mean(dim=(0, 1))  # [keys]
            blocks = torch.zeros(2).index_add_(0, torch.arange(rows.stop) // 8, w)
            np.testing.assert_allclose(cache.layer_masses[step][layer], blocks.numpy(),
                                       atol=2e-6)


def test_decode_scores_batched_over_layers_decide_as_scored_per_layer(monkeypatch):
    """h2o with INT4 demotion under a small budget (L2 read through, chunked prefill):
    a decode step's masses batched over the layers (``DecodeScores``) are the bits of
    ``token_mass`` per layer, so the masses, the decisions and the tokens are the same."""
    from synapse.hf.scores import DecodeScores
    m = tiny_model("llama", layers=3, seed=5)

    def run():
        cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=48, demote="int4",
                            block_tokens=8, model=m, record_masses=True)
        out = greedy(m, prompt(48, seed=3), cache, new=16, prefill_chunk_size=16)
        return out.sequences, cache
    batched, cb = run()
    monkeypatch.setattr(DecodeScores, "add", lambda self, *a: False)
    alone, ca = run()
    assert torch.equal(batched, alone)
    assert cb.telemetry()["demotions"] > 0
    assert cb.decisions() == ca.decisions()
    assert len(cb.layer_masses) == len(ca.layer_masses) > 16
    for x, y in zip(cb.layer_masses, ca.layer_masses):
        assert np.array_equal(x, y)


# -- bad input --------------------------------------------------------------------------------
def test_a_budget_below_two_blocks_is_refused_naming_the_numbers():
    with pytest.raises(CapacityError, match=r"l1_budget_tokens=12 .*2 blocks.*16 tokens"):
        TieredCache(tiny_config(), l1_budget_tokens=12, block_tokens=8)


def test_a_sliding_window_model_is_refused_by_type():
    from transformers import MistralConfig
    cfg = MistralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    with pytest.raises(UnsupportedModel, match="'mistral'.*sliding_attention"):
        TieredCache(cfg, policy="fifo", l1_budget_tokens=64, block_tokens=8)


def test_h2o_without_the_model_is_a_clear_error_before_anything_is_cached():
    m = tiny_model("llama")
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=64, block_tokens=8)
    with pytest.raises(UnsupportedModel, match="needs attention scores: pass model=model"):
        greedy(m, prompt(8), cache, new=2)
    assert cache.seen_tokens == 0


def test_a_prompt_longer_than_the_budget_asks_for_chunked_prefill():
    m = tiny_model("llama")
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=32, block_tokens=8)
    with pytest.raises(CapacityError, match=r"5 KV blocks .* holds 4 blocks .*prefill_chunk_size=24"):
        greedy(m, prompt(40), cache, new=2)


def test_belady_and_batches_without_the_model_are_refused():
    with pytest.raises(UnsupportedModel, match="offline oracle"):
        TieredCache(tiny_config(), policy="belady", l1_budget_tokens=64, block_tokens=8)
    m = tiny_model("llama")
    cache = TieredCache(m.config, policy="fifo", l1_budget_tokens=64, block_tokens=8)
    with pytest.raises(UnsupportedModel, match="batch of 2 .* pass model=model"):
        with torch.no_grad():
            m(prompt(8).repeat(2, 1), past_key_values=cache, use_cache=True)


# -- telemetry --------------------------------------------------------------------------------
def test_telemetry_and_dump_use_the_runner_format(tmp_path):
    from synapse.results import load_run
    m = tiny_model("llama")
    cache = TieredCache(m, policy="h2o", l1_budget_tokens=32, demote="int4", block_tokens=8)
    greedy(m, prompt(24), cache, new=24, prefill_chunk_size=8)
    t = cache.telemetry()
    for key in ("l1_hits", "l2_hits", "misses", "evictions", "demotions", "drops", "bytes_h2d",
                "bytes_d2h", "int4_rmse", "stall_s"):
        assert key in t
    assert t["bytes_d2h"] > 0 and t["bytes_h2d"] > 0
    cache.dump(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.result["kind"] == "hf_cache" and run.metrics["demotions"] == t["demotions"]
    assert run.result["timeline"]["l1_bytes"]
    first = json.loads((tmp_path / "run" / "decisions.jsonl").read_text().splitlines()[0])
    assert first["action"] == "insert"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_dynamic_cache_and_keeps_the_budget():
    from transformers import DynamicCache
    m = tiny_model("llama").cuda()
    ids = prompt(40).cuda()
    ref = greedy(m, ids, DynamicCache(config=m.config), new=16)
    out = greedy(m, ids, TieredCache(m.config, l1_budget_tokens=128, block_tokens=8,
                                     backend="cuda", model=m), new=16)
    assert torch.equal(out.sequences, ref.sequences)
    cache = TieredCache(m.config, l1_budget_tokens=32, demote="int4", block_tokens=8,
                        backend="cuda", model=m)
    greedy(m, ids, cache, new=32, prefill_chunk_size=16)
    assert cache.l1_peak_bytes <= cache.l1_budget_bytes
    assert cache.telemetry()["l2_hits"] > 0


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "6.0.0"])
def test_a_transformers_outside_the_supported_range_is_named(monkeypatch, version):
    import transformers
    import synapse.hf as hf
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UnsupportedModel, match=rf"transformers >=5\.17,<6; transformers {version}"):
        hf.check_transformers()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert hf.check_transformers() == "5.17.0"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_read_through_on_driver_calls_and_reused_buffers_changes_no_bit():
    """The fused INT4 read-through with its copies and events as driver calls and a decode
    step's keys in one reused pair of buffers gives the logits, tokens and decisions of the
    same kernel with torch's events and a fresh pair a layer."""
    m = tiny_model("llama", dtype=torch.float16).cuda()
    ids = prompt(48).cuda()

    def run(driver: bool):
        cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                            block_tokens=8, backend="cuda", model=m)
        if not driver:
            cache._drv = False  # torch's events and copies, as before
        out = greedy(m, ids, cache, new=24, prefill_chunk_size=16)
        return cache, out

    fast, a = run(True)
    slow, b = run(False)
    assert fast._fused and slow._fused, getattr(fast, "_fused_reason", "")
    assert fast._drv and slow._drv is False, getattr(fast, "_drv_reason", "")
    assert getattr(fast, "_asm_buf", None) is not None  # decode steps used the reused pair
    assert fast.telemetry()["l2_hits"] > 0
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(x, y)
    assert fast.decisions() == slow.decisions()


@pytest.mark.parametrize("demote", ["int4", "l2"])
def test_l2_views_kept_across_steps_change_no_bit(monkeypatch, demote):
    """The read-through's views of L2 are kept while its block count stays (made again
    when a demotion changes it): the logits, tokens and decisions of views made afresh
    every step."""
    m = tiny_model("llama", seed=6)
    ids = prompt(48, seed=4)

    def run():
        cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=32, demote=demote,
                            block_tokens=8, model=m)
        return cache, greedy(m, ids, cache, new=30, prefill_chunk_size=16)
    kept, a = run()
    orig = TieredCache._l2_views

    def afresh(self):
        self._l2_kept = None
        return orig(self)
    monkeypatch.setattr(TieredCache, "_l2_views", afresh)
    fresh, b = run()
    t = kept.telemetry()
    assert t["l2_hits"] > 0 and t["demotions"] > 1  # read through, L2 grown on the way
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    assert kept.decisions() == fresh.decisions()
