"""PrefixStore: save once, load the longest cached prefix, from any tier, per tenant."""

import sys
from pathlib import Path

import numpy as np
import pytest

from synapse.prefix import Fingerprint, PrefixStore

CT = 8                                   # tokens per chunk
FP = Fingerprint("tiny", chunk_tokens=CT, kv_layout="[2, heads, tokens, dim]")
SHAPE = (2, 2, CT, 4)                    # one chunk's K and V: 256 bytes of fp16
CHUNK = 2 * int(np.prod(SHAPE))


def prompt(seed: int, n_chunks: int, tail: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32000, n_chunks * CT + tail)


def kv_of(tokens) -> list[np.ndarray]:
    """What a model would compute for each chunk: here a function of the chunk's tokens."""
    return [np.full(SHAPE, tokens[i * CT] % 1000, np.float16) for i in range(len(tokens) // CT)]


def store(tmp_path=None, **kw) -> PrefixStore:
    kw.setdefault("l1_bytes", 4 * CHUNK)
    kw.setdefault("l2_bytes", 8 * CHUNK)
    if tmp_path is not None:
        kw.setdefault("l3_dir", tmp_path / "l3")
        kw.setdefault("l3_bytes", 64 * CHUNK)
    return PrefixStore(FP, **kw)


def test_a_saved_prefix_loads_bit_exact_and_leaves_the_tail_to_compute(tmp_path):
    toks = prompt(0, 3)
    with store(tmp_path) as s:
        assert s.save(toks, kv_of(toks)).saved == 3
        got = s.load(toks)
        assert got.tokens == 3 * CT and got.tiers == ["l1"] * 3
        for a, b in zip(got.chunks, kv_of(toks)):
            assert np.array_equal(a, b)
        assert s.load(toks, max_tokens=len(toks[:3 * CT]) - 1).tokens == 2 * CT


def test_a_shared_prefix_hits_and_the_rest_misses():
    doc = prompt(1, 2, tail=0)
    a = np.concatenate([doc, prompt(2, 2)])
    b = np.concatenate([doc, prompt(3, 2)])
    with store() as s:
        s.save(a, kv_of(a))
        got = s.load(b)
        assert got.tokens == 2 * CT
        assert s.check(b) == 0b0011


def test_check_is_a_bitmask_of_every_cached_chunk_with_gaps(tmp_path):
    toks = prompt(4, 4, tail=0)
    with store(tmp_path, l1_bytes=0, l2_bytes=0) as s:
        s.save(toks, kv_of(toks))
        s.flush()
        assert s.check(toks) == 0b1111
    (tmp_path / "l3" / FP.short() / (s.keys(toks)[1].hex() + ".kv")).unlink()  # another process
    with store(tmp_path, l1_bytes=0, l2_bytes=0) as s:
        assert s.check(toks) == 0b1101
        assert s.load(toks).tokens == CT        # a prefix stops at the first gap


def test_only_missing_chunks_are_asked_for():
    toks = prompt(5, 4)
    asked = []
    with store() as s:
        s.save(toks[:2 * CT], kv_of(toks))
        s.save(toks, lambda i: asked.append(i) or kv_of(toks)[i])
    assert asked == [2, 3]


def test_another_tenant_gets_no_hit_on_the_same_tokens(tmp_path):
    toks = prompt(6, 3)
    with store(tmp_path) as s:
        s.save(toks, kv_of(toks), tenant="a")
        assert s.load(toks, tenant="b").tokens == 0
        assert s.check(toks, tenant="b") == 0
        assert s.load(toks, tenant="a").tokens == 3 * CT


def _lines_run(fn) -> list:
    """Every (file, line) of synapse/prefix executed by ``fn()``, in order."""
    root = str(Path(__file__).resolve().parents[1] / "synapse" / "prefix")
    seen = []

    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith(root):
            if event == "line":
                seen.append((Path(frame.f_code.co_filename).name, frame.f_lineno))
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


def test_a_tenants_lookup_runs_the_same_code_whether_or_not_another_tenant_cached_it(tmp_path):
    """No early exit or extra work that depends on another tenant's entries: tenant b's
    load and check execute the same lines, in the same order, on a store where tenant a
    cached the very same prompt as on an empty one."""
    toks = prompt(7, 4)
    runs = []
    for i, populated in enumerate((False, True)):
        with store(tmp_path / str(i)) as s:
            s.save(prompt(8, 2), kv_of(prompt(8, 2)), tenant="b")   # b has entries of its own
            if populated:
                s.save(toks, kv_of(toks), tenant="a")
            s.flush()
            runs.append(_lines_run(lambda: (s.load(toks, tenant="b"), s.check(toks, tenant="b"))))
    assert runs[0] == runs[1]
    assert len(runs[0]) > 50


def test_chunks_come_back_from_l2_and_l3_when_faster_tiers_lost_them(tmp_path):
    toks = prompt(9, 6)
    with store(tmp_path, l1_bytes=2 * CHUNK, l2_bytes=4 * CHUNK, high_watermark=1.0,
               low_watermark=1.0) as s:
        s.save(toks, kv_of(toks))
        s.flush()
        got = s.load(toks)
        assert got.tiers == ["l3", "l3", "l2", "l2", "l1", "l1"]
        assert all(np.array_equal(a, b) for a, b in zip(got.chunks, kv_of(toks)))
        rep = s.report()
        assert rep["hit_tokens"] == {"l1": 2 * CT, "l2": 2 * CT, "l3": 2 * CT}
        assert rep["bytes_loaded"]["l3"] == 2 * CHUNK
        assert rep["load_per_chunk"]["l3"]["count"] == 2


@pytest.mark.parametrize("tier,kw", [("l1", {"l1_bytes": 4 * CHUNK, "l2_bytes": 0}),
                                     ("l2", {"l1_bytes": 0, "l2_bytes": 4 * CHUNK}),
                                     ("l3", {"l1_bytes": 0, "l2_bytes": 0, "l3_bytes": 4 * CHUNK})])
def test_each_tier_keeps_within_capacity_and_trims_to_its_low_watermark(tmp_path, tier, kw):
    with store(tmp_path if tier == "l3" else None, high_watermark=0.7, low_watermark=0.5,
               **kw) as s:
        for seed in range(3):
            toks = prompt(20 + seed, 1, tail=0)
            s.save(toks, kv_of(toks))
            s.flush()
        rep = s.report()["tiers"][tier]
        assert rep["used_bytes"] == 2 * CHUNK      # 3 chunks > 70%: trimmed down to 50%
        assert rep["evictions"] == 1
        oldest, newest = prompt(20, 1, tail=0), prompt(22, 1, tail=0)
        assert s.check(oldest) == 0 and s.check(newest) == 1
        if tier == "l3":
            assert len(list((tmp_path / "l3" / FP.short()).glob("*.kv"))) == 2


def test_torch_tensors_round_trip_with_their_dtype_and_shape(tmp_path):
    torch = pytest.importorskip("torch")
    toks = prompt(10, 2)
    kv = [torch.randn(SHAPE, dtype=torch.bfloat16) for _ in range(2)]
    with store(tmp_path, l1_bytes=0, l2_bytes=0) as s:
        s.save(toks, kv)
        s.flush()
    with store(tmp_path, l1_bytes=0, l2_bytes=CHUNK * 4) as s:   # a new process's view
        got = s.load(toks)
        assert got.tiers == ["l3", "l3"]
        for a, b in zip(got.chunks, kv):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_saves_that_are_never_loaded_are_flagged():
    with store() as s:
        for seed in range(3):
            toks = prompt(30 + seed, 2)
            s.save(toks, kv_of(toks))
            s.load(prompt(40 + seed, 2))
        rep = s.report()
    assert rep["saves_but_no_loads"] is True
    assert "doing nothing" in rep["warning"]


def test_load_async_returns_a_handle_and_prefetch_lands_in_l2(tmp_path):
    toks = prompt(11, 3)
    with store(tmp_path, l1_bytes=0) as s:
        s.save(toks, kv_of(toks))
        s.flush()
    with store(tmp_path, l1_bytes=0) as s:
        h = s.prefetch(toks)
        got = h.wait()
        assert h.done() and got.tiers == ["l3"] * 3
        assert s.load(toks).tiers == ["l2"] * 3


def test_a_store_needs_a_tier_and_a_capacity_for_its_disk(tmp_path):
    with pytest.raises(ValueError, match="at least one tier"):
        PrefixStore(FP)
    with pytest.raises(ValueError, match="l3_bytes"):
        PrefixStore(FP, l3_dir=tmp_path)


@pytest.mark.cuda
def test_on_a_gpu_l1_holds_device_tensors_and_l2_pinned_host_memory(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    toks = prompt(12, 3)
    kv = [torch.randn(SHAPE, dtype=torch.float16, device="cuda") for _ in range(3)]
    with store(tmp_path, l1_bytes=CHUNK, l2_bytes=3 * CHUNK, device="cuda",
               high_watermark=1.0, low_watermark=1.0) as s:
        s.save(toks, kv)
        s.flush()
        assert all(torch.from_numpy(s.media[1].raw(k)).is_pinned() for k in s.keys(toks))
        got = s.load(toks)
        assert got.tiers == ["l2", "l2", "l1"]       # L1 has room for one: the newest
        assert got.chunks[2].device.type == "cuda" and got.chunks[0].is_pinned()
        for a, b in zip(got.chunks, kv):
            assert torch.equal(a.to("cuda"), b)


def test_the_readme_example_runs_as_printed(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python", text.index("## Prefix reuse")) + len("```python")
    exec(compile(text[start:text.index("```", start)], "README.md (Prefix reuse)", "exec"), {})
    first, second = capsys.readouterr().out.splitlines()
    assert first == "64 ['l3', 'l3', 'l3', 'l2'] 0b111111"
    assert second == "{'l1': 0, 'l2': 16, 'l3': 48} 0"
