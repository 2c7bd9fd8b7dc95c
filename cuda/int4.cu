// INT4 quantize / dequantize kernels: bit-exact with synapse/hw/int4.py (the spec).
//
// Device: any sm_70+ GPU (tuned for sm_90). Element type: fp16 (__half).
// Layout of a quantized buffer of n elements, group size G, contiguous:
//   [packed uint8, n/2 bytes][scales fp16, n/G][zeros fp16, n/G]
// element 2i -> low nibble of byte i, element 2i+1 -> high nibble.
// Per group: zero = fp16(min), scale = fp16((max - min) / 15) (fp32 math, IEEE division;
// min and max get + 0.0 so that -0 is stored as +0);
// q = clamp(rint((x - zero) / scale), 0, 15) with the fp16-rounded zero/scale, q = 0 when
// the rounded scale is 0; dequant x_hat = fp16(zero + q * scale) with a separately rounded
// product and sum (no FMA), exactly as NumPy computes it.
//
// Contracts the caller (synapse/hw/kernels.py) checks: n > 0, n % G == 0, both pointers
// 16-byte aligned, input finite. Launch: 1-D, blockDim.x = kThreads, any gridDim.x >= 1
// (grid-stride loops).
//
// Per-channel rows (the key format "channel", synapse/hw/int4.py): [T][C] elements, one
// group per column over its T tokens; [packed T*C/2, element (t, c) at nibble t*C + c]
// [scales fp16 C][zeros fp16 C], the same rounding. With T % 4 == 0 and C % 8 == 0 every
// section is 16-byte aligned, so a code word (8 channels of one token) has its scales and
// zeros in one 16-byte load each.
//
// Entry points (extern "C"): int4_quantize_g{32,64,128}(const __half* src, uint8_t* dst,
// unsigned long long n) and int4_dequantize_g{32,64,128}(const uint8_t* src, __half* dst,
// unsigned long long n); their faster variants, same arguments and bytes,
// int4_quantize_{lean,lean4,staged}_g*, int4_dequantize_{stream,staged,bulk,bulk4k}_g* and
// kv_block_quantize_int4_kc_lean_g* ("Faster variants" below);
// kv_block_quantize_int4_kc_g{32,64,128} and
// kv_block_dequantize_int4_kc_g{32,64,128}, a scenario KV block in the channel-key format;
// kv_assemble_int4_g{32,64,128}, the read-through of one layer of the transformers cache;
// kv_quantize_layer_rows_int4_g{32,64,128}, that cache's demotions: the layer rows of
// every layer's blocks and their squared error, in one launch (see their comments below).

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kThreads = 256;       // must match INT4_THREADS in kernels.py
constexpr int kVec = 8;             // fp16 elements per 16-byte vector (one uint32 of codes)
constexpr int kQuantUnroll = 2;     // vectors per thread per tile (QUANT_VECS_PER_THREAD)
constexpr int kDequantUnroll = 4;   // vectors per thread per tile (DEQUANT_VECS_PER_THREAD)
constexpr float kLevels = 15.0f;

__device__ __forceinline__ void halves_to_floats(const uint4 raw, float (&x)[kVec]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __half22float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// rint((x - zf) / sf) clamped to [0, 15], bit-exact with the IEEE quotient. A reciprocal
// multiply is within a few ulp of the true quotient (|quotient| < 32 here); only when that
// lands near a .5 tie can the two round differently, and then we take the exact division.
__device__ __forceinline__ uint32_t code_of(float x, float zf, float sf, float inv_sf) {
  const float d = __fsub_rn(x, zf);
  float t = __fmul_rn(d, inv_sf);
  if (fabsf(__fsub_rn(__fsub_rn(t, floorf(t)), 0.5f)) < 1.0e-4f) t = __fdiv_rn(d, sf);
  const int q = __float2int_rn(t);
  return static_cast<uint32_t>(min(max(q, 0), 15));
}

__device__ __forceinline__ float dequant_value(uint32_t code, float zf, float sf) {
  return __fadd_rn(zf, __fmul_rn(static_cast<float>(code), sf));
}

// Where vector v (8 elements) of a run lives in fp16 memory: contiguous, or in rows of
// row_vecs vectors whose starts are stride_vecs vectors apart (the values of a token-major
// KV block: one token's values, then that token's next keys). 32-bit row arithmetic: the
// wrappers check that a run has fewer than 2^32 vectors.
struct Contiguous {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long v) const { return v; }
};
struct Strided {
  unsigned row_vecs;
  unsigned stride_vecs;
  __device__ __forceinline__ unsigned long long operator()(unsigned long long v) const {
    const unsigned r = static_cast<unsigned>(v) / row_vecs;
    return static_cast<unsigned long long>(r) * stride_vecs + (static_cast<unsigned>(v) - r * row_vecs);
  }
};

__device__ __forceinline__ uint4 floats_to_halves(const float (&x)[kVec]) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) h[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
  return raw;
}

// The sections of a quantized buffer of n elements (file header): codes, scales, zeros.
template <int G>
__device__ __forceinline__ void quantized_sections(uint8_t* dst, unsigned long long n,
                                                   uint32_t*& packed, __half*& scales,
                                                   __half*& zeros) {
  packed = reinterpret_cast<uint32_t*>(dst);
  scales = reinterpret_cast<__half*>(dst + n / 2);
  zeros = scales + n / G;
}

// One vector = 8 consecutive elements = one 16-byte load and one 4-byte code word. A group
// spans G/8 consecutive lanes of one warp (tiles are warp-aligned), so its min/max is a
// butterfly over those lanes. The tile loop is uniform across the block so every lane
// reaches every shuffle; inactive lanes (tail) form whole groups and never mix with
// active ones because n is a multiple of G. Codes is the arithmetic of one vector
// (WarpCodes below, or LeanCodes of the faster variants): its code word and its group's
// stored scale and zero.
template <int G, class Addr, class Codes, int U>
__device__ __forceinline__ void quantize_impl(const __half* __restrict__ src,
                                              uint8_t* __restrict__ dst,
                                              unsigned long long n, const Addr addr,
                                              const Codes codes) {
  constexpr int kLanesPerGroup = G / kVec;
  static_assert(kLanesPerGroup >= 1 && kLanesPerGroup <= 32, "group must fit in a warp");
  const unsigned long long num_vec = n / kVec;
  const uint4* in = reinterpret_cast<const uint4*>(src);
  uint32_t* packed;
  __half *scales, *zeros;
  quantized_sections<G>(dst, n, packed, scales, zeros);
  const unsigned lane = threadIdx.x & 31u;
  const unsigned long long tile = static_cast<unsigned long long>(U) * blockDim.x;
  const unsigned long long stride = tile * gridDim.x;

  for (unsigned long long base = tile * blockIdx.x; base < num_vec; base += stride) {
    uint4 raw[U];
    bool active[U];
    // issue every load of the tile before any arithmetic: memory-level parallelism
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned long long v = base + static_cast<unsigned long long>(u) * blockDim.x + threadIdx.x;
      active[u] = v < num_vec;
      raw[u] = active[u] ? __ldg(in + addr(v)) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      __half scale_h, zero_h;
      const uint32_t word = codes.template word<kLanesPerGroup>(raw[u], scale_h, zero_h);
      if (active[u]) {
        const unsigned long long v = base + static_cast<unsigned long long>(u) * blockDim.x + threadIdx.x;
        packed[v] = word;
        if (lane % kLanesPerGroup == 0) {
          const unsigned long long g = v / kLanesPerGroup;
          scales[g] = scale_h;
          zeros[g] = zero_h;
        }
      }
    }
  }
}

// The arithmetic measured on the H100 and H200 (README): fp32 min/max, two shuffles per
// level, rint through the conversion pipe, a near-tie test per element.
struct WarpCodes {
  template <int kLanesPerGroup>
  __device__ __forceinline__ uint32_t word(const uint4 raw, __half& scale_h, __half& zero_h) const {
    float x[kVec];
    halves_to_floats(raw, x);
    float lo = x[0];
    float hi = x[0];
#pragma unroll
    for (int e = 1; e < kVec; ++e) {
      lo = fminf(lo, x[e]);
      hi = fmaxf(hi, x[e]);
    }
#pragma unroll
    for (int off = 1; off < kLanesPerGroup; off <<= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    // + 0 maps -0 to +0: fminf/fmaxf may return either of two equal zeros, the stored
    // bits must not depend on that (the NumPy spec does the same)
    lo = __fadd_rn(lo, 0.0f);
    hi = __fadd_rn(hi, 0.0f);
    scale_h = __float2half_rn(__fdiv_rn(__fsub_rn(hi, lo), kLevels));
    zero_h = __float2half_rn(lo);
    const float sf = __half2float(scale_h);
    const float zf = __half2float(zero_h);
    uint32_t w = 0u;
    if (sf != 0.0f) {
      const float inv_sf = __frcp_rn(sf);
#pragma unroll
      for (int e = 0; e < kVec; ++e) w |= code_of(x[e], zf, sf, inv_sf) << (4 * e);
    }
    return w;
  }
};

// Eight values of one group from their code word (element e in nibble e).
__device__ __forceinline__ uint4 decode_word(uint32_t word, float zf, float sf) {
  float x[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) x[e] = dequant_value((word >> (4 * e)) & 0xFu, zf, sf);
  return floats_to_halves(x);
}

// One vector = one 4-byte code word in, one 16-byte store of 8 fp16 out. No cross-lane
// work, so a plain grid-stride loop; each thread loads U words (coalesced
// across the warp) before converting, to keep enough bytes in flight.
template <int G, class Addr, int U = kDequantUnroll, bool kEvictFirst = false>
__device__ __forceinline__ void dequantize_impl(const uint8_t* __restrict__ src,
                                                __half* __restrict__ dst,
                                                unsigned long long n, const Addr addr) {
  constexpr int kVecPerGroup = G / kVec;
  const unsigned long long num_vec = n / kVec;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(src);
  const __half* scales = reinterpret_cast<const __half*>(src + n / 2);
  const __half* zeros = scales + n / G;
  uint4* out = reinterpret_cast<uint4*>(dst);
  const unsigned long long tile = static_cast<unsigned long long>(U) * blockDim.x;
  const unsigned long long stride = tile * gridDim.x;

  for (unsigned long long base = tile * blockIdx.x; base < num_vec; base += stride) {
    uint32_t word[U];
    float sf[U];
    float zf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned long long v = base + static_cast<unsigned long long>(u) * blockDim.x + threadIdx.x;
      if (v < num_vec) {
        const unsigned long long g = v / kVecPerGroup;
        word[u] = __ldg(packed + v);
        sf[u] = __half2float(__ldg(scales + g));
        zf[u] = __half2float(__ldg(zeros + g));
      } else {
        word[u] = 0u;
        sf[u] = 0.0f;
        zf[u] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned long long v = base + static_cast<unsigned long long>(u) * blockDim.x + threadIdx.x;
      if (v < num_vec) {
        const uint4 x = decode_word(word[u], zf[u], sf[u]);
        if (kEvictFirst) {
          __stcs(out + addr(v), x);  // st.global.cs: the output is not read again soon
        } else {
          out[addr(v)] = x;
        }
      }
    }
  }
}

// Per-channel quantization of one row of `tokens` tokens of c channels, token t at
// src + t * stride (elements), into dst ([packed][scales c][zeros c]). Thread j of the
// grid-stride loop owns channels 8j..8j+7: a pass over the tokens for their min and max,
// then a second for the codes (the row is small: the re-read hits the cache). Channels is
// the arithmetic (WarpChannels below, LeanChannels of the faster variants): range() fills
// each channel's fp16-rounded zero and scale and the reciprocal, word() one token's codes.
// Column j of that row (channels 8j..8j+7): `seen(x, word, zf, sf)` is told each token's
// values and code word (the layer-row kernel's error sums; a no-op for the block kernels).
template <class Channels, class Seen>
__device__ __forceinline__ void quantize_channel_column(const __half* __restrict__ src,
                                                        uint8_t* __restrict__ dst,
                                                        unsigned tokens, unsigned c,
                                                        unsigned long long stride,
                                                        unsigned long long j, Seen& seen) {
  const unsigned long long half_n = static_cast<unsigned long long>(tokens) * c / 2;
  uint32_t* packed = reinterpret_cast<uint32_t*>(dst);
  uint4* scales = reinterpret_cast<uint4*>(dst + half_n);
  uint4* zeros = reinterpret_cast<uint4*>(dst + half_n + 2ull * c);
  const __half* col = src + j * kVec;
  float sf[kVec], zf[kVec], inv[kVec];
  Channels::range(col, tokens, stride, zf, sf, inv);
  scales[j] = floats_to_halves(sf);  // exact: sf and zf are fp16 values
  zeros[j] = floats_to_halves(zf);
  for (unsigned t = 0; t < tokens; ++t) {
    float x[kVec];
    halves_to_floats(__ldg(reinterpret_cast<const uint4*>(col + t * stride)), x);
    const uint32_t word = Channels::word(x, zf, sf, inv);
    packed[(static_cast<unsigned long long>(t) * c) / kVec + j] = word;
    seen(x, word, zf, sf);
  }
}

struct Unseen {
  __device__ __forceinline__ void operator()(const float (&)[kVec], uint32_t, const float (&)[kVec],
                                             const float (&)[kVec]) const {}
};

template <class Channels>
__device__ __forceinline__ void quantize_channels_impl(const __half* __restrict__ src,
                                                       uint8_t* __restrict__ dst,
                                                       unsigned tokens, unsigned c,
                                                       unsigned long long stride,
                                                       unsigned long long first,
                                                       unsigned long long step) {
  Unseen unseen;
  for (unsigned long long j = first; j < c / kVec; j += step) {
    quantize_channel_column<Channels>(src, dst, tokens, c, stride, j, unseen);
  }
}

// The arithmetic measured on the H200 (fp32 min/max, code_of per element).
struct WarpChannels {
  static __device__ __forceinline__ void range(const __half* col, unsigned tokens,
                                               unsigned long long stride, float (&zf)[kVec],
                                               float (&sf)[kVec], float (&inv)[kVec]) {
    float lo[kVec], hi[kVec];
    halves_to_floats(__ldg(reinterpret_cast<const uint4*>(col)), lo);
#pragma unroll
    for (int e = 0; e < kVec; ++e) hi[e] = lo[e];
    for (unsigned t = 1; t < tokens; ++t) {
      float x[kVec];
      halves_to_floats(__ldg(reinterpret_cast<const uint4*>(col + t * stride)), x);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        lo[e] = fminf(lo[e], x[e]);
        hi[e] = fmaxf(hi[e], x[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float l = __fadd_rn(lo[e], 0.0f);  // -0 -> +0, as in WarpCodes
      sf[e] = __half2float(__float2half_rn(__fdiv_rn(__fsub_rn(__fadd_rn(hi[e], 0.0f), l), kLevels)));
      zf[e] = __half2float(__float2half_rn(l));
      inv[e] = sf[e] != 0.0f ? __frcp_rn(sf[e]) : 0.0f;
    }
  }
  static __device__ __forceinline__ uint32_t word(const float (&x)[kVec], const float (&zf)[kVec],
                                                  const float (&sf)[kVec], const float (&inv)[kVec]) {
    uint32_t w = 0u;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (sf[e] != 0.0f) w |= code_of(x[e], zf[e], sf[e], inv[e]) << (4 * e);
    }
    return w;
  }
};

// Eight values of a per-token row (group size G) from element i (a multiple of 8) on.
template <int G>
__device__ __forceinline__ uint4 decode_token_vec(const uint8_t* __restrict__ row,
                                                  unsigned long long n, unsigned long long i) {
  const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(row) + i / kVec);
  const __half* scales = reinterpret_cast<const __half*>(row + n / 2);
  const float sf = __half2float(__ldg(scales + i / G));
  const float zf = __half2float(__ldg(scales + n / G + i / G));
  return decode_word(word, zf, sf);
}

// Eight values of a per-channel row of c channels (n = tokens * c elements) from element
// i (a multiple of 8) on: 8 channels of one token, their scales and zeros in one load each.
__device__ __forceinline__ uint4 decode_channel_vec(const uint8_t* __restrict__ row,
                                                    unsigned long long n, unsigned c,
                                                    unsigned long long i) {
  const unsigned cc = static_cast<unsigned>(i % c);
  const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(row) + i / kVec);
  float sf[kVec], zf[kVec];
  halves_to_floats(__ldg(reinterpret_cast<const uint4*>(row + n / 2 + 2ull * cc)), sf);
  halves_to_floats(__ldg(reinterpret_cast<const uint4*>(row + n / 2 + 2ull * c + 2ull * cc)), zf);
  float x[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) x[e] = dequant_value((word >> (4 * e)) & 0xFu, zf[e], sf[e]);
  return floats_to_halves(x);
}

// A scenario KV block [bt][2][c] fp16 (token-major: a token's keys of every layer and
// head, then its values; c = L*H*D) <-> the channel-key INT4 layout of
// synapse/hw/kv_layout.py: [keys: per-channel row of bt x c][values: per-token row of
// bt*c elements, groups of G]. blockIdx.y == 0 works on the keys, == 1 on the values
// (quantize_impl / dequantize_impl over rows of c elements 2c apart). Contracts (checked by
// kernels.py): c % G == 0, bt % 4 == 0, bt * c / 8 < 2^32, both pointers 16-byte aligned.
// Launch: gridDim.y == 2, grid-stride in x.
// Codes: the value rows' arithmetic (WarpCodes, LeanCodes); Channels: the key row's
// (WarpChannels, LeanChannels).
template <int G, class Codes, class Channels>
__device__ __forceinline__ void block_quantize_kc(const __half* __restrict__ src,
                                                  uint8_t* __restrict__ dst, unsigned bt,
                                                  unsigned c) {
  const unsigned long long n = static_cast<unsigned long long>(bt) * c;
  if (blockIdx.y == 0) {
    quantize_channels_impl<Channels>(src, dst, bt, c, 2ull * c,
                                     static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x,
                                     static_cast<unsigned long long>(gridDim.x) * blockDim.x);
  } else {
    quantize_impl<G, Strided, Codes, kQuantUnroll>(src + c, dst + n / 2 + 4ull * c, n,
                                                   Strided{c / kVec, 2 * c / kVec}, Codes{});
  }
}

template <int G>
__device__ __forceinline__ void block_dequantize_kc(const uint8_t* __restrict__ src,
                                                    __half* __restrict__ dst, unsigned bt,
                                                    unsigned c) {
  const unsigned long long n = static_cast<unsigned long long>(bt) * c;
  if (blockIdx.y == 0) {
    const Strided addr{c / kVec, 2 * c / kVec};
    uint4* out = reinterpret_cast<uint4*>(dst);
    for (unsigned long long v = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         v < n / kVec; v += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
      out[addr(v)] = decode_channel_vec(src, n, c, v * kVec);
    }
  } else {
    dequantize_impl<G>(src + n / 2 + 4ull * c, dst + c, n, Strided{c / kVec, 2 * c / kVec});
  }
}

// One layer's keys (blockIdx.y == 0) and values (== 1) for attention, assembled in one pass
// (synapse/hf/cache.py, read-through of an INT4 L2): output token j of [0, n_tok) is
//   j <  cut            : l1[j]                      (the L1 arena's full blocks)
//   j <  cut + m * bt   : dequant(block (j - cut) / bt of rows)  (the layer's L2 blocks)
//   otherwise           : l1[j - m * bt]             (the tail block and this step's tokens)
// l1k / l1v: the layer's planes, [tokens][tok_elems] fp16; rows: m layer rows
// (synapse/hf/int4.py), each the block's key row then its value row for n = bt * tok_elems
// elements: the value row per token (n/2 + 4n/G bytes), the key row per channel
// (key_channel != 0: n/2 + 4 * tok_elems bytes, one group per element of a token) or per
// token; outk / outv: [n_tok][tok_elems]. Dequantization is bit-exact with
// int4_dequantize and synapse/hf/int4.py. Contracts (checked by the caller):
// tok_elems % 8 == 0, bt % 4 == 0, every pointer 16-byte aligned. Launch: 2-D grid,
// gridDim.y == 2, grid-stride in x.
template <int G>
__device__ __forceinline__ void assemble_impl(const __half* __restrict__ l1k,
                                              const __half* __restrict__ l1v,
                                              const uint8_t* __restrict__ rows,
                                              __half* __restrict__ outk, __half* __restrict__ outv,
                                              unsigned cut, unsigned m, unsigned bt,
                                              unsigned tok_elems, unsigned n_tok,
                                              unsigned key_channel) {
  const bool is_v = blockIdx.y == 1;
  const bool channel = !is_v && key_channel != 0u;
  const __half* l1 = is_v ? l1v : l1k;
  __half* out = is_v ? outv : outk;
  const unsigned long long row_elems = static_cast<unsigned long long>(bt) * tok_elems;
  const unsigned long long token_row = row_elems / 2 + 4 * (row_elems / G);
  const unsigned long long key_row = key_channel ? row_elems / 2 + 4ull * tok_elems : token_row;
  const unsigned long long stride = key_row + token_row;  // one layer row
  const uint8_t* base = rows + (is_v ? key_row : 0ull);
  const unsigned long long vec_per_tok = tok_elems / kVec;
  const unsigned long long total = static_cast<unsigned long long>(n_tok) * vec_per_tok;
  const unsigned long long lo = static_cast<unsigned long long>(cut) * vec_per_tok;
  const unsigned long long hi = lo + static_cast<unsigned long long>(m) * bt * vec_per_tok;
  const unsigned long long shift = hi - lo;
  const uint4* in = reinterpret_cast<const uint4*>(l1);
  uint4* dst = reinterpret_cast<uint4*>(out);
  for (unsigned long long v = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
       v < total; v += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    if (v < lo) {
      dst[v] = __ldg(in + v);
    } else if (v >= hi) {
      dst[v] = __ldg(in + (v - shift));
    } else {
      const unsigned long long e = (v - lo) * kVec;       // element in the L2 run
      const unsigned long long r = e / row_elems;         // its row (block)
      const unsigned long long i = e - r * row_elems;     // element within the row
      const uint8_t* row = base + r * stride;
      dst[v] = channel ? decode_channel_vec(row, row_elems, tok_elems, i)
                       : decode_token_vec<G>(row, row_elems, i);
    }
  }
}

// =====================================================================================
// Faster variants of int4_quantize / int4_dequantize (same bytes; synapse/hw/kernels.py
// picks one with QUANT_VARIANT / DEQUANT_VARIANT, benchmarks/int4_kernels.py times them;
// tests/test_int4_variants.py transcribes their arithmetic and indexing to NumPy).
//
// Why: on an H100 (132 SMs) the warp kernel ran at 2272 GB/s with the issue slots 73% busy
// (Nsight Compute, README). The H200 has the same SMs and clocks and a faster HBM: at the
// same instructions per byte, 90% of its copy (3793 GB/s) would need 73% * 3793 / 2272 =
// 122% of the issue slots. So the variants first cut instructions per element and, in
// "staged", keep the loads in flight without registers or load instructions:
//
// * "lean" (quantize): the warp kernel's data mapping, cheaper arithmetic. Min and max
//   are taken on half2 pairs (exact: a min is one of its inputs) and a group's (min,
//   -max) travels as one half2 through the shuffles, one shuffle and one HMNMX2 per level
//   instead of two and two. Codes are rounded by adding 1.5 * 2^23 (t + M rounds t to an
//   integer, ties to even, into the low mantissa bits: rint without the conversion pipe),
//   the clamp to 15 comes before the rounding (rint is monotone and 15 an integer), and
//   the near-tie test is accumulated over the 8 elements into one predicate, so the exact
//   division runs for a whole vector only when some element needs it. "lean4": the same
//   with 4 vectors per thread in flight instead of 2 (48 registers: 5 CTAs per SM, not 8).
// * "staged" (quantize): the Tensor Memory Accelerator's bulk copy (cp.async.bulk, one
//   instruction per 16 KiB tile) streams tiles into shared memory two stages deep while
//   the previous tile is reduced, so bytes in flight no longer cost registers or issue
//   slots. Pass 1: one thread per group reads its group from shared memory (rotated start
//   vector: conflict-free banks) and computes scale, zero and reciprocal once, not once
//   per lane of the group. Pass 2: lanes take consecutive vectors again (conflict-free,
//   coalesced 4-byte code stores) with lean's per-element arithmetic.
// * "staged" (dequantize): the warp kernel's loads, but the fp16 output (78% of the bytes)
//   goes to shared memory and out by one bulk store per tile (full-line writes, no
//   per-thread store instructions).
// * "stream" (dequantize): the warp kernel with evict-first stores (st.global.cs): the
//   output of a calibrate-sized call (128 MiB) is larger than L2 and is not read back.
// * "bulk", "bulk4k" (dequantize): staged's bulk stores, and the input also without
//   registers: each tile's codes by one bulk load and its scales and zeros by 4-byte
//   cp.async copies, several tiles in flight per CTA (2 of 8192 elements, or 4 of 4096 at
//   8 CTAs per SM), completion on one mbarrier per input stage; the arithmetic from shared
//   memory in about two thirds of staged's instructions per vector (decode_word_fma: codes
//   to floats by byte permutes instead of shifts and conversions, one fma instead of a
//   multiply and an add, bit-identical) and one __syncthreads per tile.
// * kv_block_quantize_int4_kc_lean (KV_QUANT_VARIANT): the channel-key block kernel with
//   lean's arithmetic in its value rows (LeanCodes) and its key row (LeanChannels).
// Contracts as for int4_quantize / int4_dequantize; the staged and bulk kernels also need
// their static shared memory (up to about 42 KiB) and must be launched 1-D with blockDim.x
// == kThreads; the bulk kernels n < 2^40.
// =====================================================================================

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: ulp 1 over [2^23, 2^24)
// A reciprocal-multiplied quotient is within ~1e-6 of the IEEE one (|t| <= 22.5 here):
// outside this distance of a .5 both round alike.
constexpr float kNearTie = 0.5f - 1.0e-4f;

// (min, -max) of 8 fp16 values as one half2: a later min of two such pairs is the pair of
// the union, so one HMNMX2 serves both ends.
__device__ __forceinline__ __half2 minmax_pair(const uint4 raw) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
  const __half2 mn = __hmin2(__hmin2(h[0], h[1]), __hmin2(h[2], h[3]));
  const __half2 mx = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
  const __half2 nmx = __hneg2(mx);
  return __hmin2(__lows2half2(mn, nmx), __highs2half2(mn, nmx));
}

struct GroupCode {
  __half scale, zero;
  float zf, sf, inv;  // inv = 0 when sf = 0: then every t is 0 and every code 0, no branch
};

// The group's stored scale and zero from its (min, -max), exactly as quantize_impl: the
// + 0 maps -0 to +0 (which of two equal zeros a min returns is unspecified).
__device__ __forceinline__ GroupCode group_code(const __half2 pair) {
  const float lo = __fadd_rn(__low2float(pair), 0.0f);
  const float hi = __fadd_rn(-__high2float(pair), 0.0f);
  GroupCode g;
  g.scale = __float2half_rn(__fdiv_rn(__fsub_rn(hi, lo), kLevels));
  g.zero = __float2half_rn(lo);
  g.sf = __half2float(g.scale);
  g.zf = __half2float(g.zero);
  g.inv = g.sf != 0.0f ? __frcp_rn(g.sf) : 0.0f;
  return g;
}

// The code word of 8 values, value e of the group with zf[e], sf[e], inv[e] (one group for
// all 8 in a per-token row, 8 channels' groups in a per-channel row), bit-exact with
// code_of. t >= 0 because zf is the group's exact minimum; after the clamp t + M lies in
// [M, M + 15], so its low nibble is the code. Two codes become a byte with one shift-add
// ((b1 << 4) + b0: b0's junk starts above bit 3, b1's above bit 7), four bytes a word
// with three byte permutes.
__device__ __forceinline__ uint32_t lean_codes8(const float (&x)[kVec], const float (&zf)[kVec],
                                                const float (&sf)[kVec], const float (&inv)[kVec]) {
  uint32_t b[kVec];
  bool near_tie = false;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float t = fminf(__fmul_rn(__fsub_rn(x[e], zf[e]), inv[e]), kLevels);
    const float y = __fadd_rn(t, kRoundMagic);
    near_tie |= fabsf(__fsub_rn(t, __fsub_rn(y, kRoundMagic))) > kNearTie;
    b[e] = __float_as_uint(y);
  }
  uint32_t p[kVec / 2];
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) p[i] = (b[2 * i + 1] << 4) + b[2 * i];
  uint32_t word = __byte_perm(__byte_perm(p[0], p[1], 0x0040), __byte_perm(p[2], p[3], 0x0040), 0x5410);
  if (near_tie) {  // rare: some element is within 1e-4 of a .5, take the IEEE quotient
    word = 0u;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int q = sf[e] != 0.0f ? __float2int_rn(__fdiv_rn(__fsub_rn(x[e], zf[e]), sf[e])) : 0;
      word |= static_cast<uint32_t>(min(max(q, 0), 15)) << (4 * e);
    }
  }
  return word;
}

__device__ __forceinline__ uint32_t lean_word(const uint4 raw, float zf, float sf, float inv) {
  float x[kVec], z[kVec], s[kVec], r[kVec];
  halves_to_floats(raw, x);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    z[e] = zf;
    s[e] = sf;
    r[e] = inv;
  }
  return lean_codes8(x, z, s, r);
}

// WarpChannels with lean's arithmetic: the per-channel min and max over the tokens on
// half2 pairs (4 + 4 HMNMX2 per token for 8 channels instead of 16 FMNMX), lean_codes8.
struct LeanChannels {
  static __device__ __forceinline__ void range(const __half* col, unsigned tokens,
                                               unsigned long long stride, float (&zf)[kVec],
                                               float (&sf)[kVec], float (&inv)[kVec]) {
    const uint4 raw0 = __ldg(reinterpret_cast<const uint4*>(col));
    __half2 mn[kVec / 2], mx[kVec / 2];
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) mn[i] = mx[i] = reinterpret_cast<const __half2*>(&raw0)[i];
    for (unsigned t = 1; t < tokens; ++t) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(col + t * stride));
      const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec / 2; ++i) {
        mn[i] = __hmin2(mn[i], h[i]);
        mx[i] = __hmax2(mx[i], h[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kVec / 2; ++i) {
      const __half2 nmx = __hneg2(mx[i]);
      const GroupCode even = group_code(__lows2half2(mn[i], nmx));
      const GroupCode odd = group_code(__highs2half2(mn[i], nmx));
      zf[2 * i] = even.zf, sf[2 * i] = even.sf, inv[2 * i] = even.inv;
      zf[2 * i + 1] = odd.zf, sf[2 * i + 1] = odd.sf, inv[2 * i + 1] = odd.inv;
    }
  }
  static __device__ __forceinline__ uint32_t word(const float (&x)[kVec], const float (&zf)[kVec],
                                                  const float (&sf)[kVec], const float (&inv)[kVec]) {
    return lean_codes8(x, zf, sf, inv);
  }
};

struct LeanCodes {
  template <int kLanesPerGroup>
  __device__ __forceinline__ uint32_t word(const uint4 raw, __half& scale_h, __half& zero_h) const {
    __half2 pair = minmax_pair(raw);
#pragma unroll
    for (int off = 1; off < kLanesPerGroup; off <<= 1) {
      const uint32_t other = __shfl_xor_sync(0xffffffffu, *reinterpret_cast<uint32_t*>(&pair), off);
      pair = __hmin2(pair, *reinterpret_cast<const __half2*>(&other));
    }
    const GroupCode g = group_code(pair);
    scale_h = g.scale;
    zero_h = g.zero;
    return lean_word(raw, g.zf, g.sf, g.inv);
  }
};

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// 8192 elements, 16 KiB of fp16 per stage; kThreads * STAGED_VECS_PER_THREAD in kernels.py
constexpr int kStageVecs = kThreads * 4;
constexpr int kStages = 2;  // two tiles per CTA in shared memory: ~35 KiB, 6 CTAs per SM

// ---- Tensor Memory Accelerator bulk copies and mbarriers (PTX ISA 8.0, sm_90)

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Shared memory that the threads read (generic proxy) is about to be written by the TMA
// (async proxy), or the reverse: order the two.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Arm `bar` for `bytes` and start the bulk copy global -> shared that completes it.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return done != 0;
}

// A tile lands in microseconds; a bulk copy that never completes (a bug, a bad address)
// traps after ~2^26 polls (seconds) instead of hanging the GPU, so the benchmark's child
// process reports an error and the session goes on.
constexpr uint32_t kMaxPolls = 1u << 26;

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  for (uint32_t polls = 0; !mbar_try_wait(bar, parity);) {
    if (++polls == kMaxPolls) __trap();
  }
}

__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
               ::"l"(dst), "r"(smem_addr(src)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Wait until at most N bulk stores still read their shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void bulk_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Where the thread that owns a group starts reading it, in vectors: lanes 8 apart meet in
// the same banks otherwise (a group is 64, 128 or 256 bytes), so each lane of a quarter
// warp starts on a different 16-byte bank quad. G = 32 (4 vectors): pairs of lanes share
// a rotation, their groups sit 64 bytes apart, i.e. on the other half of the banks.
template <int V>
__device__ __forceinline__ unsigned group_rotation(unsigned lane) {
  return V >= 8 ? lane % V : (lane >> 1) % V;
}

template <int G>
__device__ __forceinline__ void quantize_staged_impl(const __half* __restrict__ src,
                                                     uint8_t* __restrict__ dst,
                                                     unsigned long long n) {
  constexpr int V = G / kVec;
  constexpr int kTileGroups = kStageVecs / V;
  __shared__ __align__(128) uint4 stage[kStages][kStageVecs];
  __shared__ float4 params[kTileGroups];  // zf, sf, inv of the tile's groups
  __shared__ __align__(8) uint64_t full[kStages];
  const unsigned long long num_vec = n / kVec;
  const unsigned long long num_tiles = (num_vec + kStageVecs - 1) / kStageVecs;
  uint32_t* packed;
  __half *scales, *zeros;
  quantized_sections<G>(dst, n, packed, scales, zeros);
  const uint4* in = reinterpret_cast<const uint4*>(src);
  auto tile_vecs = [&](unsigned long long t) {
    return static_cast<unsigned>(min(static_cast<unsigned long long>(kStageVecs), num_vec - t * kStageVecs));
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s]);
    mbar_fence_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      const unsigned long long t = blockIdx.x + static_cast<unsigned long long>(s) * gridDim.x;
      if (t < num_tiles) bulk_load(stage[s], in + t * kStageVecs, tile_vecs(t) * 16u, &full[s]);
    }
  }
  unsigned k = 0;
  for (unsigned long long t = blockIdx.x; t < num_tiles; t += gridDim.x, ++k) {
    const unsigned s = k % kStages;
    mbar_wait(&full[s], (k / kStages) & 1u);
    const unsigned vecs = tile_vecs(t);
    const uint4* tile = stage[s];
    // pass 1: thread g reduces group g of the tile
    for (unsigned g = threadIdx.x; g < vecs / V; g += blockDim.x) {
      const unsigned rot = group_rotation<V>(g & 31u);
      __half2 mn = __float2half2_rn(65504.0f);
      __half2 mx = __float2half2_rn(-65504.0f);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const uint4 raw = tile[g * V + (j + rot) % V];
        const __half2* h = reinterpret_cast<const __half2*>(&raw);
        mn = __hmin2(__hmin2(mn, h[0]), __hmin2(h[1], __hmin2(h[2], h[3])));
        mx = __hmax2(__hmax2(mx, h[0]), __hmax2(h[1], __hmax2(h[2], h[3])));
      }
      const __half2 nmx = __hneg2(mx);
      const GroupCode c = group_code(__hmin2(__lows2half2(mn, nmx), __highs2half2(mn, nmx)));
      params[g] = make_float4(c.zf, c.sf, c.inv, 0.0f);
      const unsigned long long gg = t * kTileGroups + g;
      scales[gg] = c.scale;
      zeros[gg] = c.zero;
    }
    __syncthreads();
    // pass 2: consecutive vectors per lane, as in the warp kernel
#pragma unroll 2
    for (unsigned v = threadIdx.x; v < vecs; v += blockDim.x) {
      const float4 p = params[v / V];
      packed[t * kStageVecs + v] = lean_word(tile[v], p.x, p.y, p.z);
    }
    __syncthreads();  // stage s and params are free again
    if (threadIdx.x == 0) {
      const unsigned long long next = t + static_cast<unsigned long long>(kStages) * gridDim.x;
      if (next < num_tiles) {
        fence_proxy_async();
        bulk_load(stage[s], in + next * kStageVecs, tile_vecs(next) * 16u, &full[s]);
      }
    }
  }
}

template <int G>
__device__ __forceinline__ void dequantize_staged_impl(const uint8_t* __restrict__ src,
                                                       __half* __restrict__ dst,
                                                       unsigned long long n) {
  constexpr int kVecPerGroup = G / kVec;
  constexpr int U = kStageVecs / kThreads;
  __shared__ __align__(128) uint4 stage[kStages][kStageVecs];
  const unsigned long long num_vec = n / kVec;
  const unsigned long long num_tiles = (num_vec + kStageVecs - 1) / kStageVecs;
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(src);
  const __half* scales = reinterpret_cast<const __half*>(src + n / 2);
  const __half* zeros = scales + n / G;
  uint4* out = reinterpret_cast<uint4*>(dst);
  unsigned k = 0;
  for (unsigned long long t = blockIdx.x; t < num_tiles; t += gridDim.x, ++k) {
    const unsigned s = k % kStages;
    const unsigned long long base = t * kStageVecs;
    const unsigned vecs = static_cast<unsigned>(min(static_cast<unsigned long long>(kStageVecs), num_vec - base));
    uint32_t word[U];
    float sf[U], zf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // loads first: they do not touch the stage
      const unsigned v = threadIdx.x + u * kThreads;
      const unsigned long long g = (base + v) / kVecPerGroup;
      const bool on = v < vecs;
      word[u] = on ? __ldg(packed + base + v) : 0u;
      sf[u] = on ? __half2float(__ldg(scales + g)) : 0.0f;
      zf[u] = on ? __half2float(__ldg(zeros + g)) : 0.0f;
    }
    if (threadIdx.x == 0) bulk_wait_read<kStages - 1>();  // the store of tile k - kStages
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned v = threadIdx.x + u * kThreads;
      if (v < vecs) stage[s][v] = decode_word(word[u], zf[u], sf[u]);
    }
    fence_proxy_async();  // each writer: its shared stores before the TMA reads them
    __syncthreads();
    if (threadIdx.x == 0) bulk_store(out + base, stage[s], vecs * 16u);
  }
  if (threadIdx.x == 0) bulk_wait_all();  // shared memory must outlive the stores' reads
}

// ---- "bulk" dequantize: bulk loads of the codes, tiles in flight (see "Faster variants")

constexpr float kIntMagic = 8388608.0f;  // 2^23: the float with bits 0x4B000000 | m is 2^23 + m

// Code B of the byte-per-code word `nibbles` as a float: the byte permute puts it under the
// exponent of 2^23 (bits 0x4B000000 | code, i.e. 2^23 + code), the subtraction of 2^23 is
// exact. No int-to-float conversion. The constant goes first and the selector is an
// immediate (asm): the other way round ptxas keeps four selectors in registers and, at 32
// registers, rebuilds them for every vector.
template <int B>
__device__ __forceinline__ float code_float(uint32_t nibbles) {
  uint32_t bits;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(bits) : "r"(0x4B000000u), "r"(nibbles), "n"(0x3004 + B));
  return __fsub_rn(__uint_as_float(bits), kIntMagic);
}

// decode_word's bytes with fewer instructions. dequant_value rounds code * scale and then
// the sum; one fma rounds once, and that is the same: code < 16 (4 bits) times an fp16
// scale (11 significant bits, magnitude 0 or at least 2^-24) is exact in fp32, so the
// product's rounding is the identity, for every finite scale and also for zeros of either
// sign (the exact product and the sum take the signs that FMUL then FADD give).
__device__ __forceinline__ uint4 decode_word_fma(uint32_t word, float zf, float sf) {
  const uint32_t even = word & 0x0F0F0F0Fu;        // codes 0, 2, 4, 6: one per byte
  const uint32_t odd = (word >> 4) & 0x0F0F0F0Fu;  // codes 1, 3, 5, 7
  const float x[kVec] = {
      __fmaf_rn(code_float<0>(even), sf, zf), __fmaf_rn(code_float<0>(odd), sf, zf),
      __fmaf_rn(code_float<1>(even), sf, zf), __fmaf_rn(code_float<1>(odd), sf, zf),
      __fmaf_rn(code_float<2>(even), sf, zf), __fmaf_rn(code_float<2>(odd), sf, zf),
      __fmaf_rn(code_float<3>(even), sf, zf), __fmaf_rn(code_float<3>(odd), sf, zf)};
  return floats_to_halves(x);
}

// The two shapes (BULK*_VECS_PER_THREAD in kernels.py): vectors per tile and tiles in
// flight per CTA (codes, scales and zeros); two fp16 tiles per CTA are being stored.
// "bulk": 8192 elements per tile, 2 input tiles (4 KiB of codes each) + 2 fp16 tiles (16
//   KiB each): ~42 KiB of static shared memory, 5 CTAs per SM, 4 vectors per thread per tile.
// "bulk4k": 4096 elements per tile, 4 input tiles (2 KiB of codes) + 2 fp16 tiles (8 KiB):
//   ~26 KiB, 8 CTAs per SM (launch bounds: 32 registers), 2 vectors per thread per tile.
constexpr int kBulkVecs = kThreads * 4;
constexpr int kBulkInStages = 2;
constexpr int kBulk4kVecs = kThreads * 2;
constexpr int kBulk4kInStages = 4;

// 4 bytes global -> shared without registers (cp.async: generic proxy, weak, no ordering
// with other memory operations, so no fence waits for it); the smallest size it copies.
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

// One arrival on `bar` once this thread's cp.async copies so far have landed (counted in
// the barrier's init count).
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_init_count(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Tiles t = blockIdx.x + k * gridDim.x, k = 0, 1, ... Input stage s = k % kInStages holds
// tile k's codes (one bulk load by thread 0) and its scales and zeros, and completes
// mbarrier full[s] at parity (k / kInStages) & 1; a stage is refilled with tile k +
// kInStages as soon as everyone has read it. The scales and zeros are 2-byte values whose
// section need not start 16-byte aligned (n / G odd), so no bulk copy: threads i <
// kCopyThreads copy 4-byte words with cp.async, the words around the tile's halves (a whole
// buffer is a multiple of 4 bytes from a 16-byte aligned start, so they stay inside it;
// zeros start 2 bytes into a word when n / G is odd, zoff), and each arrives on full[s]
// once its copies have landed: full[s] counts 1 + kCopyThreads arrivals and the codes'
// bytes. No loads through registers, so no fence below ever waits for one. The fp16 output
// goes to stage[k & 1] and out by one bulk store per tile. One __syncthreads per tile
// orders the rest: before it every thread has read input stage s and written stage[k & 1],
// and thread 0 has waited until the bulk store of tile k - 1 (issued one tile earlier) has
// read stage[(k + 1) & 1], which tile k + 1 writes. Contracts as int4_dequantize, and
// n < 2^40 (32-bit tile indices; kernels.py checks).
template <int G, int kTileVecs, int kInStages>
__device__ __forceinline__ void dequantize_bulk_impl(const uint8_t* __restrict__ src,
                                                     __half* __restrict__ dst,
                                                     unsigned long long n) {
  constexpr int V = G / kVec;
  constexpr int kTileGroups = kTileVecs / V;
  constexpr int kCopyThreads = kTileGroups / 2 + 1;  // zero words of a tile, at most
  static_assert(kTileVecs % kThreads == 0 && kCopyThreads <= kThreads && kTileGroups % 2 == 0,
                "tile shape");
  static_assert(kInStages >= 2, "a stage is refilled while the next one is read");
  __shared__ __align__(128) uint32_t codes[kInStages][kTileVecs];
  __shared__ __align__(128) uint4 stage[2][kTileVecs];
  __shared__ uint32_t scale_w[kInStages][kTileGroups / 2];
  __shared__ uint32_t zero_w[kInStages][kTileGroups / 2 + 1];
  __shared__ __align__(8) uint64_t full[kInStages];
  const unsigned long long num_vec = n / kVec;
  const unsigned long long num_groups = n / G;
  const unsigned num_tiles = static_cast<unsigned>((num_vec + kTileVecs - 1) / kTileVecs);
  const unsigned last_vecs = static_cast<unsigned>(num_vec - static_cast<unsigned long long>(num_tiles - 1) * kTileVecs);
  const unsigned grid = gridDim.x;
  const unsigned zoff = static_cast<unsigned>(num_groups & 1u);
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(src);
  const uint32_t* scale_words = reinterpret_cast<const uint32_t*>(src + n / 2);
  const uint32_t* zero_words = reinterpret_cast<const uint32_t*>(src + n / 2 + 2 * (num_groups - zoff));
  uint4* out = reinterpret_cast<uint4*>(dst);
  // every byte count is a multiple of 16: a tile holds whole groups of 4 or more vectors
  auto tile_vecs = [&](unsigned t) { return t + 1 < num_tiles ? static_cast<unsigned>(kTileVecs) : last_vecs; };
  auto load_input = [&](unsigned t, unsigned s) {
    const unsigned vecs = tile_vecs(t);
    if (threadIdx.x == 0) {
      bulk_load(codes[s], packed + static_cast<unsigned long long>(t) * kTileVecs, vecs * 4u, &full[s]);
    }
    if (threadIdx.x < kCopyThreads) {
      const unsigned i = threadIdx.x;
      const unsigned m = vecs / V;  // groups
      const unsigned long long w = static_cast<unsigned long long>(t) * (kTileGroups / 2) + i;
      if (i < (m + 1) / 2) cp_async4(&scale_w[s][i], scale_words + w);
      if (i < (m + zoff + 1) / 2) cp_async4(&zero_w[s][i], zero_words + w);
      cp_async_arrive(&full[s]);
    }
  };

  if (threadIdx.x == 0) {
    for (int s = 0; s < kInStages; ++s) mbar_init_count(&full[s], 1 + kCopyThreads);
    mbar_fence_init();
  }
  __syncthreads();  // the barriers' init, before anyone arrives on them
  for (int s = 0; s < kInStages; ++s) {
    const unsigned t = blockIdx.x + s * grid;
    if (t < num_tiles) load_input(t, s);
  }
  unsigned k = 0;
  for (unsigned t = blockIdx.x; t < num_tiles; t += grid, ++k) {
    const unsigned s = k % kInStages;
    const unsigned p = k & 1u;
    const unsigned vecs = tile_vecs(t);
    mbar_wait(&full[s], (k / kInStages) & 1u);
    const __half* sc = reinterpret_cast<const __half*>(scale_w[s]);
    const __half* ze = reinterpret_cast<const __half*>(zero_w[s]) + zoff;
    auto decode = [&](unsigned v) {
      stage[p][v] = decode_word_fma(codes[s][v], __half2float(ze[v / V]), __half2float(sc[v / V]));
    };
    if (vecs == kTileVecs) {  // all tiles but the last: no bounds test per vector
#pragma unroll
      for (int u = 0; u < kTileVecs / kThreads; ++u) decode(threadIdx.x + u * kThreads);
    } else {
#pragma unroll
      for (int u = 0; u < kTileVecs / kThreads; ++u) {
        if (threadIdx.x + u * kThreads < vecs) decode(threadIdx.x + u * kThreads);
      }
    }
    fence_proxy_async();  // each writer: its shared stores before the TMA reads them
    if (threadIdx.x == 0) bulk_wait_read<0>();  // tile k - 1's store has read stage[p ^ 1]
    __syncthreads();
    if (threadIdx.x == 0) {
      bulk_store(out + static_cast<unsigned long long>(t) * kTileVecs, stage[p], vecs * 16u);
      fence_proxy_async();  // codes[s] was read by the threads (generic proxy): before the refill
    }
    const unsigned next = t + kInStages * grid;
    if (next < num_tiles) load_input(next, s);
  }
  if (threadIdx.x == 0) bulk_wait_all();  // shared memory must outlive the stores' reads
}

#else  // below sm_90 the staged kernels exist but trap; kernels.py refuses to launch them

template <int G>
__device__ __forceinline__ void quantize_staged_impl(const __half*, uint8_t*, unsigned long long) {
  __trap();
}

template <int G>
__device__ __forceinline__ void dequantize_staged_impl(const uint8_t*, __half*, unsigned long long) {
  __trap();
}

template <int G, int kTileVecs, int kInStages>
__device__ __forceinline__ void dequantize_bulk_impl(const uint8_t*, __half*, unsigned long long) {
  __trap();
}

#endif

// =====================================================================================
// Layer rows of the transformers cache's demotions (synapse/kv/torch_backend.py, Quantize),
// every row of every layer in one launch: rows r in [0, rows) of keys k and values v, each
// bt tokens x c fp16 (n = bt * c elements, C order), into layer rows of
// synapse/hf/int4.py quantize_layer_rows, row r at dst + r * row_bytes:
//   key row:   per channel (key_channel != 0): [codes n/2][scales fp16 c][zeros fp16 c],
//              one group per column over the bt tokens; else per token, as the value row
//   value row: [codes n/2][scales fp16 n/G][zeros fp16 n/G], groups of G along the row
// bit for bit (lean's arithmetic: LeanChannels for a per-channel key row, LeanCodes for
// per-token rows), and the telemetry of int4_rel_rmse: sums[0] += sum((x_hat - x)^2),
// sums[1] += sum(x^2) over every element of both, x_hat = zf + q * sf in fp32 as
// dequantize_layer_rows(..., float32) gives it. The sums are fp32 within a vector of 8 (a
// column of bt x 8 for per-channel keys), fp64 per thread, then one fp64 atomicAdd per
// warp: their last bits depend on the order in which warps finish (torch ops sum in
// another order too); the bytes do not.
// Where row r of k or v starts (RowRuns): in runs of run_rows rows n elements apart, runs
// run_stride elements apart (the backend's gathered [L][2][blocks][n]: keys at k, values
// at k + blocks * n, run_rows = blocks, run_stride = 2 * blocks * n; plain [rows][n]:
// run_rows = rows). Contracts (kernels.py checks): c % G == 0, bt % 4 == 0 (so row_bytes,
// the key row and the per-channel scales and zeros are multiples of 16 bytes, for the
// 16-byte stores; per-token scales and zeros need 2), rows * n / 8 < 2^32,
// run_stride % 8 == 0, k, v, dst 16-byte and sums 8-byte aligned, input finite, no
// overlap of dst with k, v or sums. Launch: gridDim.y == 2 (0: keys, 1: values),
// blockDim.x == kThreads, grid-stride in x.

// Start of row r, in elements.
struct RowRuns {
  unsigned run_rows;
  unsigned long long run_stride;
  unsigned long long n;
  __device__ __forceinline__ unsigned long long operator()(unsigned r) const {
    const unsigned run = r / run_rows;
    return static_cast<unsigned long long>(run) * run_stride +
           static_cast<unsigned long long>(r - run * run_rows) * n;
  }
};

// Squared reconstruction errors and squared values of one piece of work (a vector of 8,
// or a column of a per-channel row: bt * 8 elements), in fp32.
struct SquareSums {
  float err = 0.0f;
  float ref = 0.0f;
  __device__ __forceinline__ void operator()(const float (&x)[kVec], uint32_t word,
                                             const float (&zf)[kVec], const float (&sf)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float d = __fsub_rn(dequant_value((word >> (4 * i)) & 0xFu, zf[i], sf[i]), x[i]);
      err = fmaf(d, d, err);
      ref = fmaf(x[i], x[i], ref);
    }
  }
};

// A thread's sums over its pieces, in fp64.
struct ThreadSums {
  double err = 0.0;
  double ref = 0.0;
  __device__ __forceinline__ void add(const SquareSums& piece) {
    err += static_cast<double>(piece.err);
    ref += static_cast<double>(piece.ref);
  }
  // the warp's sums into sums[0], sums[1]; every lane of the warp must call it
  __device__ __forceinline__ void add_to(double* sums) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      err += __shfl_xor_sync(0xffffffffu, err, off);
      ref += __shfl_xor_sync(0xffffffffu, ref, off);
    }
    if ((threadIdx.x & 31u) == 0u) {
      atomicAdd(sums, err);
      atomicAdd(sums + 1, ref);
    }
  }
};

// Per-token rows (groups of G along the row) of `rows` rows: quantize_impl's data mapping
// (vector v of the launch = element 8v of the rows back to back, tiles warp-aligned, a
// group's lanes one butterfly), each vector's row and place in it from v. A group never
// spans two rows (n % G == 0), so the inactive lanes of the last tile form whole groups.
// dst: the part's start in row 0 (the key row, or the value row at the key row's end).
template <int G, int U>
__device__ __forceinline__ void layer_rows_tokens(const __half* __restrict__ src,
                                                  const RowRuns at, uint8_t* __restrict__ dst,
                                                  unsigned long long row_bytes, unsigned rows,
                                                  ThreadSums& sums) {
  constexpr int kLanesPerGroup = G / kVec;
  const unsigned long long n = at.n;
  const unsigned row_vecs = static_cast<unsigned>(n / kVec);
  const unsigned long long num_vec = static_cast<unsigned long long>(rows) * row_vecs;
  const unsigned lane = threadIdx.x & 31u;
  const unsigned long long tile = static_cast<unsigned long long>(U) * blockDim.x;
  const unsigned long long stride = tile * gridDim.x;

  for (unsigned long long base = tile * blockIdx.x; base < num_vec; base += stride) {
    uint4 raw[U];
    unsigned row[U], idx[U];
    bool active[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every load of the tile first, as in quantize_impl
      const unsigned long long v = base + static_cast<unsigned long long>(u) * blockDim.x + threadIdx.x;
      active[u] = v < num_vec;
      row[u] = active[u] ? static_cast<unsigned>(v) / row_vecs : 0u;
      idx[u] = active[u] ? static_cast<unsigned>(v) - row[u] * row_vecs : 0u;
      raw[u] = active[u] ? __ldg(reinterpret_cast<const uint4*>(src + at(row[u])) + idx[u])
                         : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      __half scale_h, zero_h;
      const uint32_t word = LeanCodes{}.template word<kLanesPerGroup>(raw[u], scale_h, zero_h);
      if (active[u]) {
        uint8_t* out = dst + row[u] * row_bytes;
        reinterpret_cast<uint32_t*>(out)[idx[u]] = word;
        if (lane % kLanesPerGroup == 0) {
          __half* scales = reinterpret_cast<__half*>(out + n / 2);
          scales[idx[u] / kLanesPerGroup] = scale_h;
          scales[n / G + idx[u] / kLanesPerGroup] = zero_h;  // the zeros follow the scales
        }
        float x[kVec], zf[kVec], sf[kVec];
        halves_to_floats(raw[u], x);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          zf[i] = __half2float(zero_h);
          sf[i] = __half2float(scale_h);
        }
        SquareSums piece;
        piece(x, word, zf, sf);
        sums.add(piece);
      }
    }
  }
}

template <int G>
__device__ __forceinline__ void layer_rows_impl(const __half* __restrict__ k,
                                                const __half* __restrict__ v,
                                                uint8_t* __restrict__ dst,
                                                double* __restrict__ sums,
                                                unsigned long long run_stride, unsigned rows,
                                                unsigned bt, unsigned c, unsigned run_rows,
                                                unsigned key_channel) {
  const unsigned long long n = static_cast<unsigned long long>(bt) * c;
  const unsigned long long token_row = n / 2 + 4 * (n / G);
  const unsigned long long key_row = key_channel ? n / 2 + 4ull * c : token_row;
  const unsigned long long row_bytes = key_row + token_row;
  const RowRuns at{run_rows, run_stride, n};
  ThreadSums thread_sums;
  if (blockIdx.y == 1) {
    layer_rows_tokens<G, kQuantUnroll>(v, at, dst + key_row, row_bytes, rows, thread_sums);
  } else if (key_channel) {
    // one thread per 8 channels of a row, as quantize_channels_impl, over every row
    const unsigned cv = c / kVec;
    const unsigned total = rows * cv;  // < 2^32: rows * n / 8 is
    for (unsigned u = blockIdx.x * blockDim.x + threadIdx.x; u < total; u += gridDim.x * blockDim.x) {
      const unsigned r = u / cv;
      SquareSums column;
      quantize_channel_column<LeanChannels>(k + at(r), dst + r * row_bytes, bt, c, c, u - r * cv, column);
      thread_sums.add(column);
    }
  } else {
    layer_rows_tokens<G, kQuantUnroll>(k, at, dst, row_bytes, rows, thread_sums);
  }
  thread_sums.add_to(sums);
}

}  // namespace

#define SYNAPSE_ASSEMBLE_ENTRY(G)                                                      \
  extern "C" __global__ void __launch_bounds__(kThreads) kv_assemble_int4_g##G(        \
      const __half* __restrict__ l1k, const __half* __restrict__ l1v,                   \
      const uint8_t* __restrict__ rows, __half* __restrict__ outk,                      \
      __half* __restrict__ outv, unsigned cut, unsigned m, unsigned bt,                  \
      unsigned tok_elems, unsigned n_tok, unsigned key_channel) {                       \
    assemble_impl<G>(l1k, l1v, rows, outk, outv, cut, m, bt, tok_elems, n_tok,          \
                     key_channel);                                                      \
  }

SYNAPSE_ASSEMBLE_ENTRY(32)
SYNAPSE_ASSEMBLE_ENTRY(64)
SYNAPSE_ASSEMBLE_ENTRY(128)

#define SYNAPSE_INT4_ENTRY(G)                                                          \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_quantize_g##G(const __half* __restrict__ src, uint8_t* __restrict__ dst,    \
                         unsigned long long n) {                                       \
    quantize_impl<G, Contiguous, WarpCodes, kQuantUnroll>(src, dst, n, Contiguous{}, WarpCodes{}); \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_dequantize_g##G(const uint8_t* __restrict__ src, __half* __restrict__ dst,  \
                           unsigned long long n) {                                     \
    dequantize_impl<G>(src, dst, n, Contiguous{});                                     \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      kv_block_quantize_int4_kc_g##G(const __half* __restrict__ src,                   \
                                     uint8_t* __restrict__ dst, unsigned bt, unsigned c) { \
    block_quantize_kc<G, WarpCodes, WarpChannels>(src, dst, bt, c);                    \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      kv_block_dequantize_int4_kc_g##G(const uint8_t* __restrict__ src,                \
                                       __half* __restrict__ dst, unsigned bt, unsigned c) { \
    block_dequantize_kc<G>(src, dst, bt, c);                                           \
  }

SYNAPSE_INT4_ENTRY(32)
SYNAPSE_INT4_ENTRY(64)
SYNAPSE_INT4_ENTRY(128)

#define SYNAPSE_INT4_VARIANT_ENTRY(G)                                                  \
  extern "C" __global__ void __launch_bounds__(kThreads, 8)                            \
      int4_quantize_lean_g##G(const __half* __restrict__ src, uint8_t* __restrict__ dst, \
                              unsigned long long n) {                                  \
    quantize_impl<G, Contiguous, LeanCodes, kQuantUnroll>(src, dst, n, Contiguous{}, LeanCodes{}); \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_quantize_lean4_g##G(const __half* __restrict__ src, uint8_t* __restrict__ dst, \
                               unsigned long long n) {                                 \
    quantize_impl<G, Contiguous, LeanCodes, 2 * kQuantUnroll>(src, dst, n, Contiguous{}, LeanCodes{}); \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_quantize_staged_g##G(const __half* __restrict__ src, uint8_t* __restrict__ dst, \
                                unsigned long long n) {                                \
    quantize_staged_impl<G>(src, dst, n);                                              \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      kv_block_quantize_int4_kc_lean_g##G(const __half* __restrict__ src,              \
                                          uint8_t* __restrict__ dst, unsigned bt,      \
                                          unsigned c) {                                \
    block_quantize_kc<G, LeanCodes, LeanChannels>(src, dst, bt, c);                    \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads, 8)                            \
      int4_dequantize_stream_g##G(const uint8_t* __restrict__ src, __half* __restrict__ dst, \
                                  unsigned long long n) {                              \
    dequantize_impl<G, Contiguous, kDequantUnroll, true>(src, dst, n, Contiguous{});   \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_dequantize_staged_g##G(const uint8_t* __restrict__ src, __half* __restrict__ dst, \
                                  unsigned long long n) {                              \
    dequantize_staged_impl<G>(src, dst, n);                                            \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads)                               \
      int4_dequantize_bulk_g##G(const uint8_t* __restrict__ src, __half* __restrict__ dst, \
                                unsigned long long n) {                                \
    dequantize_bulk_impl<G, kBulkVecs, kBulkInStages>(src, dst, n);                    \
  }                                                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads, 8)                            \
      int4_dequantize_bulk4k_g##G(const uint8_t* __restrict__ src, __half* __restrict__ dst, \
                                  unsigned long long n) {                              \
    dequantize_bulk_impl<G, kBulk4kVecs, kBulk4kInStages>(src, dst, n);                \
  }

SYNAPSE_INT4_VARIANT_ENTRY(32)
SYNAPSE_INT4_VARIANT_ENTRY(64)
SYNAPSE_INT4_VARIANT_ENTRY(128)

#define SYNAPSE_LAYER_ROWS_ENTRY(G)                                                    \
  extern "C" __global__ void __launch_bounds__(kThreads) kv_quantize_layer_rows_int4_g##G( \
      const __half* __restrict__ k, const __half* __restrict__ v, uint8_t* __restrict__ dst, \
      double* __restrict__ sums, unsigned long long run_stride, unsigned rows, unsigned bt, \
      unsigned c, unsigned run_rows, unsigned key_channel) {                            \
    layer_rows_impl<G>(k, v, dst, sums, run_stride, rows, bt, c, run_rows, key_channel);  \
  }

SYNAPSE_LAYER_ROWS_ENTRY(32)
SYNAPSE_LAYER_ROWS_ENTRY(64)
SYNAPSE_LAYER_ROWS_ENTRY(128)
