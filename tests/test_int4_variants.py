"""The faster INT4 kernel variants of cuda/int4.cu ("lean", "staged"), transcribed to
float32 NumPy on the CPU: their arithmetic (half2 min / -max, rounding by adding 1.5 * 2^23,
the clamp before the rounding, the near-tie fallback, the nibble packing by shift-add and
byte permutes) must give the bytes of the spec, synapse.hw.int4, and their indexing (the
staged tiles, the rotated reads of pass 1) must visit every vector and group once without
shared-memory bank conflicts. NumPy's float32 operations round like the kernels' __f*_rn
intrinsics, so a transcription that matches the spec here fails only where the CUDA
compiler departs from the source; the GPU tests (test_kernels_cuda.py, marked cuda) check
that part.
"""

from __future__ import annotations

import numpy as np
import pytest

from synapse.hw import int4, kernels

f32 = np.float32
ROUND_MAGIC = f32(12582912.0)  # kRoundMagic
NEAR_TIE = f32(0.5) - f32(1.0e-4)  # kNearTie
STAGE_VECS = kernels.INT4_THREADS * kernels.STAGED_VECS_PER_THREAD  # kStageVecs


def byte_perm(x, y, sel: int):
    """CUDA's __byte_perm: result byte i is byte (sel >> 4i) & 7 of the 8 bytes y:x."""
    both = (y.astype(np.uint64) << np.uint64(32)) | x.astype(np.uint64)
    out = np.zeros_like(x, dtype=np.uint32)
    for i in range(4):
        b = (sel >> (4 * i)) & 7
        out |= (((both >> np.uint64(8 * b)) & np.uint64(0xFF)).astype(np.uint32)) << np.uint32(8 * i)
    return out


def group_code(lo16, neg_hi16):
    """group_code: fp16 (scale, zero) and float32 (zf, sf, inv) from a group's (min, -max)."""
    lo = lo16.astype(f32) + f32(0)
    hi = -neg_hi16.astype(f32) + f32(0)
    scale = ((hi - lo) / f32(15)).astype(np.float16)
    zero = lo.astype(np.float16)
    sf, zf = scale.astype(f32), zero.astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(sf != 0, f32(1) / np.where(sf != 0, sf, f32(1)), f32(0)).astype(f32)
    return scale, zero, zf, sf, inv


def lean_words(x16: np.ndarray, zf, sf, inv, count_ties: list | None = None) -> np.ndarray:
    """lean_word for vectors [nv, 8] of fp16 with per-vector zf, sf, inv: uint32 words."""
    x = x16.astype(f32)
    zf, sf, inv = (np.broadcast_to(np.asarray(a, f32).reshape(len(x), -1), x.shape)
                   for a in (zf, sf, inv))
    t = np.minimum((x - zf) * inv, f32(15))
    y = t + ROUND_MAGIC
    near = (np.abs(t - (y - ROUND_MAGIC)) > NEAR_TIE).any(axis=1)
    b = y.view(np.uint32)
    p = [((b[:, 2 * i + 1] << np.uint32(4)) + b[:, 2 * i]).astype(np.uint32) for i in range(4)]
    word = byte_perm(byte_perm(p[0], p[1], 0x0040), byte_perm(p[2], p[3], 0x0040), 0x5410)
    if near.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((x[near] - zf[near]) / sf[near]), 0, 15)
        q = np.where(sf[near] != 0, q, 0).astype(np.uint32)
        word[near] = (q << (np.arange(8, dtype=np.uint32) * np.uint32(4))).sum(axis=1, dtype=np.uint32)
    if count_ties is not None:
        count_ties.append(int(near.sum()))
    return word


def layout_bytes(words, scales, zeros) -> bytes:
    return words.astype("<u4").tobytes() + scales.tobytes() + zeros.tobytes()


def lean_quantize(x16: np.ndarray, group_size: int, count_ties=None) -> bytes:
    """quantize_lean_impl: per vector min/-max pairs, butterfly over a group's lanes."""
    vecs = x16.reshape(-1, 8)
    h = vecs.reshape(-1, 4, 2)
    mn = np.minimum(np.minimum(h[:, 0], h[:, 1]), np.minimum(h[:, 2], h[:, 3]))
    mx = np.maximum(np.maximum(h[:, 0], h[:, 1]), np.maximum(h[:, 2], h[:, 3]))
    nmx = -mx
    pair = np.minimum(np.stack([mn[:, 0], nmx[:, 0]], 1), np.stack([mn[:, 1], nmx[:, 1]], 1))
    lanes = group_size // 8
    off = 1
    lane = np.arange(len(vecs))
    while off < lanes:  # __shfl_xor_sync within aligned slices of `lanes` vectors
        pair = np.minimum(pair, pair[lane ^ off])
        off <<= 1
    scale, zero, zf, sf, inv = group_code(pair[:, 0], pair[:, 1])
    words = lean_words(vecs, zf, sf, inv, count_ties)
    first = lane % lanes == 0
    return layout_bytes(words, scale[first], zero[first])


def lean_channels(x16: np.ndarray) -> bytes:
    """quantize_channels_lean_impl on one [T, C] row: per-channel min and max over the
    tokens (elementwise on half2 pairs), then token t's 8-channel vector j -> word t*C/8 + j."""
    tokens, c = x16.shape
    mn, mx = x16.min(axis=0), x16.max(axis=0)
    scale, zero, zf, sf, inv = group_code(mn, -mx)
    vecs = x16.reshape(tokens * c // 8, 8)
    per = lambda a: np.tile(a.reshape(c // 8, 8), (tokens, 1))  # noqa: E731
    words = lean_words(vecs, per(zf), per(sf), per(inv))
    return layout_bytes(words, scale, zero)


def group_rotation(v: int, lane):
    return lane % v if v >= 8 else (lane >> 1) % v


def staged_quantize(x16: np.ndarray, group_size: int, grid: int) -> bytes:
    """quantize_staged_impl with `grid` CTAs: tiles of STAGE_VECS vectors grid-strided;
    pass 1 one thread per group reading its vectors from the rotated start, pass 2 one
    thread per vector. Every output is written once (asserted)."""
    n = x16.size
    v_per_g = group_size // 8
    num_vec = n // 8
    num_tiles = -(-num_vec // STAGE_VECS)
    vecs_all = x16.reshape(-1, 8)
    words = np.zeros(num_vec, np.uint32)
    scales = np.zeros(n // group_size, np.float16)
    zeros = np.zeros(n // group_size, np.float16)
    hits_v = np.zeros(num_vec, int)
    hits_g = np.zeros(n // group_size, int)
    for cta in range(grid):
        for t in range(cta, num_tiles, grid):
            vecs = min(STAGE_VECS, num_vec - t * STAGE_VECS)
            tile = vecs_all[t * STAGE_VECS: t * STAGE_VECS + vecs]
            g = np.arange(vecs // v_per_g)
            rot = group_rotation(v_per_g, g & 31)
            mn = np.full((g.size, 2), np.float16(65504))
            mx = np.full((g.size, 2), np.float16(-65504))
            for j in range(v_per_g):
                raw = tile[g * v_per_g + (j + rot) % v_per_g].reshape(-1, 4, 2)
                mn = np.minimum(mn, raw.min(axis=1))
                mx = np.maximum(mx, raw.max(axis=1))
            pair = np.minimum(np.stack([mn[:, 0], -mx[:, 0]], 1), np.stack([mn[:, 1], -mx[:, 1]], 1))
            scale, zero, zf, sf, inv = group_code(pair[:, 0], pair[:, 1])
            gg = t * (STAGE_VECS // v_per_g) + g
            scales[gg], zeros[gg] = scale, zero
            hits_g[gg] += 1
            v = np.arange(vecs)
            words[t * STAGE_VECS + v] = lean_words(tile, zf[v // v_per_g], sf[v // v_per_g], inv[v // v_per_g])
            hits_v[t * STAGE_VECS + v] += 1
    assert (hits_v == 1).all() and (hits_g == 1).all()
    return layout_bytes(words, scales, zeros)


def spec_bytes(x16: np.ndarray, group_size: int) -> bytes:
    out = np.zeros(int4.int4_nbytes(x16.size, group_size), np.uint8)
    int4.pack_into(x16, group_size, out)
    return out.tobytes()


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_lean_arithmetic_gives_the_spec_bytes(group_size):
    rng = np.random.default_rng(group_size)
    x = int4.edge_case_input(rng, group_size * 3000, group_size)
    ties = []
    assert lean_quantize(x, group_size, ties) == spec_bytes(x, group_size)
    assert ties[0] > 0, "the near-tie fallback was never taken: the input misses the ties"


def test_the_near_tie_fallback_is_needed():
    """Without the fallback the reciprocal-multiplied quotient rounds some exact ties the
    other way: the test above would not notice a kernel that dropped it otherwise."""
    rng = np.random.default_rng(7)
    found = 0
    for _ in range(200):
        sf = f32(np.float16(rng.uniform(0.01, 10)))
        inv = f32(1) / sf
        d = (np.arange(15, dtype=f32) + f32(0.5)) * sf  # exact ties where representable
        exact = np.rint(d / sf)
        fast = np.rint(np.minimum(d * inv, f32(15)))
        found += int((np.minimum(exact, 15) != fast).sum())
    assert found > 0


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("tiles, grid", [(0.25, 1), (1, 1), (3.5, 2), (7, 3)])
def test_staged_tiles_give_the_spec_bytes(group_size, tiles, grid):
    rng = np.random.default_rng(int(tiles * 8) + group_size)
    n = int(tiles * STAGE_VECS * 8) // group_size * group_size + group_size
    x = int4.edge_case_input(rng, n, group_size)
    assert staged_quantize(x, group_size, grid) == spec_bytes(x, group_size)


@pytest.mark.parametrize("tokens, channels", [(4, 256), (16, 1024), (64, 512)])
def test_lean_channel_rows_give_the_spec_bytes(tokens, channels):
    """The key row of a channel-key KV block: channels of every kind (ties, subnormal
    ranges, signed zeros, constant) side by side, so one 8-channel word mixes groups with a
    zero scale and groups that need the tie fallback."""
    rng = np.random.default_rng(tokens * channels)
    g = min(size for size in int4.GROUP_SIZES if size >= tokens)
    cols = int4.edge_case_input(rng, g * channels, g).reshape(channels, g)[:, :tokens]
    x = np.ascontiguousarray(cols[rng.permutation(channels)].T)
    x[:, 0] = ([0.0, 15.0] + [(t % 15) + 0.5 for t in range(tokens)])[:tokens]  # ties,
    # in the same 8-channel word as a range whose fp16 scale is 0:
    x[:, 1] = np.where(np.arange(tokens) % 2, np.float16(2.0**-24), np.float16(0))
    out = np.zeros(int4.channel_nbytes(tokens, channels), np.uint8)
    int4.pack_channels_into(x, out)
    assert lean_channels(x) == out.tobytes()


@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
def test_pass_one_reads_are_free_of_bank_conflicts(group_size):
    """A 16-byte shared load is served a quarter warp (8 lanes) at a time; 8 lanes reading
    8 different 16-byte bank quads (address / 16 mod 8) take one wavefront."""
    v = group_size // 8
    lane = np.arange(32)
    for j in range(v):
        quad = (lane * v + (j + group_rotation(v, lane)) % v) % 8
        for q in range(4):
            assert len(set(quad[8 * q: 8 * q + 8].tolist())) == 8, (j, q)
    # and the rotation reads each of a group's vectors once
    for ln in range(32):
        assert sorted((j + group_rotation(v, ln)) % v for j in range(v)) == list(range(v))


def test_staged_smem_fits_the_default_limit_and_tiles_hold_whole_groups():
    assert STAGE_VECS * 8 % max(int4.GROUP_SIZES) == 0
    stages, tile_bytes = 2, STAGE_VECS * 16  # kStages
    params = STAGE_VECS // (min(int4.GROUP_SIZES) // 8) * 16
    assert stages * tile_bytes + params + 16 <= kernels.DEFAULT_SHARED_BYTES_PER_BLOCK


def test_every_variant_resolves_to_a_kernel_and_bad_names_are_refused():
    for direction, table in (("quantize", kernels.INT4_QUANT_VARIANTS),
                             ("dequantize", kernels.INT4_DEQUANT_VARIANTS)):
        assert "warp" in table
        for name in table:
            stem, vecs = kernels.int4_kernel(direction, name)
            assert stem.startswith(f"int4_{direction}") and vecs >= 1
        assert kernels.int4_kernel(direction)[0] == kernels.int4_kernel(
            direction, kernels.QUANT_VARIANT if direction == "quantize" else kernels.DEQUANT_VARIANT)[0]
        with pytest.raises(ValueError, match="variant must be one of"):
            kernels.int4_kernel(direction, "nope")


def test_kv_block_variants_are_checked_before_the_device():
    assert "warp" in kernels.KV_QUANT_VARIANTS and kernels.KV_QUANT_VARIANT in kernels.KV_QUANT_VARIANTS
    with pytest.raises(ValueError, match="variant must be one of"):
        kernels.quantize_kv_block_int4(16, 16, 16, 256, 64, variant="nope")


def _bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "int4_kernels.py"
    spec = importlib.util.spec_from_file_location("int4_kernels_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_picks_the_fastest_variant_whose_bytes_are_equal():
    """benchmarks/int4_kernels.py decides what goes into QUANT_VARIANT: never a variant
    whose bytes differ at any group size, nor one that failed, however fast."""
    bench = _bench()

    def result(variant, rate, exact=True, error=None):
        if error:
            return {"direction": "quantize", "variant": variant, "error": error}
        groups = {str(g): {"bit_exact": exact or g != 128,
                           "fitted": {"gb_per_s": rate, "of_copy": rate / 4000}}
                  for g in int4.GROUP_SIZES}
        return {"direction": "quantize", "variant": variant, "groups": groups}

    results = [result("warp", 2300), result("lean", 3000), result("lean4", 3900, exact=False),
               result("staged", 9999, error="no result within 240 s")]
    assert bench.pick(results, "quantize")[0] == "lean"
    assert bench.pick(results[:1], "quantize")[0] == "warp"
    assert bench.pick([], "dequantize") == ("warp", "no variant was measured")


# ----------------------------------------------------------------- "bulk" dequantize

INT_MAGIC = f32(8388608.0)  # kIntMagic
# name -> (vectors per tile, input stages): kBulkVecs / kBulkInStages, kBulk4k* in int4.cu
BULK_SHAPES = {"bulk": (kernels.INT4_THREADS * kernels.BULK_VECS_PER_THREAD, 2),
               "bulk4k": (kernels.INT4_THREADS * kernels.BULK4K_VECS_PER_THREAD, 4)}


def fma_words(words, zf, sf) -> np.ndarray:
    """decode_word_fma for uint32 code words [nv] with per-word zf, sf: fp16 [nv, 8]. Codes
    to bytes by mask and shift, each under 2^23's exponent by a byte permute, minus 2^23;
    then one rounding of zf + code * sf (exact in float64: every term is a multiple of 2^-24
    below 2^20, so the float32 cast is fmaf_rn's single rounding), then to fp16."""
    words = np.asarray(words, np.uint32)
    even = words & np.uint32(0x0F0F0F0F)
    odd = (words >> np.uint32(4)) & np.uint32(0x0F0F0F0F)
    magic = np.full_like(words, 0x4B000000)
    out = np.empty((words.size, 8), np.float16)
    for b in range(4):
        for e, nibbles in ((2 * b, even), (2 * b + 1, odd)):
            code = byte_perm(magic, nibbles, 0x3004 + b).view(f32) - INT_MAGIC
            exact = code.astype(np.float64) * np.asarray(sf, f32) + np.asarray(zf, f32)
            out[:, e] = exact.astype(f32).astype(np.float16)
    return out


def bulk_dequantize(buf: np.ndarray, n: int, group_size: int, grid: int, tile_vecs: int,
                    stages: int) -> bytes:
    """dequantize_bulk_impl with `grid` CTAs, CTA by CTA: the input stages are filled from
    the byte addresses the kernel computes (bulk load of the codes; 4-byte words of the
    scales and zeros, from the 4-byte aligned word around the tile's first zero), each
    transfer checked for alignment, size and bounds; each wait checked against the mbarrier
    phase it would see; every output vector written once (asserted)."""
    v_per_g = group_size // 8
    num_vec, num_groups = n // 8, n // group_size
    tile_groups = tile_vecs // v_per_g
    copy_threads = tile_groups // 2 + 1  # kCopyThreads
    num_tiles = -(-num_vec // tile_vecs)
    last_vecs = num_vec - (num_tiles - 1) * tile_vecs
    zoff = num_groups & 1
    scale_base, zero_base = n // 2, n // 2 + 2 * (num_groups - zoff)  # byte offsets
    assert scale_base % 16 == 0 and zero_base % 4 == 0 and buf.size % 4 == 0
    out = np.zeros((num_vec, 8), np.float16)
    hits = np.zeros(num_vec, int)

    def word(byte_offset: int) -> np.ndarray:
        assert byte_offset % 4 == 0 and 0 <= byte_offset and byte_offset + 4 <= buf.size
        return buf[byte_offset: byte_offset + 4]

    for cta in range(grid):
        filled = [0] * stages  # completed phases of full[s]
        content = [None] * stages

        def load_input(t: int, s: int):
            vecs = tile_vecs if t + 1 < num_tiles else last_vecs
            code_bytes, code_off = vecs * 4, t * tile_vecs * 4
            assert code_bytes % 16 == 0 and code_off % 16 == 0 and code_off + code_bytes <= n // 2
            m = vecs // v_per_g
            n_scale, n_zero = (m + 1) // 2, (m + zoff + 1) // 2
            assert n_scale <= tile_groups // 2 and n_zero <= tile_groups // 2 + 1 <= copy_threads
            w0 = t * (tile_groups // 2)
            sc = np.concatenate([word(scale_base + 4 * (w0 + i)) for i in range(n_scale)])
            ze = np.concatenate([word(zero_base + 4 * (w0 + i)) for i in range(n_zero)])
            codes = buf[code_off: code_off + code_bytes].view("<u4")
            content[s] = (t, vecs, codes, sc.view(np.float16), ze.view(np.float16))
            filled[s] += 1

        for s in range(stages):
            if cta + s * grid < num_tiles:
                load_input(cta + s * grid, s)
        for k, t in enumerate(range(cta, num_tiles, grid)):
            s, parity = k % stages, (k // stages) & 1
            # mbarrier.try_wait.parity returns once the phase of that parity has completed:
            # the fill for this tile is the (k // stages + 1)-th of the stage, no later one
            assert filled[s] == k // stages + 1 and (filled[s] - 1) & 1 == parity
            tt, vecs, codes, sc, ze = content[s]
            assert tt == t and vecs * 16 % 16 == 0
            v = np.arange(vecs)
            g = v // v_per_g
            out[t * tile_vecs + v] = fma_words(codes[v], ze[zoff + g].astype(f32), sc[g].astype(f32))
            hits[t * tile_vecs + v] += 1
            if t + stages * grid < num_tiles:
                load_input(t + stages * grid, s)
    assert (hits == 1).all()
    return out.tobytes()


@pytest.mark.parametrize("variant", sorted(BULK_SHAPES))
@pytest.mark.parametrize("group_size", int4.GROUP_SIZES)
@pytest.mark.parametrize("tiles, grid", [("one group", 1), ("odd groups", 1), ("even groups", 2),
                                         (1, 1), (2, 3), (5.5, 2), (9.25, 2)])
def test_bulk_tiles_give_the_spec_bytes(variant, group_size, tiles, grid):
    """Sizes: one group; a partial tile with an odd and an even number of groups (zeros
    starting 2 bytes into a word, or aligned); whole tiles; several tiles per CTA with a
    tail, so every stage is refilled and the phases flip."""
    tile_vecs, stages = BULK_SHAPES[variant]
    per_tile = tile_vecs * 8
    n = {"one group": group_size, "odd groups": group_size * 37,
         "even groups": group_size * 38}.get(tiles)
    if n is None:
        n = int(tiles * per_tile) // group_size * group_size
        n += group_size if tiles != int(tiles) else 0
    rng = np.random.default_rng(n + group_size)
    buf = int4.edge_case_buffer(rng, n, group_size)
    want = int4.unpack_from(buf, n, group_size, np.float16).tobytes()
    assert bulk_dequantize(buf, n, group_size, grid, tile_vecs, stages) == want


def test_one_fma_rounds_like_the_product_then_the_sum():
    """decode_word_fma's premise, for every finite fp16 scale of either sign, every code,
    and zeros of every kind: fp32(zf + fp32(q * sf)) == fp32(zf + q * sf) (fp16 afterwards
    either way), i.e. the product is exact."""
    scales = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    scales = scales[np.isfinite(scales)].astype(f32)
    rng = np.random.default_rng(5)
    zeros = np.concatenate([np.array([0.0, -0.0, 2.0**-24, -(2.0**-24), 65504.0, -65504.0]),
                            rng.standard_normal(26) * 10.0 ** rng.uniform(-6, 4, 26)])
    zeros = zeros.astype(np.float16).astype(f32)
    for q in range(16):
        prod = f32(q) * scales  # float32 product, rounded
        assert (prod.astype(np.float64) == float(q) * scales.astype(np.float64)).all(), q
        for z in zeros:
            with np.errstate(over="ignore"):  # sums past 65504 become inf, alike
                two = (f32(z) + prod).astype(np.float16)
                one = (np.float64(z) + float(q) * scales.astype(np.float64)).astype(f32).astype(np.float16)
            assert (two.view(np.uint16) == one.view(np.uint16)).all(), (q, z)


def test_bulk_shared_memory_fits_and_the_launch_plan_counts_the_reserved_kib():
    """Static shared memory of the bulk kernels (as .ci/check-cuda reports it) stays under
    the 48 KiB default, and the CTAs per SM that kernels.int4_grid plans for (no per-CTA
    reservation) fit also with the 1 KiB every CTA reserves on sm_90: the grid is one
    resident wave, never a second partial one."""
    for variant, (tile_vecs, stages) in BULK_SHAPES.items():
        for g in int4.GROUP_SIZES:
            tile_groups = tile_vecs // (g // 8)
            smem = (stages * tile_vecs * 4 + 2 * tile_vecs * 16 + stages * tile_groups // 2 * 4
                    + stages * (tile_groups // 2 + 1) * 4 + 8 * stages)
            assert smem <= kernels.DEFAULT_SHARED_BYTES_PER_BLOCK, (variant, g, smem)
            regs = 32 if variant == "bulk4k" else 40  # launch bounds (8 CTAs) / at most, per check-cuda
            planned = kernels.resident_blocks_per_sm(kernels.INT4_THREADS, regs, smem)
            assert planned == kernels.resident_blocks_per_sm(kernels.INT4_THREADS, regs, smem + 1024)
            assert planned == (8 if variant == "bulk4k" else 5), (variant, g, planned)


def test_the_bulk_kernels_are_tma_variants_and_refuse_huge_sizes():
    for name in BULK_SHAPES:
        assert name in kernels.INT4_DEQUANT_VARIANTS and name in kernels.INT4_TMA_VARIANTS
    assert kernels.INT4_DEQUANT_VARIANTS["bulk"][1] * kernels.INT4_THREADS == BULK_SHAPES["bulk"][0]
    with pytest.raises(ValueError, match="too large"):
        kernels.dequantize_int4(16, 16, kernels.MAX_INT4_NUMEL, 64, variant="bulk")
