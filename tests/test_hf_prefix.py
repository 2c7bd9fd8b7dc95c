"""Prefix reuse with transformers: generate() loads a saved prefix instead of computing it,
on tiny random Llama and Qwen2 models (CPU, seeded, no downloads)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_models import VOCAB, tiny_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from synapse.blocks import Tier  # noqa: E402
from synapse.hf import TieredCache, UnsupportedModel  # noqa: E402
from synapse.hf.prefix import (generate_with_prefix, prefill_with_prefix,  # noqa: E402
                               prefix_fingerprint)
from synapse.prefix import PrefixStore  # noqa: E402

CHUNK = 16
NEW = 12


def prompt(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def document_and_questions():
    """A 96-token document, then two different questions about it."""
    doc = prompt(96, seed=1)
    return (torch.cat([doc, prompt(20, seed=2)], 1), torch.cat([doc, prompt(27, seed=3)], 1))


def greedy(model, ids, cache, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, past_key_values=cache, **kw)


def with_prefix(model, ids, store, cache=None, **kw):
    with torch.no_grad():
        return generate_with_prefix(model, ids, store=store, cache=cache, max_new_tokens=NEW,
                                    do_sample=False, **kw)


class TokenCounter:
    """Counts the tokens each forward pass of the model feeds its embedding."""

    def __init__(self, model):
        self.passes: list[int] = []
        self.hook = model.model.embed_tokens.register_forward_pre_hook(
            lambda mod, args: self.passes.append(args[0].shape[-1]))

    @property
    def prefill(self) -> int:
        return self.passes[0]


def l2_store(model, **kw):
    return PrefixStore(prefix_fingerprint(model, chunk_tokens=CHUNK), l2_bytes=1 << 24, **kw)


# -- a second call loads the shared prefix ------------------------------------------------
def new_cache(kind, model):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    return TieredCache(model, policy="h2o", l1_budget_tokens=256, block_tokens=8)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["dynamic", "tiered"])
def test_a_second_call_loads_the_shared_prefix_and_gives_dynamic_cache_tokens(family, kind):
    """The second question's 96-token document comes from the store (L2), through the
    cache's own update path; the model computes the 27 question tokens only."""
    m = tiny_model(family)
    first, second = document_and_questions()
    ref = greedy(m, second, DynamicCache(config=m.config))
    count = TokenCounter(m)
    with l2_store(m) as store:
        with_prefix(m, first, store, new_cache(kind, m))
        assert count.prefill == 116 and store.report()["chunks_saved"] == 7  # 116 // 16
        count.passes.clear()
        cache = new_cache(kind, m)
        out = with_prefix(m, second, store, cache)
        report = store.report()
    assert count.prefill == 123 - 96
    assert report["hit_tokens"]["l2"] == 96 and report["restored_tokens"] == 96
    assert torch.equal(out, ref)
    tel = cache.telemetry()["prefix"] if kind == "tiered" else cache.prefix_telemetry
    assert tel["restored_tokens"] == 96 and tel["computed_tokens"] == 27
    assert tel["hit_tokens"] == {"l2": 96}
    if kind == "tiered":
        assert cache.telemetry()["tokens"] == 123 + NEW - 1


def test_the_same_prompt_again_computes_only_its_last_chunk_and_tail():
    m = tiny_model("llama")
    ids = prompt(100)
    count = TokenCounter(m)
    with l2_store(m) as store:
        with_prefix(m, ids, store)
        count.passes.clear()
        _, _, reuse = prefill_with_prefix(m, ids, store=store, logits_to_keep=1)
    assert reuse.restored_tokens == 96 and count.prefill == 4


def test_a_prompt_shorter_than_a_chunk_computes_everything_and_saves_nothing():
    m = tiny_model("llama")
    with l2_store(m) as store:
        out = with_prefix(m, prompt(10), store)
        assert store.report()["chunks_saved"] == 0
    assert torch.equal(out, greedy(m, prompt(10), DynamicCache(config=m.config)))


def test_save_false_loads_but_stores_nothing_new():
    m = tiny_model("llama")
    first, second = document_and_questions()
    with l2_store(m) as store:
        with_prefix(m, first[:, :64], store)
        with_prefix(m, second, store, save=False)
        report = store.report()
    assert report["chunks_saved"] == 4 and report["restored_tokens"] == 64


# -- through L3, between processes --------------------------------------------------------------
SAVER = """
import sys, torch
sys.path.insert(0, {tests!r})
from hf_models import tiny_model
from synapse.hf.prefix import generate_with_prefix, prefix_fingerprint
from synapse.prefix import PrefixStore
m = tiny_model("llama")
ids = torch.tensor([[{ids}]])
with PrefixStore(prefix_fingerprint(m, chunk_tokens={chunk}), l3_dir={l3!r}, l3_bytes=1 << 26) as store:
    with torch.no_grad():
        generate_with_prefix(m, ids, store=store, max_new_tokens=1)
    print(store.report()["chunks_saved"])
"""


def test_another_process_loads_what_one_saved_through_l3(tmp_path):
    m = tiny_model("llama")
    first, second = document_and_questions()
    code = SAVER.format(tests=str(Path(__file__).parent), ids=", ".join(map(str, first[0].tolist())),
                        chunk=CHUNK, l3=str(tmp_path))
    saved = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                           text=True)
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert saved.stdout.split()[-1] == "7"
    count = TokenCounter(m)
    with PrefixStore(prefix_fingerprint(m, chunk_tokens=CHUNK), l3_dir=tmp_path,
                     l3_bytes=1 << 26) as store:
        out = with_prefix(m, second, store)
        report = store.report()
    assert report["hit_tokens"]["l3"] == 96 and report["chunks_saved"] == 1  # its own chunk
    assert count.prefill == 27
    assert torch.equal(out, greedy(m, second, DynamicCache(config=m.config)))


# -- policies on top -----------------------------------------------------------------------------
def tiers_of_prefix(cache, tokens):
    return cache.manager.tiers(np.arange(tokens // cache.block_tokens))


def test_a_loaded_prefix_is_demoted_by_a_small_budget_and_tokens_stay_exact():
    """h2o over a 48-token L1 with full-precision L2: the 96 loaded tokens go in steps of
    40 and most are demoted; read-through is exact, so tokens equal DynamicCache's."""
    m = tiny_model("llama")
    first, second = document_and_questions()
    settings = dict(policy="h2o", l1_budget_tokens=48, demote="l2", block_tokens=8)
    with l2_store(m) as store:
        with_prefix(m, first[:, :96], store)
        cache = TieredCache(m, **settings)
        out = with_prefix(m, second, store, cache)
        plain = greedy(m, second, TieredCache(m, **settings), prefill_chunk_size=40)
    tel = cache.telemetry()
    assert tel["prefix"]["restored_tokens"] == 96
    assert tel["demotions"] > 0
    assert (tiers_of_prefix(cache, 96) == int(Tier.L2)).sum() >= 5
    assert tel["l1_peak_bytes"] <= tel["l1_budget_bytes"]
    assert torch.equal(out, plain)
    assert torch.equal(out, greedy(m, second, DynamicCache(config=m.config)))


def test_a_loaded_prefix_is_dropped_as_the_same_cache_without_reuse_drops_it():
    """fifo with drop over a 64-token L1, prefill in chunks of 32: the store was filled
    by such a cache, so the reused KV is what it computes; the loaded prefix goes in the
    same steps, its oldest blocks are dropped, and the tokens are the same as without
    reuse."""
    m = tiny_model("llama")
    first, second = document_and_questions()
    settings = dict(policy="fifo", l1_budget_tokens=64, demote="drop", block_tokens=8)
    with l2_store(m) as store:
        with_prefix(m, first, store, TieredCache(m, **settings), prefill_chunk_size=32)
        cache = TieredCache(m, **settings)
        out = with_prefix(m, second, store, cache, prefill_chunk_size=32)
        plain = greedy(m, second, TieredCache(m, **settings), prefill_chunk_size=32)
    tel = cache.telemetry()
    assert tel["prefix"]["restored_tokens"] == 96 and tel["drops"] > 0
    assert (tiers_of_prefix(cache, 96) == int(Tier.NONE)).sum() >= 6
    assert torch.equal(out, plain)


def test_what_is_saved_is_the_full_precision_kv_the_policy_later_demotes():
    """INT4 over a 32-token L1, prefill in chunks of 16: blocks are demoted while the
    prompt goes in, yet the saved layer-0 keys and values (which no attention feeds)
    equal DynamicCache's bit for bit: they were taken at the cache's update, before
    the policy quantized them."""
    m = tiny_model("llama")
    ids = prompt(64)
    ref = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, past_key_values=ref, use_cache=True)
    cache = TieredCache(m, policy="fifo", l1_budget_tokens=32, demote="int4", block_tokens=8)
    with l2_store(m) as store:
        with_prefix(m, ids, store, cache, prefill_chunk_size=16)
        got = store.load(ids[0])
    assert cache.telemetry()["demotions"] > 0
    assert got.tokens == 64
    saved = torch.cat(got.chunks, dim=3)[0]            # layer 0: [2, kv_heads, 64, head_dim]
    assert torch.equal(saved[0], ref.layers[0].keys[0])
    assert torch.equal(saved[1], ref.layers[0].values[0])


# -- what must not hit -----------------------------------------------------------------------------
def test_another_tenant_gets_no_hit_on_a_saved_prefix():
    m = tiny_model("llama")
    first, second = document_and_questions()
    count = TokenCounter(m)
    with l2_store(m) as store:
        with_prefix(m, first, store, tenant="acme")
        count.passes.clear()
        cache = DynamicCache(config=m.config)
        with_prefix(m, second, store, cache, tenant="globex")
        assert store.report()["hit_tokens"]["l2"] == 0
    assert count.prefill == 123 and cache.prefix_telemetry["restored_tokens"] == 0


def test_a_store_of_another_model_id_sharing_the_directory_gets_no_hit(tmp_path):
    m = tiny_model("llama")
    first, second = document_and_questions()
    fp = prefix_fingerprint(m, chunk_tokens=CHUNK, model_id="tiny-seed-0")
    with PrefixStore(fp, l3_dir=tmp_path, l3_bytes=1 << 26) as store:
        with_prefix(m, first, store)
    other = prefix_fingerprint(m, chunk_tokens=CHUNK, model_id="tiny-seed-1")
    with PrefixStore(other, l3_dir=tmp_path, l3_bytes=1 << 26) as store:
        cache = DynamicCache(config=m.config)
        with_prefix(m, second, store, cache)
        assert store.report()["hit_tokens"]["l3"] == 0
    assert cache.prefix_telemetry["restored_tokens"] == 0


def test_a_store_fingerprinted_for_another_model_or_dtype_is_refused():
    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    with l2_store(llama) as store:
        with pytest.raises(UnsupportedModel, match="config_hash .* this model needs"):
            with_prefix(qwen, prompt(40), store)
    fp16 = PrefixStore(prefix_fingerprint(llama, CHUNK, dtype=torch.float16), l2_bytes=1 << 20)
    with fp16, pytest.raises(UnsupportedModel, match="dtype is 'float16', but this model needs 'float32'"):
        with_prefix(llama, prompt(40), fp16)


def test_a_cache_that_already_holds_tokens_is_refused():
    m = tiny_model("llama")
    cache = DynamicCache(config=m.config)
    greedy(m, prompt(8), cache)
    with l2_store(m) as store, pytest.raises(UnsupportedModel, match="needs an empty cache"):
        with_prefix(m, prompt(40), store, cache)


def test_a_batch_is_refused_in_one_line():
    m = tiny_model("llama")
    with l2_store(m) as store, pytest.raises(UnsupportedModel, match=r"one sequence: .*\(2, 8\)"):
        with_prefix(m, prompt(8).repeat(2, 1), store)


# -- telemetry and the docs ------------------------------------------------------------------------
def lookups(result, tier):
    from synapse.monitor.metrics import REGISTRY
    return REGISTRY.get_sample_value("synapse_prefix_lookups_total",
                                     {"result": result, "tier": tier}) or 0.0


def test_each_load_counts_its_chunks_in_metrics():
    m = tiny_model("llama")
    first, second = document_and_questions()
    with l2_store(m) as store:
        with_prefix(m, first, store)
        hits, misses = lookups("hit", "l2"), lookups("miss", "none")
        with_prefix(m, second, store)
    assert lookups("hit", "l2") - hits == 6       # the document's chunks
    assert lookups("miss", "none") - misses == 1  # the question's whole chunk


def test_the_docs_example_runs_as_printed(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    start = text.index("```python", text.index("## Prefix reuse")) + len("```python")
    exec(compile(text[start:text.index("```", start)], "docs/hf.md (Prefix reuse)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert "'restored_tokens': 96" in lines[1] and "'computed_tokens': 20" in lines[1]
    assert lines[2] == "{'l2': 96}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["dynamic", "tiered"])
def test_on_cuda_a_prefix_from_pinned_l2_and_l3_gives_dynamic_cache_tokens(kind, tmp_path):
    m = tiny_model("llama", dtype=torch.float16).cuda()
    first, second = (ids.cuda() for ids in document_and_questions())
    ref = greedy(m, second, DynamicCache(config=m.config))

    def cache():
        if kind == "dynamic":
            return DynamicCache(config=m.config)
        return TieredCache(m, policy="h2o", l1_budget_tokens=256, block_tokens=8, backend="cuda")

    fp = prefix_fingerprint(m, chunk_tokens=CHUNK)
    for tiers in (dict(l2_bytes=1 << 24), dict(l3_dir=tmp_path / "l3", l3_bytes=1 << 26)):
        with PrefixStore(fp, **tiers) as store:
            with_prefix(m, first, store, cache())
            store.flush()
            out = with_prefix(m, second, store, cache())
            assert sum(store.report()["hit_tokens"].values()) == 96
        assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", [True, False])
def test_on_cuda_the_layerwise_load_fills_head_major_planes_batched_or_not(pinned):
    from synapse.hf.prefix_load import LayerwiseLoad
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(3, 2, 2, 16, 8, generator=g).half() for _ in range(5)]
    if pinned:
        chunks = [c.pin_memory() for c in chunks]
    load = LayerwiseLoad(chunks, torch.device("cuda"), torch.float16)
    load.wait_all()
    load.finish()
    # pinned chunks on a CUDA 12.8+ driver take one batched call a layer; others torch copies
    assert load.copy_path == ("cuMemcpyBatchAsync" if pinned else "torch copy per chunk")
    for i, planes in enumerate(load.planes):
        want = torch.cat([c[i] for c in chunks], dim=2)  # [2, heads, tokens, head_dim]
        assert torch.equal(planes.cpu(), want)
