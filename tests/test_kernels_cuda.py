"""The CUDA kernels against their NumPy specs (synapse/hw/kernels.py, cuda/*.cu).

Tests marked ``cuda`` need PyCUDA and an NVIDIA GPU and skip elsewhere with that reason.
The unmarked tests at the top check the loader's host-side logic on any machine (source
lookup, launch planning, argument checks) and, where nvcc is installed, compilation.

GPU conventions: fresh random inputs per test (seeded from the test id), every output
buffer poisoned before each launch (twice, with two different byte patterns, so a byte the
kernel forgot to write cannot match the reference by luck) and followed by a guard region
that must stay untouched.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from synapse.errors import BackendUnavailable, KernelError
from synapse.hw import int4, kernels
from synapse.hw.attention_ref import attention_decode_ref
from synapse.hw.kv_layout import KVLayout

NEEDS_GPU = "needs PyCUDA and an NVIDIA GPU"
HAS_NVCC = any(
    p and os.path.isfile(p)
    for p in (os.environ.get("SYNAPSE_NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc")
)
GUARD_BYTES = 512
POISONS = (0xA5, 0x5A)
ATTN_SHAPES = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128), (256, 64)]


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# =========================================================================== any machine


def test_sources_are_found():
    for name in kernels.SOURCES:
        assert kernels.source_path(name).read_bytes().startswith(b"//")
    with pytest.raises(ValueError, match="unknown kernel source"):
        kernels.source_path("nope.cu")


def test_importing_synapse_hw_does_not_import_pycuda():
    code = (
        "import sys, synapse.hw, synapse.hw.int4, synapse.hw.kv_layout, synapse.hw.attention_ref\n"
        "assert 'pycuda' not in sys.modules, 'pycuda imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_resident_blocks_per_sm_on_sm90():
    # int4 quantize: 256 threads x 40 regs -> 1280 regs per warp, 8 warps -> 6 CTAs by registers
    assert kernels.resident_blocks_per_sm(256, 40, 0) == 6
    # int4 dequantize: 32 regs -> limited by threads: 2048 / 256
    assert kernels.resident_blocks_per_sm(256, 32, 0) == 8
    # attention split: 128 threads x 48 regs -> 1536 per warp x 4 warps -> 10 CTAs
    assert kernels.resident_blocks_per_sm(128, 48, 4112 + 64) == 10
    # huge shared memory per block still leaves one CTA
    assert kernels.resident_blocks_per_sm(128, 48, 10**9) == 1


def _covered_vectors(num_vec: int, grid: int, threads: int, unroll: int) -> np.ndarray:
    """Emulates the tile loop of int4.cu: how often each vector index is visited."""
    hits = np.zeros(num_vec, dtype=np.int64)
    tile = unroll * threads
    for block in range(grid):
        base = tile * block
        while base < num_vec:  # uniform per block, as in the kernel
            for u in range(unroll):
                v = base + u * threads + np.arange(threads)
                np.add.at(hits, v[v < num_vec], 1)
            base += tile * grid
    return hits


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("groups", [1, 37, 1000])
@pytest.mark.parametrize("unroll", [kernels.QUANT_VECS_PER_THREAD, kernels.DEQUANT_VECS_PER_THREAD])
def test_int4_grid_visits_every_vector_once(group_size, groups, unroll):
    n = group_size * groups
    num_vec = n // 8
    for num_sms, per_sm in [(132, 6), (1, 1), (2, 3)]:
        grid = kernels.int4_grid(n, unroll, num_sms, per_sm)
        assert 1 <= grid <= num_sms * per_sm
        assert (_covered_vectors(num_vec, grid, kernels.INT4_THREADS, unroll) == 1).all()


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("unroll", sorted({u for _, u in kernels.INT4_QUANT_VARIANTS.values()}))
def test_int4_groups_sit_inside_aligned_warp_slices(group_size, unroll):
    """Quantize's shuffles assume a group's G/8 vectors are lanes [k*G/8, (k+1)*G/8) of one
    warp: true when tiles start at multiples of 32 vectors and blockDim is a multiple of 32
    (every variant's unroll; the staged kernel's pass 2 needs no shuffles)."""
    lanes = group_size // 8
    threads = kernels.INT4_THREADS
    assert threads % 32 == 0 and 32 % lanes == 0
    for base in range(0, 10 * unroll * threads, unroll * threads):
        for u in range(unroll):
            v = base + u * threads + np.arange(threads)
            lane = np.arange(threads) % 32
            assert (v % 32 == lane).all()  # so group = v // lanes never crosses a warp


@pytest.mark.parametrize("layers, heads", [(1, 1), (2, 3), (32, 8), (80, 64)])
@pytest.mark.parametrize("num_blocks", [0, 1, 7, 300, 5000, 200_000])
def test_attention_plan_covers_every_block_once(layers, heads, num_blocks):
    plan = kernels.attention_plan(layers, heads, 128, 16, num_blocks, num_sms=132, ctas_per_sm=10)
    bps, splits = plan.blocks_per_split, plan.num_splits
    assert bps >= 1 and 0 <= splits <= kernels.MAX_GRID_Y
    if num_blocks:
        covered = [b for s in range(splits) for b in range(s * bps, min(num_blocks, (s + 1) * bps))]
        assert covered == list(range(num_blocks))
        assert (splits - 1) * bps < num_blocks  # no empty split
    else:
        assert splits == 0
    assert plan.split_grid == (layers * heads, splits)
    assert plan.combine_grid == (layers * heads, 1) and plan.combine_block == (128, 1, 1)
    assert plan.workspace_bytes >= 4 * layers * heads * splits * (128 + 2)
    m, l_, acc = plan.workspace_offsets(layers, heads)
    assert acc + 4 * layers * heads * splits * 128 <= plan.workspace_bytes
    # enough CTAs to fill the chip when there are enough blocks
    if num_blocks >= 2 * 132 * 10:
        assert layers * heads * splits >= 132 * 10


def test_wrappers_check_arguments_before_touching_the_device():
    with pytest.raises(ValueError, match="src_ptr"):
        kernels.quantize_int4(8, 4096, 64, 32)  # misaligned source
    with pytest.raises(ValueError, match="group_size"):
        kernels.dequantize_int4(4096, 8192, 64, 48)
    with pytest.raises(ValueError, match="divisible"):
        kernels.quantize_int4(4096, 8192, 80, 32)
    table = (4096, 8192, 12288, 3)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.attention_decode(4096, table, 1, 1, 96, 16, 32, 0.1, 4096, 4096)
    with pytest.raises(ValueError, match="multiple of group_size"):
        kernels.attention_decode(4096, table, 1, 1, 64, 16, 128, 0.1, 4096, 4096)


def test_without_pycuda_the_wrappers_say_so(monkeypatch):
    monkeypatch.setattr(kernels, "_cuda", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("No module named 'pycuda'"))
    with pytest.raises(BackendUnavailable, match="PyCUDA"):
        kernels.quantize_int4(4096, 8192, 64, 32)


def test_a_missing_nvcc_is_a_kernel_error(tmp_path):
    with pytest.raises(KernelError, match="nvcc"):
        kernels.compile_cubin("int4.cu", "sm_90", nvcc=str(tmp_path / "no-nvcc"), out_dir=tmp_path)


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
@pytest.mark.parametrize("source", kernels.SOURCES)
def test_compile_cubin_for_sm90_and_cache_it(tmp_path, source):
    cubin = kernels.compile_cubin(source, "sm_90", out_dir=tmp_path)
    assert cubin.parent == tmp_path and cubin.stat().st_size > 0
    stamp = cubin.stat().st_mtime_ns
    assert kernels.compile_cubin(source, "sm_90", out_dir=tmp_path) == cubin
    assert cubin.stat().st_mtime_ns == stamp  # second call is a cache hit
    names = {"int4.cu": [b"int4_quantize_g32", b"int4_dequantize_g128"],
             "attention_decode.cu": [b"attention_decode_split_d128_g64", b"attention_decode_combine",
                                     b"attention_decode_segments_split_d128_g64",
                                     b"attention_decode_segments_combine"],
             "kv_fill.cu": [b"kv_key_prefix"]}
    data = cubin.read_bytes()
    assert all(name in data for name in names[source])  # extern "C": unmangled names
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_a_compile_error_is_a_kernel_error_with_nvcc_output(tmp_path, monkeypatch):
    bad = tmp_path / "bad.cu"
    bad.write_text("// broken\n__global__ void k() { undefined_symbol(); }\n")
    monkeypatch.setattr(kernels, "source_path", lambda name: bad)
    with pytest.raises(KernelError, match="undefined_symbol|identifier") as info:
        kernels.compile_cubin("int4.cu", "sm_90", out_dir=tmp_path / "cache")
    assert "int4.cu for sm_90" in str(info.value)


@pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc")
def test_ci_check_fails_on_a_warning(tmp_path):
    (tmp_path / "warn.cu").write_text(
        "// unused variable -> warning -> failure\n"
        "extern \"C\" __global__ void k(float* x) { int unused = 3; x[0] = 1.0f; }\n"
    )
    script = Path(__file__).resolve().parents[1] / ".ci" / "check-cuda"
    done = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode != 0, done.stdout


def _emulate_split(slab, offsets, fmts, n_valid, q_lh, l, h, blocks, L, H, D, BT, G, scale):
    """One split CTA of attention_decode.cu (``split_impl``) in float32 NumPy, reading the
    blocks from raw bytes with the kernel's own address arithmetic: the partial (max, sum,
    accumulator) of (layer l, head h) over ``blocks`` and each block's lse. It checks the
    algorithm and the indexing as written, not the CUDA compiler."""
    f32 = np.float32
    lanes, groups = D // 8, kernels.ATTN_THREADS // (D // 8)
    n = 2 * L * H * BT * D

    def load_vec(base, fmt, elem):  # 8 elements from flat index elem (multiple of 8)
        if fmt == 0:
            return np.frombuffer(slab, np.float16, 8, base + 2 * elem).astype(f32)
        word = int(np.frombuffer(slab, "<u4", 1, base + elem // 2)[0])
        g = elem // G
        sf = f32(np.frombuffer(slab, np.float16, 1, base + n // 2 + 2 * g)[0])
        zf = f32(np.frombuffer(slab, np.float16, 1, base + n // 2 + 2 * (n // G) + 2 * g)[0])
        codes = np.array([(word >> (4 * e)) & 0xF for e in range(8)], f32)
        return (zf + codes * sf).astype(np.float16).astype(f32)

    stride = 2 * L * H * D  # token-major blocks
    k_elem0 = (l * H + h) * D
    v_elem0 = k_elem0 + L * H * D
    acc = np.zeros((groups, D), f32)
    run_m, run_l = f32(-np.inf), f32(0)
    lse = {}
    for b in blocks:
        nv = min(max(int(n_valid[b]), 0), BT)
        if nv == 0:
            lse[b] = -np.inf
            continue
        base, fmt = offsets[b], fmts[b]
        s = np.zeros(BT, f32)
        for i in range(nv):
            k = np.concatenate([load_vec(base, fmt, k_elem0 + i * stride + 8 * j) for j in range(lanes)])
            s[i] = f32(np.dot(q_lh.astype(f32), k)) * f32(scale)
        m = s[:nv].max()
        new_m = max(run_m, m)
        c = np.exp(f32(m - new_m))
        e = np.exp(s[:nv] - m)
        total = e.sum(dtype=f32)
        w = e * c
        alpha = np.exp(f32(run_m - new_m))
        run_l, run_m = run_l * alpha + total * c, new_m
        lse[b] = m + np.log(total)
        acc *= alpha
        for g in range(groups):
            for i in range(g, nv, groups):
                v = np.concatenate([load_vec(base, fmt, v_elem0 + i * stride + 8 * j) for j in range(lanes)])
                acc[g] += w[i] * v
    return run_m, run_l, acc.sum(axis=0), lse


def _emulate_combine(part_m, part_l, part_acc, D):
    """``combine_impl``: the merge of one (l, h)'s partials."""
    big_m = np.max(part_m, initial=-np.inf)
    if big_m == -np.inf:
        return np.zeros(D, np.float32)
    live = part_m != -np.inf
    wts = np.exp(part_m[live] - big_m)
    return (part_acc[live] * wts[:, None]).sum(0) / (part_l[live] * wts).sum()


def _emulate_attention(slab, offsets, fmts, n_valid, q, L, H, D, BT, G, scale, plan):
    """attention_decode.cu's one-request split and combine kernels (``_emulate_split``)."""
    nb, S, bps = len(offsets), plan.num_splits, plan.blocks_per_split
    lse = np.full((L * H, nb), np.nan, np.float32)
    out = np.zeros((L * H, D), np.float32)
    for lh in range(L * H):
        parts = [_emulate_split(slab, offsets, fmts, n_valid, q[lh // H, lh % H], lh // H,
                                lh % H, range(split * bps, min(nb, (split + 1) * bps)),
                                L, H, D, BT, G, scale) for split in range(S)]
        for *_, blse in parts:
            for b, v in blse.items():
                lse[lh, b] = v
        out[lh] = _emulate_combine(np.array([p[0] for p in parts], np.float32),
                                   np.array([p[1] for p in parts], np.float32),
                                   np.array([p[2] for p in parts], np.float32).reshape(-1, D), D)
    return out.reshape(L, H, D), lse.reshape(L, H, nb)


def _emulate_segments(slab, offsets, fmts, n_valid, q, seg_starts, L, H, D, BT, G, scale,
                      bps, item_starts):
    """attention_decode.cu's segments kernels: the item -> segment search, each item's
    block range, the lse offsets and the per-segment combine, over a flat lse buffer."""
    S, items = len(seg_starts) - 1, int(item_starts[-1])
    lse = np.full(max(L * H * int(seg_starts[-1]), 1), np.nan, np.float32)
    part_m = np.full((L * H, items), np.nan, np.float32)
    part_l = np.full((L * H, items), np.nan, np.float32)
    part_acc = np.full((L * H, items, D), np.nan, np.float32)
    for lh in range(L * H):
        for item in range(items):
            lo, hi = 0, S  # segment_of: item_starts[lo] <= item < item_starts[hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if item_starts[mid] <= item else (lo, mid)
            s = lo
            seg0, seg1 = int(seg_starts[s]), int(seg_starts[s + 1])
            b0 = seg0 + (item - int(item_starts[s])) * bps
            m, l_, acc, blse = _emulate_split(slab, offsets, fmts, n_valid, q[s, lh // H, lh % H],
                                              lh // H, lh % H, range(b0, min(seg1, b0 + bps)),
                                              L, H, D, BT, G, scale)
            for b, v in blse.items():
                lse[L * H * seg0 + lh * (seg1 - seg0) + (b - seg0)] = v
            part_m[lh, item], part_l[lh, item], part_acc[lh, item] = m, l_, acc
    out = np.zeros((S, L * H, D), np.float32)
    for s in range(S):
        i0, i1 = int(item_starts[s]), int(item_starts[s + 1])
        for lh in range(L * H):
            out[s, lh] = _emulate_combine(part_m[lh, i0:i1], part_l[lh, i0:i1],
                                          part_acc[lh, i0:i1], D)
    return out.reshape(S, L, H, D), lse


def _slab_of(rng, layout, specs):
    """Random blocks (fmt, n_valid) packed into one byte string at 256-byte offsets."""
    entries, offsets, slab = [], [], bytearray()
    for fmt, nv in specs:
        buf = layout.pack(rng.standard_normal(layout.shape).astype(np.float16), fmt)
        entries.append((buf, fmt, nv))
        offsets.append(len(slab))
        slab += buf.tobytes() + bytes(-len(buf) % 256)
    return entries, offsets, bytes(slab)


@pytest.mark.parametrize("head_dim, group_size, ctas_per_sm", [(64, 32, 8), (128, 64, 1), (256, 128, 1)])
def test_emulated_kernel_algorithm_matches_the_reference(rng, head_dim, group_size, ctas_per_sm):
    L, H, BT = 2, 3, 8
    layout = KVLayout(L, H, head_dim, BT, group_size, "token")
    specs = [("fp16", 8), ("int4", 8), ("fp16", 3), ("int4", 0), ("int4", 1), ("fp16", 0), ("int4", 7)]
    entries, offsets, slab = _slab_of(rng, layout, specs)
    q = rng.standard_normal((L, H, head_dim)).astype(np.float32)
    # num_sms=1 with few CTAs per SM forces several blocks per split
    plan = kernels.attention_plan(L, H, head_dim, BT, len(specs), num_sms=1, ctas_per_sm=ctas_per_sm)
    out, lse = _emulate_attention(slab, offsets, [0 if f == "fp16" else 1 for f, _ in specs],
                                  [nv for _, nv in specs], q, L, H, head_dim, BT, group_size, 0.2, plan)
    ref_out, ref_lse = attention_decode_ref(q, entries, layout, 0.2)
    _check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("counts", [[0], [5], [3, 0, 7, 1], [0, 0], [12, 12, 1, 0, 30]])
@pytest.mark.parametrize("num_sms, ctas", [(1, 1), (132, 8)])
def test_segment_plan_cuts_each_segment_into_items_that_cover_its_blocks_once(counts, num_sms,
                                                                              ctas):
    seg = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bps, items = kernels.segment_plan(2, 3, seg, num_sms, ctas)
    assert items.dtype == np.int32 and len(items) == len(seg) and items[0] == 0
    for s, c in enumerate(counts):
        n = int(items[s + 1] - items[s])
        covered = [seg[s] + k * bps + j for k in range(n) for j in range(bps)
                   if k * bps + j < c]
        assert covered == list(range(seg[s], seg[s + 1]))
        assert n == -(-c // bps)  # no empty item; none at all for a segment without blocks


def test_segment_plan_aims_at_the_waves_of_one_request_s_plan():
    seg = np.array([0, 3000, 3000, 6000])
    bps, items = kernels.segment_plan(1, 2, seg, 132, 10)
    one = kernels.attention_plan(1, 2, 128, 16, 6000, 132, 10)
    assert bps == one.blocks_per_split
    assert 2 * int(items[-1]) >= 132 * 10  # enough CTAs to fill the chip


@pytest.mark.parametrize("seg", [[], [1, 2], [0, 3, 2]])
def test_segment_plan_refuses_bad_segment_tables(seg):
    with pytest.raises(ValueError, match="seg_starts"):
        kernels.segment_plan(1, 1, np.array(seg, np.int64), 132)


@pytest.mark.parametrize("head_dim, group_size", [(64, 32), (128, 64)])
def test_emulated_segments_kernel_gives_each_segment_its_reference(rng, head_dim, group_size):
    L, H, BT = 2, 2, 8
    layout = KVLayout(L, H, head_dim, BT, group_size, "token")
    requests = [[("fp16", 8), ("int4", 3), ("fp16", 8)], [], [("fp16", 0)],
                [("int4", 8), ("fp16", 1), ("fp16", 8), ("int4", 5), ("fp16", 2)], [("fp16", 4)]]
    specs = [b for r in requests for b in r]
    entries, offsets, slab = _slab_of(rng, layout, specs)
    seg = np.concatenate([[0], np.cumsum([len(r) for r in requests])]).astype(np.int64)
    q = rng.standard_normal((len(requests), L, H, head_dim)).astype(np.float32)
    # 2 waves of 10 CTAs over L*H = 4: 5 items' worth, so two blocks per item and
    # segments of several items
    bps, items = kernels.segment_plan(L, H, seg, num_sms=1, ctas_per_sm=10)
    assert bps == 2 and int(items[-1]) > len(requests)
    out, lse = _emulate_segments(slab, offsets, [0 if f == "fp16" else 1 for f, _ in specs],
                                 [nv for _, nv in specs], q, seg, L, H, head_dim, BT, group_size,
                                 0.2, bps, items)
    for s in range(len(requests)):
        lo, hi = int(seg[s]), int(seg[s + 1])
        ref_out, ref_lse = attention_decode_ref(q[s], entries[lo:hi], layout, 0.2)
        seg_lse = lse[L * H * lo:L * H * hi].reshape(L, H, hi - lo)
        if hi == lo:
            assert (out[s] == 0).all()
            continue
        _check_attention(out[s], seg_lse, ref_out, ref_lse)


# --------------------------------------------------------------------------- channel keys
#
# Transcriptions of int4.cu's channel-key kernels in NumPy, reading and writing raw bytes
# with the kernels' own address arithmetic (vector by vector, as a thread does): they
# check the layout and the indexing as written, not the CUDA compiler; the bit-exact
# GPU tests below check the compiled kernels.


def _halves(buf, off, count=8):
    return np.frombuffer(buf, np.float16, count, off).astype(np.float32)


def _decode_token_vec(row: bytes, n: int, i: int, G: int) -> np.ndarray:
    word = int(np.frombuffer(row, "<u4", 1, i // 2)[0])
    sf = _halves(row, n // 2 + 2 * (i // G), 1)[0]
    zf = _halves(row, n // 2 + 2 * (n // G) + 2 * (i // G), 1)[0]
    codes = np.array([(word >> (4 * e)) & 0xF for e in range(8)], np.float32)
    return (zf + codes * sf).astype(np.float16)


def _decode_channel_vec(row: bytes, n: int, c: int, i: int) -> np.ndarray:
    cc = i % c
    word = int(np.frombuffer(row, "<u4", 1, i // 2)[0])
    sf = _halves(row, n // 2 + 2 * cc)
    zf = _halves(row, n // 2 + 2 * c + 2 * cc)
    codes = np.array([(word >> (4 * e)) & 0xF for e in range(8)], np.float32)
    return (zf + codes * sf).astype(np.float16)


def _emulate_assemble(l1k, l1v, rows: bytes, cut, m, bt, tok, n_tok, G, key_channel):
    """assemble_impl, both grid rows (keys y=0, values y=1), vector by vector."""
    row_elems = bt * tok
    token_row = row_elems // 2 + 4 * (row_elems // G)
    key_row = row_elems // 2 + 4 * tok if key_channel else token_row
    stride = key_row + token_row
    lo, hi = cut * tok // 8, (cut + m * bt) * tok // 8
    outs = []
    for y, l1 in ((0, l1k.reshape(-1)), (1, l1v.reshape(-1))):
        channel = y == 0 and key_channel
        base = key_row if y == 1 else 0
        out = np.empty(n_tok * tok, np.float16)
        for v in range(n_tok * tok // 8):
            if v < lo:
                out[8 * v: 8 * v + 8] = l1[8 * v: 8 * v + 8]
            elif v >= hi:
                w = v - (hi - lo)
                out[8 * v: 8 * v + 8] = l1[8 * w: 8 * w + 8]
            else:
                e = (v - lo) * 8
                r, i = divmod(e, row_elems)
                row = rows[base + r * stride:]
                out[8 * v: 8 * v + 8] = _decode_channel_vec(row, row_elems, tok, i) if channel \
                    else _decode_token_vec(row, row_elems, i, G)
        outs.append(out.reshape(n_tok, tok))
    return outs


@pytest.mark.parametrize("key_channel", [True, False])
def test_emulated_read_through_equals_the_torch_path(key_channel):
    """kv_assemble_int4 over layer rows (key row then value row, per block) gives what
    TieredCache's torch read-through gives, bit for bit."""
    torch = pytest.importorskip("torch")
    from synapse.hf.int4 import dequantize_layer_rows, quantize_layer_rows
    keys = "channel" if key_channel else "token"
    g = torch.Generator().manual_seed(1)
    bt, heads, dim, G = 8, 2, 32, 32
    tok = heads * dim
    l1k = torch.randn((40, tok), generator=g).half()
    l1v = torch.randn((40, tok), generator=g).half()
    m, cut, n = 3, 16, 21
    k = torch.randn((m, bt, tok), generator=g).half()
    v = torch.randn((m, bt, tok), generator=g).half()
    rows = quantize_layer_rows(k, v, keys, G)
    dk, dv = dequantize_layer_rows(rows, bt, tok, keys, G, torch.float16)
    want_k = torch.cat((l1k[:cut], dk.view(m * bt, tok), l1k[cut:n]))
    want_v = torch.cat((l1v[:cut], dv.view(m * bt, tok), l1v[cut:n]))
    got_k, got_v = _emulate_assemble(l1k.numpy(), l1v.numpy(), rows.numpy().tobytes(), cut, m,
                                     bt, tok, n + m * bt, G, key_channel)
    assert np.array_equal(got_k, want_k.numpy()) and np.array_equal(got_v, want_v.numpy())


def _strided(v: int, c: int) -> int:
    """Strided{c / 8, 2c / 8}: vector v of a run of rows of c elements, 2c apart."""
    r, w = divmod(v, c // 8)
    return r * (2 * c // 8) + w


def _emulate_block_quantize(block: np.ndarray, bt: int, c: int, G: int) -> bytes:
    """block_quantize_kc: keys (y=0) a thread per 8 channels, two passes over the tokens;
    values (y=1) quantize_impl's groups of G/8 vectors read through Strided."""
    src = block.reshape(-1)
    n = bt * c
    out = np.zeros(n // 2 + 4 * c + n // 2 + 4 * n // G, np.uint8)
    packed = out[: n // 2].view("<u4")
    scales = out[n // 2: n // 2 + 2 * c].view(np.float16)
    zeros = out[n // 2 + 2 * c: n // 2 + 4 * c].view(np.float16)

    def codes(x, zf, sf):
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((x - zf) / sf), 0, 15)
        return np.where(sf == 0, 0, q).astype(np.uint32)

    def word(q):
        return int(sum(int(q[e]) << (4 * e) for e in range(8)))

    for j in range(c // 8):
        col = [src[t * 2 * c + 8 * j: t * 2 * c + 8 * j + 8].astype(np.float32) for t in range(bt)]
        lo = np.min(col, axis=0) + np.float32(0)
        hi = np.max(col, axis=0) + np.float32(0)
        sf = ((hi - lo) / np.float32(15)).astype(np.float16)
        zf = lo.astype(np.float16)
        scales[8 * j: 8 * j + 8], zeros[8 * j: 8 * j + 8] = sf, zf
        for t in range(bt):
            packed[t * c // 8 + j] = word(codes(col[t], zf.astype(np.float32), sf.astype(np.float32)))
    vbytes = out[n // 2 + 4 * c:]
    vpacked = vbytes[: n // 2].view("<u4")
    vscales = vbytes[n // 2: n // 2 + 2 * n // G].view(np.float16)
    vzeros = vbytes[n // 2 + 2 * n // G:].view(np.float16)
    vals = src[c:]  # the values' run starts c elements into the block
    for grp in range(n // G):
        vecs = [vals[8 * _strided(v, c): 8 * _strided(v, c) + 8].astype(np.float32)
                for v in range(grp * G // 8, (grp + 1) * G // 8)]
        x = np.concatenate(vecs)
        lo, hi = x.min() + np.float32(0), x.max() + np.float32(0)
        sf, zf = np.float16((hi - lo) / np.float32(15)), np.float16(lo)
        vscales[grp], vzeros[grp] = sf, zf
        for u, vec in enumerate(vecs):
            vpacked[grp * G // 8 + u] = word(codes(vec, np.float32(zf), np.float32(sf)))
    return out.tobytes()


def _emulate_block_dequantize(buf: bytes, bt: int, c: int, G: int) -> np.ndarray:
    n = bt * c
    out = np.full(2 * n, np.nan, np.float16)
    for v in range(n // 8):  # keys: decode_channel_vec into Strided rows
        a = 8 * _strided(v, c)
        out[a: a + 8] = _decode_channel_vec(buf, n, c, 8 * v)
    vrow = buf[n // 2 + 4 * c:]
    for v in range(n // 8):  # values: dequantize_impl, written through Strided, c elements in
        a = c + 8 * _strided(v, c)
        out[a: a + 8] = _decode_token_vec(vrow, n, 8 * v, G)
    return out


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_emulated_channel_block_kernels_equal_the_layout(rng, group_size):
    lay = KVLayout(layers=2, kv_heads=1, head_dim=128, block_tokens=8, group_size=group_size,
                   int4_keys="channel")
    kv = (rng.standard_normal(lay.shape) * 10.0 ** rng.uniform(-2, 2, (1, 1, 2, 1, 128)))
    kv = kv.astype(np.float16)
    kv[:, 0, 1, 0, 8:16] = 0.75  # flat key channels: scale 0
    want = lay.pack(kv, "int4")
    got = _emulate_block_quantize(kv, 8, lay.channels, group_size)
    assert got == want.tobytes()
    back = _emulate_block_dequantize(got, 8, lay.channels, group_size)
    assert np.array_equal(back, lay.unpack(want, "int4").reshape(-1))


@pytest.mark.parametrize("bt, c", [(4, 256), (16, 4096), (64, 32768)])
def test_kv_block_grid_covers_every_key_vector_and_value_tile(bt, c):
    for num_sms, per_sm in [(132, 6), (1, 1)]:
        grid = kernels.kv_block_grid(bt, c, kernels.QUANT_VECS_PER_THREAD, num_sms, per_sm)
        assert 1 <= grid <= num_sms * per_sm
        threads = grid * kernels.INT4_THREADS
        keys = np.zeros(c // 8, np.int64)
        for t in range(threads):
            keys[t::threads] += 1
        assert (keys == 1).all()
        hits = _covered_vectors(bt * c // 8, grid, kernels.INT4_THREADS, kernels.QUANT_VECS_PER_THREAD)
        assert (hits == 1).all()


def test_channel_block_wrappers_check_arguments_before_touching_the_device():
    with pytest.raises(ValueError, match="block_tokens % 4"):
        kernels.quantize_kv_block_int4(4096, 8192, 6, 256, 64)
    with pytest.raises(ValueError, match="channels % group_size"):
        kernels.dequantize_kv_block_int4(4096, 8192, 16, 96, 64)
    with pytest.raises(ValueError, match="src_ptr"):
        kernels.quantize_kv_block_int4(8, 8192, 16, 256, 64)
    with pytest.raises(ValueError, match="bt 6 of 4"):
        kernels.kv_assemble_int4(4096, 4096, 4096, 4096, 4096, 0, 1, 6, 64, 6, 64)


# =========================================================================== GPU


@pytest.fixture(scope="module")
def gpu():
    """PyCUDA's driver module with device 0's primary context pushed (popped at teardown)."""
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError) as exc:
        pytest.skip(f"{NEEDS_GPU}: PyCUDA not importable ({exc})")
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip(f"{NEEDS_GPU}: no device")
        ctx = cuda.Device(0).retain_primary_context()
    except Exception as exc:  # no driver, a stub libcuda, no device: all mean "no GPU here"
        pytest.skip(f"{NEEDS_GPU}: {exc}")
    ctx.push()
    try:
        yield cuda
    finally:
        try:
            cuda.Context.synchronize()
            kernels.forget_context()
        finally:
            ctx.pop()  # a context left pushed at exit aborts the interpreter


def _skip_unless_supported(cuda, *variants):
    """The staged and bulk INT4 kernels use TMA bulk copies: sm_90 and newer only."""
    if (any(v in kernels.INT4_TMA_VARIANTS for v in variants)
            and cuda.Context.get_device().compute_capability() < (9, 0)):
        pytest.skip("the staged and bulk INT4 kernels need sm_90 (TMA)")


def _upload(cuda, host: np.ndarray):
    host = np.ascontiguousarray(host)
    dev = cuda.mem_alloc(max(host.nbytes, 16))
    cuda.memcpy_htod(dev, host)
    return dev


def _poisoned(cuda, nbytes: int, byte: int):
    dev = cuda.mem_alloc(nbytes + GUARD_BYTES)
    cuda.memset_d8(dev, byte, nbytes + GUARD_BYTES)
    return dev


def _download(cuda, dev, nbytes: int) -> np.ndarray:
    cuda.Context.synchronize()
    host = np.empty(nbytes + GUARD_BYTES, dtype=np.uint8)
    cuda.memcpy_dtoh(host, dev)
    return host


def _assert_written(host: np.ndarray, expected: bytes, poison: int, what: str):
    body, guard = host[: len(expected)], host[len(expected):]
    if body.tobytes() != expected:
        ref = np.frombuffer(expected, dtype=np.uint8)
        bad = np.flatnonzero(body != ref)
        raise AssertionError(
            f"{what}: {bad.size} bytes differ, first at byte {bad[0]}: got {body[bad[0]]:#04x}, "
            f"expected {ref[bad[0]]:#04x}"
        )
    assert (guard == poison).all(), f"{what}: wrote past the end"


INT4_SIZES = ["one group", "tail", "few tiles", "grid-stride"]


def _int4_n(size: str, group_size: int) -> int:
    return {
        "one group": group_size,
        "tail": group_size * 37,
        "few tiles": 8 * 256 * 2 * 3 + group_size * 5,
        "grid-stride": (1 << 23) + group_size * 3,
    }[size]


@pytest.mark.cuda
@pytest.mark.parametrize("variant", kernels.INT4_QUANT_VARIANTS)
@pytest.mark.parametrize("size", INT4_SIZES)
@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_quantize_is_bit_exact(gpu, rng, group_size, size, variant):
    _skip_unless_supported(gpu, variant)
    n = _int4_n(size, group_size)
    x = int4.edge_case_input(rng, n, group_size)
    expected = np.zeros(int4.int4_nbytes(n, group_size), dtype=np.uint8)
    int4.pack_into(x, group_size, expected)
    src = _upload(gpu, x)
    for poison in POISONS:
        dst = _poisoned(gpu, expected.size, poison)
        kernels.quantize_int4(src, dst, n, group_size, variant=variant)
        _assert_written(_download(gpu, dst, expected.size), expected.tobytes(), poison,
                        f"quantize ({variant})")


@pytest.mark.cuda
@pytest.mark.parametrize("quant, dequant", [("lean", "stream"), ("lean4", "warp"), ("staged", "staged"),
                                            ("staged", "bulk"), ("lean", "bulk4k")])
def test_variants_agree_over_many_tiles_per_block(gpu, rng, quant, dequant):
    """2^25 elements: about 5 staged tiles per CTA on an H200-sized grid, so both stage
    buffers are reused and the mbarrier phases flip several times; each variant pair gives
    the committed kernels' bytes in both directions."""
    _skip_unless_supported(gpu, quant, dequant)
    n, g = 1 << 25, 64
    x = (rng.standard_normal(n, dtype=np.float32) * 3).astype(np.float16)
    src = _upload(gpu, x)
    nbytes = int4.int4_nbytes(n, g)
    outs = {}
    for name, qv, dv in (("warp", "warp", "warp"), ("variant", quant, dequant)):
        q = _poisoned(gpu, nbytes, 0x5A)
        y = _poisoned(gpu, 2 * n, 0x5A)
        kernels.quantize_int4(src, q, n, g, variant=qv)
        kernels.dequantize_int4(q, y, n, g, variant=dv)
        outs[name] = (_download(gpu, q, nbytes), _download(gpu, y, 2 * n))
    assert (outs["variant"][0][nbytes:] == 0x5A).all(), f"quantize {quant}: wrote past the end"
    assert (outs["variant"][1][2 * n:] == 0x5A).all(), f"dequantize {dequant}: wrote past the end"
    assert (outs["variant"][0] == outs["warp"][0]).all(), f"quantize {quant}"
    assert (outs["variant"][1] == outs["warp"][1]).all(), f"dequantize {dequant}"
    want = np.zeros(nbytes, np.uint8)
    int4.pack_into(x, g, want)
    assert (outs["warp"][0][:nbytes] == want).all(), "quantize (warp) against NumPy"
    decoded = int4.unpack_from(want, n, g, np.float16).view(np.uint8)
    assert (outs["warp"][1][: 2 * n] == decoded).all(), "dequantize (warp) against NumPy"


@pytest.mark.cuda
@pytest.mark.parametrize("variant", kernels.INT4_DEQUANT_VARIANTS)
@pytest.mark.parametrize("size", INT4_SIZES)
@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_dequantize_is_bit_exact(gpu, rng, group_size, size, variant):
    _skip_unless_supported(gpu, variant)
    n = _int4_n(size, group_size)
    buf = int4.edge_case_buffer(rng, n, group_size)
    expected = int4.unpack_from(buf, n, group_size, np.float16)
    src = _upload(gpu, buf)
    for poison in POISONS:
        dst = _poisoned(gpu, 2 * n, poison)
        kernels.dequantize_int4(src, dst, n, group_size, variant=variant)
        _assert_written(_download(gpu, dst, 2 * n), expected.tobytes(), poison,
                        f"dequantize ({variant})")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", sorted(kernels.INT4_TMA_VARIANTS & set(kernels.INT4_DEQUANT_VARIANTS)))
@pytest.mark.parametrize("extra_groups", [5, 6])
def test_tma_dequantize_over_many_phases_and_both_zero_alignments(gpu, rng, variant, extra_groups):
    """2^26 + a few groups at G = 32: a partial last tile, 8 or more tiles per CTA on an
    H200-sized grid (every input stage refilled, the mbarrier phases flip), and n / G odd
    (zeros start 2 bytes into a word) or even; bytes equal the warp kernel's, nothing
    written past the end."""
    _skip_unless_supported(gpu, variant)
    g = 32
    n = (1 << 26) + extra_groups * g
    x = (rng.standard_normal(n, dtype=np.float32) * 3).astype(np.float16)
    src = _upload(gpu, x)
    q = _poisoned(gpu, int4.int4_nbytes(n, g), 0x5A)
    kernels.quantize_int4(src, q, n, g, variant="warp")
    outs = {}
    for name in ("warp", variant):
        y = _poisoned(gpu, 2 * n, 0xA5)
        kernels.dequantize_int4(q, y, n, g, variant=name)
        outs[name] = _download(gpu, y, 2 * n)
    assert (outs[variant][2 * n:] == 0xA5).all(), f"dequantize {variant}: wrote past the end"
    assert (outs[variant] == outs["warp"]).all(), f"dequantize {variant}"


@pytest.mark.cuda
@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_round_trip_on_a_stream_into_the_middle_of_a_slab(gpu, rng, group_size):
    """Quantize straight into a slab at an offset, dequantize back; neighbours untouched."""
    n = group_size * 4096
    x = int4.edge_case_input(rng, n, group_size)
    nbytes = int4.int4_nbytes(n, group_size)
    offset = 4096
    slab = _poisoned(gpu, offset + nbytes, 0x3C)
    out = _poisoned(gpu, 2 * n, 0xFF)
    stream = gpu.Stream()
    kernels.quantize_int4(_upload(gpu, x), int(slab) + offset, n, group_size, stream)
    kernels.dequantize_int4(int(slab) + offset, out, n, group_size, stream)
    stream.synchronize()
    host = _download(gpu, slab, offset + nbytes)
    assert (host[:offset] == 0x3C).all() and (host[offset + nbytes:] == 0x3C).all()
    expected = int4.dequantize(int4.quantize(x, group_size))
    _assert_written(_download(gpu, out, 2 * n), expected.tobytes(), 0xFF, "round trip")


@pytest.mark.cuda
@pytest.mark.parametrize("variant", kernels.KV_QUANT_VARIANTS)
@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("bt, layers, heads, head_dim", [(4, 1, 1, 128), (16, 2, 3, 128),
                                                         (64, 4, 8, 128), (16, 32, 8, 128)])
def test_channel_block_quantize_and_dequantize_are_bit_exact(gpu, rng, group_size, bt, layers,
                                                              heads, head_dim, variant):
    """A scenario block in the channel-key format (kv_layout), both directions, against
    pack_int4_block / unpack_int4_block: the awkward groups of _int4_input in the values,
    and per-channel magnitudes from 1e-3 to 1e3 plus flat and signed-zero channels in
    the keys."""
    lay = KVLayout(layers, heads, head_dim, bt, group_size, "channel")
    c = lay.channels
    kv = np.empty((bt, 2, c), np.float16)
    kv[:, 1] = int4.edge_case_input(rng, bt * c, group_size).reshape(bt, c)
    keys = rng.standard_normal((bt, c)) * 10.0 ** rng.uniform(-3, 3, (1, c))
    keys[:, 3] = 2.5
    keys[:, 9] = np.where(rng.random(bt) < 0.5, -0.0, 0.0)
    keys[:, 17] = [(t % 15) + 0.5 for t in range(bt)]
    keys[:, 24] = ([0.0, 15.0] + [(t % 15) + 0.5 for t in range(bt)])[:bt]  # exact ties, and
    keys[:, 25] = np.where(np.arange(bt) % 2, 2.0**-24, 0.0)  # a zero scale in the same word
    kv[:, 0] = keys.astype(np.float16)
    expected = lay.pack(kv.reshape(lay.shape), "int4")
    decoded = lay.unpack(expected, "int4").view(np.uint8)
    quantize = functools.partial(kernels.quantize_kv_block_int4, variant=variant)
    quantize.__name__ = f"quantize_kv_block_int4 ({variant})"
    for kernel, src, want in ((quantize, kv, expected),
                              (kernels.dequantize_kv_block_int4, expected, decoded)):
        dev = _upload(gpu, src)
        for poison in POISONS:
            dst = _poisoned(gpu, want.size, poison)
            kernel(dev, dst, bt, c, group_size)
            _assert_written(_download(gpu, dst, want.size), want.tobytes(), poison,
                            kernel.__name__)


# --------------------------------------------------------------------------- attention


def _kv_slab(cuda, rng, layout: KVLayout, specs, amplitude=1.0):
    """Blocks (fmt, n_valid) in one device slab at 256-byte aligned offsets.

    Returns (host entries for attention_ref, device slab, DeviceBlockTable).
    """
    entries, offsets, total = [], [], 0
    for fmt, nv in specs:
        kv = (amplitude * rng.standard_normal(layout.shape)).astype(np.float16)
        buf = layout.pack(kv, fmt)
        entries.append((buf, fmt, nv))
        offsets.append(total)
        total += -(-buf.size // 256) * 256
    host = np.zeros(max(total, 256), dtype=np.uint8)
    for (buf, _, _), off in zip(entries, offsets):
        host[off: off + buf.size] = buf
    slab = _upload(cuda, host)
    table = kernels.upload_block_table(
        [int(slab) + off for off in offsets], [f for f, _ in specs], [nv for _, nv in specs],
        layout.block_tokens,
    )
    return entries, slab, table


def _run_attention(cuda, q, table, layout, scale, poison):
    L, H, D = q.shape
    nb = table.num_blocks
    q_dev = _upload(cuda, q.astype(np.float32))
    out = _poisoned(cuda, 4 * L * H * D, poison)
    lse = _poisoned(cuda, max(4 * L * H * nb, 4), poison)
    plan = kernels.attention_decode(q_dev, table, L, H, D, layout.block_tokens, layout.group_size,
                                    scale, out, lse)
    out_h = _download(cuda, out, 4 * L * H * D)
    lse_h = _download(cuda, lse, 4 * L * H * nb)
    assert (out_h[4 * L * H * D:] == poison).all(), "out: wrote past the end"
    assert (lse_h[4 * L * H * nb:] == poison).all(), "lse: wrote past the end"
    return (out_h[: 4 * L * H * D].view(np.float32).reshape(L, H, D),
            lse_h[: 4 * L * H * nb].view(np.float32).reshape(L, H, nb), plan)


# Tolerance: for fp16 blocks the kernel and the reference read the very same fp16 values,
# and for int4 blocks the kernel dequantizes to the same fp16 values bit for bit (checked
# above), so the only differences are fp32 (kernel) versus fp64 (reference) accumulation
# over D products and a few hundred tokens, and expf/logf's few-ulp errors: ~1e-6 relative.
# 1e-4 leaves two orders of magnitude of margin while still catching any indexing or
# softmax-merge bug (those give errors of order 1).
OUT_RTOL = 1e-4
LSE_ATOL = 5e-5


def _check_attention(out, lse, ref_out, ref_lse):
    assert np.isfinite(out).all(), "out has NaN/inf (poison left?)"
    denom = max(np.linalg.norm(ref_out), 1e-30)
    rel = np.linalg.norm(out.astype(np.float64) - ref_out) / denom
    assert rel < OUT_RTOL, f"relative L2 error of out {rel:.2e}"
    assert not np.isnan(lse).any(), "lse has NaN (poison left?)"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=LSE_ATOL)


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim, group_size", ATTN_SHAPES)
def test_attention_mixed_table_matches_reference(gpu, rng, head_dim, group_size):
    layout = KVLayout(layers=2, kv_heads=3, head_dim=head_dim, block_tokens=16, group_size=group_size,
                      int4_keys="token")  # the attention kernel reads this format
    specs = [("fp16", 16), ("int4", 16), ("fp16", 5), ("int4", 0),
             ("int4", 1), ("fp16", 0), ("int4", 11), ("fp16", 16)]
    entries, _slab, table = _kv_slab(gpu, rng, layout, specs)
    q = (2.0 * rng.standard_normal((2, 3, head_dim))).astype(np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    ref_out, ref_lse = attention_decode_ref(q, entries, layout, scale)
    for poison in (0xFF, 0x00):  # NaN, then zeros
        out, lse, _ = _run_attention(gpu, q, table, layout, scale, poison)
        _check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.cuda
def test_attention_many_blocks_several_per_split(gpu, rng):
    layout = KVLayout(layers=1, kv_heads=2, head_dim=128, block_tokens=16, group_size=64,
                      int4_keys="token")  # the attention kernel reads this format
    nb = 3000
    fmts = rng.choice(["fp16", "int4"], nb)
    n_valid = rng.integers(0, 17, nb)
    entries, _slab, table = _kv_slab(gpu, rng, layout, list(zip(fmts, n_valid.tolist())))
    q = rng.standard_normal((1, 2, 128)).astype(np.float32)
    ref_out, ref_lse = attention_decode_ref(q, entries, layout, 0.1)
    out, lse, plan = _run_attention(gpu, q, table, layout, 0.1, 0xFF)
    assert plan.blocks_per_split > 1, plan  # the multi-block path of a split is exercised
    _check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.cuda
def test_attention_long_blocks(gpu, rng):
    """block_tokens 256: several score rounds per block, warp 0 loops over >32 scores."""
    layout = KVLayout(layers=1, kv_heads=1, head_dim=64, block_tokens=256, group_size=64,
                      int4_keys="token")  # the attention kernel reads this format
    entries, _slab, table = _kv_slab(gpu, rng, layout, [("int4", 256), ("fp16", 100), ("int4", 33)])
    q = rng.standard_normal((1, 1, 64)).astype(np.float32)
    ref_out, ref_lse = attention_decode_ref(q, entries, layout, 0.125)
    out, lse, _ = _run_attention(gpu, q, table, layout, 0.125, 0xFF)
    _check_attention(out, lse, ref_out, ref_lse)


@pytest.mark.cuda
@pytest.mark.parametrize("specs", [[("fp16", 0), ("int4", 0)], []], ids=["all-empty", "no-blocks"])
def test_attention_without_valid_tokens_writes_zeros_and_minus_inf(gpu, rng, specs):
    layout = KVLayout(layers=2, kv_heads=2, head_dim=64, block_tokens=16, group_size=32,
                      int4_keys="token")  # the attention kernel reads this format
    _entries, _slab, table = _kv_slab(gpu, rng, layout, specs)
    q = rng.standard_normal((2, 2, 64)).astype(np.float32)
    out, lse, _ = _run_attention(gpu, q, table, layout, 0.125, 0xFF)
    assert (out == 0).all()
    assert np.isneginf(lse).all() and lse.shape == (2, 2, len(specs))


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim, group_size", [(128, 32), (64, 64)])
def test_attention_int4_block_equals_its_fp16_decoding(gpu, rng, head_dim, group_size):
    """The kernel dequantizes exactly as int4.py: an int4 block and the fp16 block holding
    its decoding give the same result (same values, same arithmetic order)."""
    layout = KVLayout(layers=2, kv_heads=2, head_dim=head_dim, block_tokens=16, group_size=group_size,
                      int4_keys="token")  # the attention kernel reads this format
    entries, _s1, table4 = _kv_slab(gpu, rng, layout, [("int4", 16), ("int4", 9)])
    decoded = [(layout.pack(layout.unpack(buf, "int4"), "fp16"), "fp16", nv) for buf, _, nv in entries]
    host = np.zeros(2 * -(-layout.fp16_bytes // 256) * 256, dtype=np.uint8)
    stride = -(-layout.fp16_bytes // 256) * 256
    for i, (buf, _, _) in enumerate(decoded):
        host[i * stride: i * stride + buf.size] = buf
    slab16 = _upload(gpu, host)
    table16 = kernels.upload_block_table([int(slab16), int(slab16) + stride], ["fp16"] * 2, [16, 9], 16)
    q = rng.standard_normal((2, 2, head_dim)).astype(np.float32)
    out4, lse4, _ = _run_attention(gpu, q, table4, layout, 0.2, 0xFF)
    out16, lse16, _ = _run_attention(gpu, q, table16, layout, 0.2, 0xFF)
    np.testing.assert_allclose(out4, out16, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lse4, lse16, rtol=1e-6, atol=1e-7)


def _run_segments(cuda, q, table, seg, layout, scale, poison):
    S, L, H, D = q.shape
    nb = table.num_blocks
    q_dev = _upload(cuda, q.astype(np.float32))
    out = _poisoned(cuda, 4 * S * L * H * D, poison)
    lse = _poisoned(cuda, max(4 * L * H * nb, 4), poison)
    bps, items = kernels.attention_decode_segments(q_dev, table, seg, L, H, D, layout.block_tokens,
                                                   layout.group_size, scale, out, lse)
    out_h = _download(cuda, out, 4 * S * L * H * D)
    lse_h = _download(cuda, lse, 4 * L * H * nb)
    assert (out_h[4 * S * L * H * D:] == poison).all(), "out: wrote past the end"
    assert (lse_h[4 * L * H * nb:] == poison).all(), "lse: wrote past the end"
    return (out_h[: 4 * S * L * H * D].view(np.float32).reshape(S, L, H, D),
            lse_h[: 4 * L * H * nb].view(np.float32), bps, items)


def _segments_case(gpu, rng, layout, counts):
    fmts = rng.choice(["fp16", "int4"], sum(counts))
    n_valid = rng.integers(0, layout.block_tokens + 1, sum(counts))
    specs = list(zip(fmts, n_valid.tolist()))
    entries, _slab, table = _kv_slab(gpu, rng, layout, specs)
    seg = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return entries, _slab, table, seg


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim, group_size", ATTN_SHAPES)
def test_attention_segments_equal_one_launch_per_request(gpu, rng, head_dim, group_size):
    """One launch over several requests' blocks gives each request the out and lse that a
    launch over its own blocks gives (and the reference's)."""
    layout = KVLayout(layers=2, kv_heads=3, head_dim=head_dim, block_tokens=16,
                      group_size=group_size, int4_keys="token")
    counts = [1, 8, 0, 3, 17, 2]
    entries, _slab, table, seg = _segments_case(gpu, rng, layout, counts)
    q = (2.0 * rng.standard_normal((len(counts), 2, 3, head_dim))).astype(np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    for poison in (0xFF, 0x00):  # NaN, then zeros
        out, lse, _, _ = _run_segments(gpu, q, table, seg, layout, scale, poison)
        for s in range(len(counts)):
            lo, hi = int(seg[s]), int(seg[s + 1])
            seg_lse = lse[6 * lo:6 * hi].reshape(2, 3, hi - lo)
            ref_out, ref_lse = attention_decode_ref(q[s], entries[lo:hi], layout, scale)
            if hi == lo:
                assert (out[s] == 0).all()
                continue
            _check_attention(out[s], seg_lse, ref_out, ref_lse)
            sub = kernels.upload_block_table(
                _table_ptrs(gpu, table, lo, hi), [f for _, f, _ in entries[lo:hi]],
                [nv for _, _, nv in entries[lo:hi]], 16)
            one_out, one_lse, _ = _run_attention(gpu, q[s], sub, layout, scale, poison)
            np.testing.assert_allclose(out[s], one_out, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(np.isneginf(seg_lse), np.isneginf(one_lse))
            fin = np.isfinite(one_lse)
            np.testing.assert_allclose(seg_lse[fin], one_lse[fin], rtol=1e-6, atol=1e-6)


def _table_ptrs(cuda, table, lo, hi):
    """Block addresses lo:hi of a device block table, read back."""
    host = np.zeros(max(table.num_blocks, 1), np.uint64)
    cuda.memcpy_dtoh(host, table.ptrs)
    return host[lo:hi].tolist()


@pytest.mark.cuda
def test_attention_segments_many_requests_several_items_each(gpu, rng):
    layout = KVLayout(layers=1, kv_heads=2, head_dim=128, block_tokens=16, group_size=64,
                      int4_keys="token")
    counts = rng.integers(0, 200, 40).tolist()
    counts[7] = 0
    entries, _slab, table, seg = _segments_case(gpu, rng, layout, counts)
    q = rng.standard_normal((len(counts), 1, 2, 128)).astype(np.float32)
    out, lse, bps, items = _run_segments(gpu, q, table, seg, layout, 0.1, 0xFF)
    assert bps > 1 and (np.diff(items) > 1).any(), (bps, items)  # multi-block items
    for s in range(len(counts)):
        lo, hi = int(seg[s]), int(seg[s + 1])
        if hi == lo:
            assert (out[s] == 0).all()
            continue
        ref_out, ref_lse = attention_decode_ref(q[s], entries[lo:hi], layout, 0.1)
        _check_attention(out[s], lse[2 * lo:2 * hi].reshape(1, 2, hi - lo), ref_out, ref_lse)


@pytest.mark.cuda
def test_block_table_is_validated_on_the_host(gpu):
    with pytest.raises(ValueError, match="n_valid"):
        kernels.upload_block_table([4096], ["fp16"], [17], block_tokens=16)
    with pytest.raises(ValueError, match="aligned"):
        kernels.upload_block_table([4100], ["int4"], [1], block_tokens=16)
    with pytest.raises(ValueError, match="KV format"):
        kernels.upload_block_table([4096], ["bf16"], [1], block_tokens=16)
