"""kv_quantize_layer_rows_int4 (cuda/int4.cu), transcribed to NumPy on the CPU, thread by
thread of its grid-stride loops: the transformers cache's demotion of every layer's blocks
in one launch must write every byte of the layer rows exactly once, each equal to
``synapse.hf.int4.quantize_layer_rows`` and ``synapse.hw.int4``, read its input only where
the rows are (the gathered ``[L, 2, k, n]`` tensor of torch_backend as it is, or plain
rows), with every load and store aligned, and sum the squared error that the torch ops
sum. The arithmetic is lean's (tests/test_int4_variants.py proves it gives the spec's codes;
reused here); what this file adds is the indexing. NumPy's float32 rounds like the kernel's
__f*_rn, so a failure on the GPU (test_kernels_cuda.py, marked cuda) and not here points
at the compiler or at what NumPy cannot show (the warp shuffles' masks, races).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synapse.hf.int4 import dequantize_layer_rows, key_row_bytes, quantize_layer_rows
from synapse.hw import int4, kernels
from test_int4_variants import group_code, lean_words

THREADS = kernels.INT4_THREADS
U = kernels.QUANT_VECS_PER_THREAD  # kQuantUnroll: vectors per thread per tile


class Rows:
    """The kernel's view of one launch: input elements, output bytes with a write count per
    byte, and RowRuns (row r's first element)."""

    def __init__(self, k, v, rows, bt, c, g, channel, run_rows, run_stride):
        self.k, self.v = k, v  # flat fp16 arrays the two pointers address
        self.rows, self.bt, self.c, self.g, self.channel = rows, bt, c, g, channel
        self.n = bt * c
        self.token_row = self.n // 2 + 4 * (self.n // g)
        self.key_row = self.n // 2 + 4 * c if channel else self.token_row
        self.row_bytes = self.key_row + self.token_row
        self.run_rows, self.run_stride = run_rows, run_stride
        self.out = np.zeros(rows * self.row_bytes, np.uint8)
        self.hits = np.zeros(rows * self.row_bytes, np.int64)
        self.sums = [0.0, 0.0]

    def at(self, r):
        run = r // self.run_rows
        return run * self.run_stride + (r - run * self.run_rows) * self.n

    def load(self, src, elem):
        """uint4 loads at element offsets ``elem`` [m]: [m, 8] fp16 (16-byte aligned, in range)."""
        assert (elem % 8 == 0).all() and (elem >= 0).all() and (elem + 8 <= src.size).all()
        return src[elem[:, None] + np.arange(8)]

    def store(self, byte_offset, data: np.ndarray, align: int):
        """Stores of ``data`` [m, w] (bytes) at ``byte_offset`` [m], ``align``-byte aligned."""
        assert (byte_offset % align == 0).all() and data.shape[1] == align
        assert (byte_offset >= 0).all() and (byte_offset + align <= self.out.size).all()
        idx = byte_offset[:, None] + np.arange(align)
        self.out[idx] = data
        np.add.at(self.hits, idx.reshape(-1), 1)

    def add_sums(self, x16, words, zf, sf):
        """SquareSums per piece (rows of x16 [m, 8]: one vector each, summed per row), fp32."""
        x = x16.astype(np.float32)
        codes = (words[:, None] >> (np.arange(8, dtype=np.uint32) * np.uint32(4))) & np.uint32(15)
        xhat = np.asarray(zf, np.float32) + codes.astype(np.float32) * np.asarray(sf, np.float32)
        d = xhat - x
        self.sums[0] += float((d * d).astype(np.float64).sum())
        self.sums[1] += float((x * x).astype(np.float64).sum())


def token_part(rows: Rows, src, part: int, grid: int):
    """layer_rows_tokens over `grid` CTAs: tiles of U * THREADS vectors, loads first, then
    LeanCodes (butterfly over a group's lanes of the warp), then the stores of active lanes."""
    n, g = rows.n, rows.g
    lanes = g // 8
    row_vecs = n // 8
    num_vec = rows.rows * row_vecs
    tile = U * THREADS
    tid = np.arange(THREADS)
    for cta in range(grid):
        for base in range(tile * cta, num_vec, tile * grid):
            for u in range(U):
                v = base + u * THREADS + tid
                active = v < num_vec
                row = np.where(active, v // row_vecs, 0)
                idx = np.where(active, v - row * row_vecs, 0)
                raw = np.zeros((THREADS, 8), np.float16)
                raw[active] = rows.load(src, (rows.at(row) + idx * 8)[active])
                h = raw.reshape(-1, 4, 2)
                mn = np.minimum(np.minimum(h[:, 0], h[:, 1]), np.minimum(h[:, 2], h[:, 3]))
                mx = np.maximum(np.maximum(h[:, 0], h[:, 1]), np.maximum(h[:, 2], h[:, 3]))
                pair = np.minimum(np.stack([mn[:, 0], -mx[:, 0]], 1), np.stack([mn[:, 1], -mx[:, 1]], 1))
                off = 1
                while off < lanes:  # __shfl_xor_sync: lane ^ off, the same warp
                    assert ((tid ^ off) // 32 == tid // 32).all()
                    pair = np.minimum(pair, pair[tid ^ off])
                    off <<= 1
                # a group is all active or all inactive: no lane of it took a zero vector
                grp = active.reshape(-1, lanes)
                assert (grp.all(axis=1) | ~grp.any(axis=1)).all()
                scale, zero, zf, sf, inv = group_code(pair[:, 0], pair[:, 1])
                words = lean_words(raw, zf, sf, inv)
                out = row * rows.row_bytes + part
                a = active
                rows.store((out + 4 * idx)[a], words[a].astype("<u4").view(np.uint8).reshape(-1, 4), 4)
                first = a & (tid % 32 % lanes == 0)
                gi = idx // lanes
                rows.store((out + n // 2 + 2 * gi)[first], scale[first].view(np.uint8).reshape(-1, 2), 2)
                rows.store((out + n // 2 + 2 * (n // g) + 2 * gi)[first],
                           zero[first].view(np.uint8).reshape(-1, 2), 2)
                rows.add_sums(raw[a], words[a], zf[a, None], sf[a, None])


def channel_part(rows: Rows, grid: int):
    """The per-channel key rows: thread u of the grid-stride loop owns channels 8j..8j+7 of
    row r (u = r * c/8 + j): LeanChannels' range over the tokens, the 16-byte scale and
    zero stores, then one code word per token."""
    bt, c, n = rows.bt, rows.c, rows.n
    cv = c // 8
    total = rows.rows * cv
    for cta in range(grid):
        first = cta * THREADS + np.arange(THREADS)
        for start in range(0, total, grid * THREADS):
            u = first + start
            u = u[u < total]
            if not u.size:  # this CTA's threads are past the last unit
                continue
            r = u // cv
            j = u - r * cv
            col = rows.at(r) + 8 * j
            x = np.stack([rows.load(rows.k, col + t * c) for t in range(bt)], 1)  # [m, bt, 8]
            scale, zero, zf, sf, inv = group_code(x.min(axis=1), -x.max(axis=1))
            out = r * rows.row_bytes
            rows.store(out + n // 2 + 16 * j, scale.view(np.uint8).reshape(-1, 16), 16)
            rows.store(out + n // 2 + 2 * c + 16 * j, zero.view(np.uint8).reshape(-1, 16), 16)
            for t in range(bt):
                words = lean_words(x[:, t], zf, sf, inv)
                rows.store(out + 4 * ((t * c) // 8 + j), words.astype("<u4").view(np.uint8).reshape(-1, 4), 4)
                rows.add_sums(x[:, t], words, zf, sf)


def run_kernel(rows: Rows, grid: int):
    """The launch: gridDim.y == 2, y = 0 the keys, y = 1 the values."""
    if rows.channel:
        channel_part(rows, grid)
    else:
        token_part(rows, rows.k, 0, grid)
    token_part(rows, rows.v, rows.key_row, grid)
    return rows


def gathered(rng, layers, blocks, bt, c, g):
    """torch_backend's gathered L1 blocks [2L, k, n] fp16, every plane edge-case data."""
    n = bt * c
    planes = []
    for _ in range(2 * layers * blocks):
        if rng.random() < 0.5:  # per-channel edge cases: columns of every kind
            cols = int4.edge_case_input(rng, 32 * c, 32).reshape(c, 32)[:, :bt] if bt <= 32 \
                else rng.standard_normal((c, bt)).astype(np.float16)
            planes.append(np.ascontiguousarray(cols[rng.permutation(c)].T).reshape(-1))
        else:
            planes.append(int4.edge_case_input(rng, max(n, 10 * g), g)[:n])
    return np.stack(planes).reshape(2 * layers, blocks, n)


def spec_rows(kt: np.ndarray, vt: np.ndarray, bt, c, g, channel) -> np.ndarray:
    """synapse.hw.int4's bytes of each row: [key row][value row]."""
    out = []
    for k, v in zip(kt, vt):
        kb = np.zeros(int4.channel_nbytes(bt, c) if channel else int4.int4_nbytes(bt * c, g), np.uint8)
        if channel:
            int4.pack_channels_into(k.reshape(bt, c), kb)
        else:
            int4.pack_into(k, g, kb)
        vb = np.zeros(int4.int4_nbytes(bt * c, g), np.uint8)
        int4.pack_into(v, g, vb)
        out.append(np.concatenate([kb, vb]))
    return np.stack(out)


CASES = [  # layers, blocks (k), block_tokens, channels, group, grid
    (1, 1, 4, 32, 32, 1),        # the smallest rows: one group a token
    (2, 3, 16, 128, 64, 1),      # a tile of values spans rows; one CTA strides over all
    (3, 5, 8, 256, 128, 2),      # groups of 16 lanes, a partial last tile
    (2, 7, 12, 96, 32, 3),       # c/8 = 12 channels' threads a row: units cross CTAs
    (1, 2, 64, 64, 64, 1),       # long columns (64 tokens a channel)
]


@pytest.mark.parametrize("keys", int4.KEY_FORMATS)
@pytest.mark.parametrize("layers, blocks, bt, c, g, grid", CASES)
def test_the_gathered_blocks_become_the_layer_rows_of_the_spec(keys, layers, blocks, bt, c, g, grid):
    rng = np.random.default_rng(layers * 1000 + blocks * 100 + bt + c + g)
    x = gathered(rng, layers, blocks, bt, c, g)
    n = bt * c
    flat = x.reshape(-1)
    # the launch torch_backend makes: keys at 0, values k rows on, runs of k rows 2kn apart
    rows = Rows(flat, flat[blocks * n:], layers * blocks, bt, c, g, keys == "channel",
                blocks, 2 * blocks * n)
    run_kernel(rows, grid)
    assert (rows.hits == 1).all(), "every byte of the layer rows written exactly once"
    kt = x.reshape(layers, 2, blocks, n)[:, 0].reshape(-1, n)
    vt = x.reshape(layers, 2, blocks, n)[:, 1].reshape(-1, n)
    got = rows.out.reshape(layers * blocks, -1)
    assert got.shape[1] == key_row_bytes(bt, c, keys, g) + int4.int4_nbytes(n, g)
    assert np.array_equal(got, spec_rows(kt, vt, bt, c, g, keys == "channel"))
    want = quantize_layer_rows(torch.from_numpy(kt).view(-1, bt, c), torch.from_numpy(vt).view(-1, bt, c),
                               keys, g)
    assert np.array_equal(got, want.numpy())
    # the telemetry: what the torch ops sum (in float64 here; the kernel adds in another order)
    bk, bv = dequantize_layer_rows(want, bt, c, keys, g, torch.float32)
    rk, rv = torch.from_numpy(kt).float(), torch.from_numpy(vt).float()
    err = float(((bk - rk).double() ** 2).sum() + ((bv - rv).double() ** 2).sum())
    ref = float((rk.double() ** 2).sum() + (rv.double() ** 2).sum())
    assert rows.sums[1] == pytest.approx(ref, rel=1e-6)
    assert rows.sums[0] == pytest.approx(err, rel=1e-5)


@pytest.mark.parametrize("keys", int4.KEY_FORMATS)
def test_plain_rows_are_one_run(keys):
    """``run_rows`` None (kernels.py: one run of every row): k and v [rows][n] back to back."""
    rng = np.random.default_rng(3)
    bt, c, g, r = 8, 64, 32, 5
    kt = int4.edge_case_input(rng, r * bt * c, g).reshape(r, -1)
    vt = int4.edge_case_input(rng, r * bt * c, g).reshape(r, -1)
    rows = run_kernel(Rows(kt.reshape(-1), vt.reshape(-1), r, bt, c, g, keys == "channel", r, 0), 2)
    assert (rows.hits == 1).all()
    assert np.array_equal(rows.out.reshape(r, -1), spec_rows(kt, vt, bt, c, g, keys == "channel"))


def test_the_grid_covers_the_work_in_one_wave_at_most():
    for rows, bt, c, channel in [(1, 4, 32, True), (5600, 16, 512, True), (5600, 16, 512, False),
                                 (3, 64, 64, False)]:
        grid = kernels.layer_rows_grid(rows, bt, c, channel, 132, 3)
        assert 1 <= grid <= 132 * 3
        vecs = rows * bt * c // 8
        if grid < 132 * 3:  # not capped: enough CTAs that no thread strides twice
            assert grid * THREADS * U >= vecs
            assert not channel or grid * THREADS >= rows * c // 8


def test_the_kernels_wide_stores_are_aligned_under_the_contracts():
    """bt % 4 and c % G: every layer row, its key row and the per-channel scales and zeros
    (16-byte stores) start on 16 bytes; per-token scales and zeros (2-byte stores) on 8."""
    for g in int4.GROUP_SIZES:
        for bt in (4, 8, 12, 16, 64):
            for c in (g, 2 * g, 3 * g, 40 * g):
                n = bt * c
                for keys in int4.KEY_FORMATS:
                    kb = key_row_bytes(bt, c, keys, g)
                    wide = [kb, kb + int4.int4_nbytes(n, g), n // 2]
                    if keys == "channel":
                        wide.append(n // 2 + 2 * c)
                    assert all(s % 16 == 0 for s in wide), (g, bt, c, keys)
                    assert (2 * (n // g)) % 8 == 0


@pytest.mark.parametrize("kw, match", [
    (dict(block_tokens=6), "block_tokens % 4"),
    (dict(channels=96, group_size=64), "channels % group_size"),
    (dict(group_size=16), "group_size must be one of"),
    (dict(key_format="head"), "key format"),
    (dict(rows=0), "rows must be a positive"),
    (dict(run_stride=4), "run_stride"),
    (dict(run_rows=0), "run_rows must be a positive"),
    (dict(k_ptr=24), "16-byte aligned"),
    (dict(sums_ptr=12), "8-byte aligned"),
    (dict(rows=1 << 22, block_tokens=1024, channels=1024), "too many for one launch"),
])
def test_bad_arguments_are_refused_before_the_device(kw, match):
    args = dict(k_ptr=16, v_ptr=16, dst_ptr=16, sums_ptr=8, rows=4, block_tokens=16, channels=128,
                group_size=64, key_format="channel", run_rows=None, run_stride=0)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        kernels.quantize_layer_rows_int4(**args)


def test_without_pycuda_the_wrapper_says_so(monkeypatch):
    from synapse.errors import BackendUnavailable
    monkeypatch.setattr(kernels, "_cuda", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("No module named 'pycuda'"))
    with pytest.raises(BackendUnavailable, match="PyCUDA"):
        kernels.quantize_layer_rows_int4(16, 16, 16, 8, 4, 16, 128, 64)


def test_the_backend_quantizes_with_torch_ops_where_the_kernel_cannot_serve(monkeypatch):
    """CPU, or a dtype other than fp16, or the switch off, or per-channel keys where they
    are held back (``FUSED_CHANNEL_KEYS = False``), or no PyCUDA: torch ops, and the reason
    is kept."""
    from dataclasses import replace

    from synapse.kv import torch_backend
    from synapse.kv.shape import KVShape
    from synapse.kv.torch_backend import TorchBackend
    shape = KVShape(2, 2, 64, 16, 64)
    assert TorchBackend("cpu", shape, torch.float16)._quantize_kernel() is None
    be = TorchBackend("cpu", shape, torch.float32)
    assert be._quantize_kernel() is None and "fp16 on CUDA only" in be.fused_quantize_reason
    be = TorchBackend("cpu", shape, torch.float16)
    be.fused_quantize = False
    assert be._quantize_kernel() is None and be.fused_quantize_reason == "fused_quantize is off"
    monkeypatch.setattr(kernels, "_cuda", None)
    monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError("No module named 'pycuda'"))
    monkeypatch.setattr(torch_backend, "FUSED_CHANNEL_KEYS", False)
    be = TorchBackend("cpu", shape, torch.float16)
    be.cuda = True  # as on a CUDA machine, per-channel keys held back
    assert shape.int4_keys == "channel"
    assert be._quantize_kernel() is None and "per-channel keys" in be.fused_quantize_reason
    monkeypatch.setattr(torch_backend, "FUSED_CHANNEL_KEYS", True)
    for keys in ("channel", "token"):
        be = TorchBackend("cpu", replace(shape, int4_keys=keys), torch.float16)
        be.cuda = True  # as on a CUDA machine without PyCUDA
        assert be._quantize_kernel() is None and "PyCUDA" in be.fused_quantize_reason
    assert be._fused_quantize is False  # resolved once
