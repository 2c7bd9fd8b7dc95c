"""TieredCache's per-step cost in torch ops, and the batch's shared L1 planes.

HF decoding is host-bound: each torch op a cache adds per layer costs host time, so
what is held here is the op count of a decode step (counted with a TorchFunctionMode,
deterministic, CPU), and that the batch path that keeps it flat (the sequences' planes
in one tensor, ``synapse.hf.batch.SharedL1``) decides and generates exactly as the
per-sequence path does."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from torch.overrides import TorchFunctionMode  # noqa: E402

from hf_models import VOCAB, one_thread, tiny_model  # noqa: E402,F401

from synapse.hf import TieredCache  # noqa: E402
from synapse.hf.batch import SharedL1  # noqa: E402

PROMPT, NEW, BT = 24, 6, 4


@pytest.fixture(scope="module")
def llama():
    m = tiny_model("llama")
    m.config._attn_implementation = "sdpa"
    m.generation_config.eos_token_id = None
    return m


def prompts(rows: int, pads=()):
    ids = torch.randint(3, VOCAB, (rows, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return ids, mask


class CacheOps(TorchFunctionMode):
    """Counts the torch calls made from synapse's own code (the model's are the same for
    every cache); reading a tensor's attribute (``.shape``, ``.device``) is no op."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import sys
        f = sys._getframe(1)
        while f is not None and "/synapse/" not in f.f_code.co_filename \
                and "/transformers/" not in f.f_code.co_filename:
            f = f.f_back
        if f is not None and "/synapse/" in f.f_code.co_filename \
                and getattr(func, "__name__", "") != "__get__":
            self.count += 1
        return func(*args, **(kwargs or {}))


def decode_ops(model, cache, rows: int, steps: int = 4) -> float:
    """Torch calls from the cache per decode step, after a prefill of PROMPT tokens."""
    ids, mask = prompts(rows)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                       past_key_values=cache)
        nxt = ids[:, -1:]
        counter = CacheOps()
        for _ in range(steps):
            mask = torch.cat((mask, mask.new_ones((rows, 1))), dim=1)
            with counter:
                out = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
    return counter.count / steps


def full(model, rows: int, **kw) -> TieredCache:
    return TieredCache(model.config, policy="fifo", demote="l2", block_tokens=BT,
                       l1_budget_tokens=256 * rows, model=model, **kw)


def test_a_full_budget_decode_step_costs_two_copies_a_layer_and_a_few_views(llama):
    """One sequence, nothing evicted: per layer the step's keys and values go into the
    arena by one copy each and come out as views made once per step."""
    layers = llama.config.num_hidden_layers
    ops = decode_ops(llama, full(llama, 1), 1)
    assert ops <= 2 * layers + 8, ops


def test_a_batch_decode_step_costs_the_torch_ops_of_one_sequence(llama):
    """Batch 8, full budget: the same op count per step as batch 1 plus a constant (the
    sequences share one L1 tensor; nothing per layer is done per sequence)."""
    one = decode_ops(llama, full(llama, 1), 1)
    eight = decode_ops(llama, full(llama, 8), 8)
    assert eight <= one + 4, (one, eight)


def test_a_scored_batch_decode_step_does_not_grow_per_layer_with_the_batch(llama):
    """h2o at full budget (scored every step): per layer one mass pass for the batch."""
    def h2o(rows):
        return TieredCache(llama.config, policy="h2o", demote="int4", block_tokens=BT,
                           l1_budget_tokens=256 * rows, model=llama)
    # batch 2 against 8, both on the batch path (one sequence scores through
    # DecodeScores, a batch through decode_mass: they are held separately below)
    two, eight = decode_ops(llama, h2o(2), 2), decode_ops(llama, h2o(8), 8)
    layers = llama.config.num_hidden_layers
    # per sequence only the per-step hand-over of its block masses (a few numpy ops)
    assert eight - two <= 2 * layers + 8, (two, eight)


def test_a_scored_decode_step_costs_one_matmul_a_layer_and_a_few_ops_a_step():
    """h2o, one sequence, nothing evicted, 6 layers: beyond fifo's two copies a layer the
    scores cost a reshape, a transpose and a matmul into the step's buffer and one add a
    layer, and a constant a step (softmax, sums, the masses per block and their copy to
    the host); scored per layer with ``token_mass`` they cost 11 a layer."""
    m = tiny_model("llama", layers=6)
    m.config._attn_implementation = "sdpa"
    m.generation_config.eos_token_id = None
    fifo = decode_ops(m, full(m, 1), 1)
    h2o = decode_ops(m, TieredCache(m.config, policy="h2o", demote="int4", block_tokens=BT,
                                    l1_budget_tokens=256, model=m), 1)
    assert h2o - fifo <= 4 * 6 + 14, (fifo, h2o)


def generate(model, cache, rows, pads=(), chunk=None):
    ids, mask = prompts(rows, pads)
    ids = ids.masked_fill(mask == 0, 0)
    kw = {"prefill_chunk_size": chunk} if chunk else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             past_key_values=cache, pad_token_id=0, **kw)
    return out[:, PROMPT:]


CASES = [  # policy, demote, budget per row (tokens), pads, prefill chunk
    ("fifo", "l2", 256, (), None),
    ("h2o", "int4", 16, (), 8),       # L2 read through, the rows' layouts coincide
    ("h2o", "l2", 16, (0, 3, 7), 8),  # padded: layouts differ, per-sequence read-through
    ("lru", "int4", 256, (0, 5, 2), None),  # padded, no eviction: one scatter a plane
    ("sinks", "drop", 16, (), 8),
]


@pytest.mark.parametrize("policy,demote,budget,pads,chunk", CASES)
def test_a_batch_on_shared_planes_generates_and_decides_as_on_its_own_planes(
        llama, monkeypatch, policy, demote, budget, pads, chunk):
    """The shared planes change where the bytes are, nothing else: the same tokens and,
    per sequence, the same decisions as the per-sequence path."""
    def run():
        cache = TieredCache(llama.config, policy=policy, demote=demote, block_tokens=BT,
                            l1_budget_tokens=budget * 3, model=llama)
        return generate(llama, cache, 3, pads, chunk), cache
    shared, cs = run()
    assert cs._batch.l1.holds(cs._batch.children)
    monkeypatch.setattr(SharedL1, "holds", lambda self, children: False)
    alone, ca = run()
    assert torch.equal(shared, alone)
    for a, b in zip(cs.sequences, ca.sequences):
        assert a.decisions() == b.decisions()
    if budget < 256:
        assert cs.telemetry()["evictions"] > 0


def test_the_shared_path_is_taken_where_the_layouts_allow(llama):
    """Unpadded rows at equal budgets: every decode step on the shared planes, with L2
    read through as one batch."""
    cache = TieredCache(llama.config, policy="h2o", demote="int4", block_tokens=BT,
                        l1_budget_tokens=16 * 3, model=llama)
    plans = []
    orig = cache._on_forward

    def spy(*a, **k):
        out = orig(*a, **k)
        if cache._batch is not None:
            plans.append(cache._batch.plan)
        return out
    cache._hooks[0].remove()
    cache._hooks = [llama.register_forward_pre_hook(spy, with_kwargs=True)]
    try:
        generate(llama, cache, 3, chunk=8)
    finally:
        cache.detach()
    decode = plans[-(NEW - 1):]
    assert all(p is not None for p in decode)
    assert any("l2" in p for p in decode)


def test_beams_regroup_the_shared_planes_and_match_dynamic_cache(llama):
    """Beam search reorders (and copies) sequences: their L1 bytes are gathered into a
    new shared tensor in the new order, and the tokens are DynamicCache's."""
    from transformers import DynamicCache
    ids, mask = prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=2)
    with torch.no_grad():
        want = llama.generate(ids, past_key_values=DynamicCache(config=llama.config), **kw)
        cache = full(llama, 4)
        got = llama.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got, want)
    assert cache._batch.l1.holds(cache._batch.children)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_batch_on_cuda_reads_l2_through_as_on_its_own_planes(monkeypatch, dtype):
    """CUDA: fp16 takes the fused read-through kernel once per row into one output,
    fp32 the torch ops over the rows' stacked L2 buffers; either way the same tokens and
    decisions as the per-sequence path."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: the batch's CUDA read-through runs there")
    m = tiny_model("llama").to("cuda", getattr(torch, dtype))
    m.config._attn_implementation = "sdpa"
    m.generation_config.eos_token_id = None

    def run():
        cache = TieredCache(m.config, policy="h2o", demote="int4", block_tokens=BT,
                            l1_budget_tokens=16 * 3, model=m, backend="cuda")
        ids, mask = prompts(3)
        with torch.no_grad():
            out = m.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW,
                             do_sample=False, past_key_values=cache, prefill_chunk_size=8)
        return out, cache
    shared, cs = run()
    monkeypatch.setattr(SharedL1, "holds", lambda self, children: False)
    alone, ca = run()
    assert torch.equal(shared, alone)
    for a, b in zip(cs.sequences, ca.sequences):
        assert a.decisions() == b.decisions()
