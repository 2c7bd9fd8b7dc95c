// Attention decode step over a table of KV blocks (fp16 or INT4), flash-decoding style.
// Semantics: synapse/hw/attention_ref.py (the spec this kernel is checked against).
//
// Device: sm_70+ (tuned for sm_90). fp32 accumulation throughout.
// Inputs:
//   q            float32 [L, H, D], C-contiguous, 16-byte aligned
//   block_ptrs   uint64 [nb]  device address of each block (16-byte aligned), in the
//                KVLayout byte layout (synapse/hw/kv_layout.py): logical [BT, 2, L, H, D]
//                fp16, or its INT4 form [packed n/2][scales fp16 n/G][zeros fp16 n/G]
//   block_fmts   int32 [nb]   0 = fp16, 1 = int4 (anything else is read as int4)
//   block_nvalid int32 [nb]   valid leading tokens of each block, clamped to [0, BT]
// Outputs:
//   out          float32 [L, H, D]   softmax(scale * q.K) V over every valid token
//   block_lse    float32 [L, H, nb]  log sum_{i in block} exp(s_i); -inf for an empty block
// With no valid token at all, out = 0.
// An INT4 element is dequantized exactly as synapse/hw/int4.py does, including the final
// rounding to fp16, so an INT4 block attends like the fp16 block it decodes to.
//
// Two launches (kernels.py sizes them):
//   attention_decode_split_d{D}_g{G}: grid (L*H, num_splits), block kAttnThreads,
//     dynamic shared memory BT floats. CTA (lh, s) walks blocks
//     [s*blocks_per_split, min(nb, (s+1)*blocks_per_split)) and writes the split's partial
//     max, sum and unnormalised accumulator to the workspace:
//       part_m [L*H, S], part_l [L*H, S], part_acc [L*H, S, D]   (S = gridDim.y)
//   attention_decode_combine: grid L*H, block D; merges the S partials into out.
// D in {64, 128, 256}, G in {32, 64, 128} with D % G == 0.

#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

namespace {

constexpr int kAttnThreads = 128;  // must match ATTN_THREADS in kernels.py
constexpr int kVec = 8;            // elements per thread per K/V row
constexpr int kFmtFp16 = 0;

__device__ __forceinline__ void halves_to_floats(const uint4 raw, float (&x)[kVec]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 f = __half22float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// Elements [elem, elem + 8) of a block (elem = flat index into [BT, 2, L, H, D], a multiple
// of 8, so the 8 elements share one INT4 group since G >= 32).
template <int G>
__device__ __forceinline__ void load_vec(const uint8_t* __restrict__ base, int fmt, size_t n,
                                         size_t elem, float (&x)[kVec]) {
  if (fmt == kFmtFp16) {
    halves_to_floats(__ldg(reinterpret_cast<const uint4*>(base + 2 * elem)), x);
    return;
  }
  const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(base + elem / 2));
  const __half* scales = reinterpret_cast<const __half*>(base + n / 2);
  const size_t g = elem / G;
  const float sf = __half2float(__ldg(scales + g));
  const float zf = __half2float(__ldg(scales + n / G + g));
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float code = static_cast<float>((word >> (4 * e)) & 0xFu);
    // same roundings as the NumPy spec: product, sum, then fp16
    x[e] = __half2float(__float2half_rn(__fadd_rn(zf, __fmul_rn(code, sf))));
  }
}

// Threads are split into kGroups token groups of kLanes = D/8 lanes; lane j of a group
// owns dims [8j, 8j+8) of one token row. Per KV block: (1) each group dots q with its
// tokens' K rows, reduced over its lanes by shuffles, scores to shared memory; (2) warp 0
// computes the block's max and sum (-> block_lse), folds them into the CTA's running
// max/sum and turns the scores into weights relative to the new running max; (3) every
// thread rescales its accumulator and adds weight * V for its group's tokens. Since all
// groups share the CTA-wide running max, the final merge across groups is a plain sum.
//
// One CTA walks blocks [b_begin, b_end) for (layer l, head h) with query row q_lh (D
// floats), writes block b's lse to lse_row[b - lse_base] and its partial max, sum and
// accumulator to part_m[part], part_l[part] and part_acc[part * D ...].
template <int D, int G>
__device__ __forceinline__ void split_impl(
    const float* __restrict__ q_lh, const unsigned long long* __restrict__ block_ptrs,
    const int* __restrict__ block_fmts, const int* __restrict__ block_nvalid, int b_begin,
    int b_end, int l, int h, int layers, int heads, int block_tokens, float softmax_scale,
    float* __restrict__ lse_row, int lse_base, size_t part, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_acc) {
  constexpr int kLanes = D / kVec;
  constexpr int kGroups = kAttnThreads / kLanes;
  static_assert(D % G == 0, "INT4 groups must not straddle tokens");
  static_assert(kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "a token group is a warp slice");
  static_assert(kGroups >= 1, "block too small for D");

  extern __shared__ float s_weight[];  // [block_tokens]: scores, then softmax weights
  __shared__ float s_alpha;            // rescale factor of the accumulators for this block
  __shared__ __align__(16) float s_red[kGroups * D];

  const int tid = threadIdx.x;
  const int group = tid / kLanes;
  const int j = tid % kLanes;
  const int lane = tid & 31;

  float qv[kVec];
  {
    const float4* q4 = reinterpret_cast<const float4*>(q_lh + kVec * j);
    const float4 a = __ldg(q4);
    const float4 b = __ldg(q4 + 1);
    qv[0] = a.x; qv[1] = a.y; qv[2] = a.z; qv[3] = a.w;
    qv[4] = b.x; qv[5] = b.y; qv[6] = b.z; qv[7] = b.w;
  }

  const size_t n = 2ull * layers * heads * block_tokens * D;
  // Token-major blocks: token i's K and V rows for every (layer, head) are contiguous, so
  // a decode step appends one token with one copy. First element of token 0 of this
  // (l, h), in K and in V, plus this lane's offset; rows of later tokens are a stride on.
  const size_t token_stride = 2ull * layers * heads * D;
  const size_t k_elem0 = (static_cast<size_t>(l) * heads + h) * D + kVec * j;
  const size_t v_elem0 = k_elem0 + static_cast<size_t>(layers) * heads * D;

  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.0f;
  float run_m = -CUDART_INF_F;  // meaningful in warp 0 only
  float run_l = 0.0f;

  for (int b = b_begin; b < b_end; ++b) {
    const int nv = min(max(__ldg(block_nvalid + b), 0), block_tokens);
    float* lse_out = lse_row + (b - lse_base);
    if (nv == 0) {  // uniform across the CTA
      if (tid == 0) *lse_out = -CUDART_INF_F;
      continue;
    }
    const uint8_t* base = reinterpret_cast<const uint8_t*>(__ldg(block_ptrs + b));
    const int fmt = __ldg(block_fmts + b);

    // (1) scores; the loop count is uniform so every lane reaches the shuffles
    const int rounds = (nv + kGroups - 1) / kGroups;
    for (int r = 0; r < rounds; ++r) {
      const int i = r * kGroups + group;
      float kx[kVec];
      if (i < nv) {
        load_vec<G>(base, fmt, n, k_elem0 + static_cast<size_t>(i) * token_stride, kx);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) kx[e] = 0.0f;
      }
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) dot = fmaf(qv[e], kx[e], dot);
#pragma unroll
      for (int off = kLanes / 2; off >= 1; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (i < nv && j == 0) s_weight[i] = dot * softmax_scale;
    }
    __syncthreads();

    // (2) block statistics and weights (warp 0)
    if (tid < 32) {
      float m = -CUDART_INF_F;
      for (int i = lane; i < nv; i += 32) m = fmaxf(m, s_weight[i]);
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      const float new_m = fmaxf(run_m, m);  // finite: the block has a token
      const float c = expf(m - new_m);
      float sum = 0.0f;
      for (int i = lane; i < nv; i += 32) {
        const float e = expf(s_weight[i] - m);
        sum += e;
        s_weight[i] = e * c;
      }
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      const float alpha = expf(run_m - new_m);  // 0 while run_m is -inf
      run_l = fmaf(run_l, alpha, sum * c);
      run_m = new_m;
      if (lane == 0) {
        *lse_out = m + logf(sum);
        s_alpha = alpha;
      }
    }
    __syncthreads();

    // (3) rescale and accumulate weight * V
    const float alpha = s_alpha;
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] *= alpha;
    for (int i = group; i < nv; i += kGroups) {
      float vx[kVec];
      load_vec<G>(base, fmt, n, v_elem0 + static_cast<size_t>(i) * token_stride, vx);
      const float p = s_weight[i];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = fmaf(p, vx[e], acc[e]);
    }
    __syncthreads();  // s_weight and s_alpha are rewritten by the next block
  }

  // merge the token groups' accumulators (same reference max: a plain sum)
  float4* red4 = reinterpret_cast<float4*>(s_red + group * D + kVec * j);
  red4[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  red4[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  __syncthreads();
  for (int d = tid; d < D; d += kAttnThreads) {
    float a = 0.0f;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) a += s_red[g * D + d];
    part_acc[part * D + d] = a;
  }
  if (tid == 0) {
    part_m[part] = run_m;
    part_l[part] = run_l;
  }
}

// Merge num_parts split partials (part_m[0..n), part_l[0..n), part_acc[s * head_dim + d])
// into out[d]: weights exp(m_s - M) over the partials with a token; n = 0 writes zero.
__device__ __forceinline__ void combine_impl(const float* __restrict__ m,
                                             const float* __restrict__ lsum,
                                             const float* __restrict__ acc, int num_parts,
                                             int head_dim, int d, float* __restrict__ out) {
  float big_m = -CUDART_INF_F;
  for (int s = 0; s < num_parts; ++s) big_m = fmaxf(big_m, __ldg(m + s));
  float total = 0.0f;
  float a = 0.0f;
  if (big_m != -CUDART_INF_F) {
    for (int s = 0; s < num_parts; ++s) {
      const float ms = __ldg(m + s);
      if (ms == -CUDART_INF_F) continue;  // split without a valid token
      const float w = expf(ms - big_m);
      total = fmaf(__ldg(lsum + s), w, total);
      a = fmaf(__ldg(acc + static_cast<size_t>(s) * head_dim + d), w, a);
    }
  }
  *out = total > 0.0f ? a / total : 0.0f;
}

// The segment (request) that work item `item` belongs to: the s with
// item_starts[s] <= item < item_starts[s + 1] (item_starts is non-decreasing).
__device__ __forceinline__ int segment_of(const int* __restrict__ item_starts,
                                          int num_segments, int item) {
  int lo = 0, hi = num_segments;  // invariant: item_starts[lo] <= item < item_starts[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (__ldg(item_starts + mid) <= item) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace

#define SYNAPSE_ATTN_SPLIT_ENTRY(D, G)                                                         \
  extern "C" __global__ void __launch_bounds__(kAttnThreads) attention_decode_split_d##D##_g##G( \
      const float* __restrict__ q, const unsigned long long* __restrict__ block_ptrs,          \
      const int* __restrict__ block_fmts, const int* __restrict__ block_nvalid,                \
      int num_blocks, int layers, int heads, int block_tokens, int blocks_per_split,           \
      float softmax_scale, float* __restrict__ block_lse, float* __restrict__ part_m,          \
      float* __restrict__ part_l, float* __restrict__ part_acc) {                              \
    const int lh = blockIdx.x;                                                                 \
    const int b_begin = blockIdx.y * blocks_per_split;                                         \
    split_impl<D, G>(q + static_cast<size_t>(lh) * D, block_ptrs, block_fmts, block_nvalid,    \
                     b_begin, min(num_blocks, b_begin + blocks_per_split), lh / heads,          \
                     lh % heads, layers, heads, block_tokens, softmax_scale,                   \
                     block_lse + static_cast<size_t>(lh) * num_blocks, 0,                      \
                     static_cast<size_t>(lh) * gridDim.y + blockIdx.y, part_m, part_l,         \
                     part_acc);                                                                \
  }

// Several requests (segments) in one launch, each its own attention: segment s owns blocks
// [seg_starts[s], seg_starts[s + 1]) of the table, query q[s] ([L, H, D] each), output
// out[s] and lse [L, H, nb_s] at block_lse + L*H*seg_starts[s] (so every segment's out and
// lse are laid out as a one-request launch of its blocks would write them).
// grid (L*H, num_items): work item i of segment s (item_starts[s] <= i < item_starts[s+1])
// walks blocks seg_starts[s] + (i - item_starts[s]) * blocks_per_split onwards, at most
// blocks_per_split of them; partial (lh, i) is at lh * num_items + i.
#define SYNAPSE_ATTN_SEGMENTS_ENTRY(D, G)                                                      \
  extern "C" __global__ void __launch_bounds__(kAttnThreads)                                   \
      attention_decode_segments_split_d##D##_g##G(                                             \
          const float* __restrict__ q, const unsigned long long* __restrict__ block_ptrs,      \
          const int* __restrict__ block_fmts, const int* __restrict__ block_nvalid,            \
          const int* __restrict__ seg_starts, const int* __restrict__ item_starts,             \
          int num_segments, int layers, int heads, int block_tokens, int blocks_per_split,     \
          float softmax_scale, float* __restrict__ block_lse, float* __restrict__ part_m,      \
          float* __restrict__ part_l, float* __restrict__ part_acc) {                          \
    const int lh = blockIdx.x;                                                                 \
    const int lh_count = layers * heads;                                                       \
    const int item = blockIdx.y;                                                               \
    const int s = segment_of(item_starts, num_segments, item);                                 \
    const int seg0 = __ldg(seg_starts + s);                                                    \
    const int seg1 = __ldg(seg_starts + s + 1);                                                \
    const int b_begin = seg0 + (item - __ldg(item_starts + s)) * blocks_per_split;             \
    split_impl<D, G>(q + (static_cast<size_t>(s) * lh_count + lh) * D, block_ptrs,             \
                     block_fmts, block_nvalid, b_begin, min(seg1, b_begin + blocks_per_split), \
                     lh / heads, lh % heads, layers, heads, block_tokens, softmax_scale,       \
                     block_lse + static_cast<size_t>(lh_count) * seg0 +                        \
                         static_cast<size_t>(lh) * (seg1 - seg0),                              \
                     seg0, static_cast<size_t>(lh) * gridDim.y + item, part_m, part_l,         \
                     part_acc);                                                                \
  }

#define SYNAPSE_ATTN_ENTRIES(D, G) \
  SYNAPSE_ATTN_SPLIT_ENTRY(D, G)   \
  SYNAPSE_ATTN_SEGMENTS_ENTRY(D, G)

SYNAPSE_ATTN_ENTRIES(64, 32)
SYNAPSE_ATTN_ENTRIES(64, 64)
SYNAPSE_ATTN_ENTRIES(128, 32)
SYNAPSE_ATTN_ENTRIES(128, 64)
SYNAPSE_ATTN_ENTRIES(128, 128)
SYNAPSE_ATTN_ENTRIES(256, 32)
SYNAPSE_ATTN_ENTRIES(256, 64)
SYNAPSE_ATTN_ENTRIES(256, 128)

// Merge S split partials per (l, h): weights exp(m_s - M) over splits with a token.
// grid L*H, block D (one thread per output dim); S = 0 is allowed and writes zeros.
extern "C" __global__ void __launch_bounds__(256) attention_decode_combine(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_acc, int num_splits, int head_dim, float* __restrict__ out) {
  const size_t lh = blockIdx.x;
  const int d = threadIdx.x;
  if (d >= head_dim) return;
  const size_t p0 = lh * num_splits;
  combine_impl(part_m + p0, part_l + p0, part_acc + p0 * head_dim, num_splits, head_dim, d,
               out + lh * head_dim + d);
}

// The segments' merge: grid (L*H, num_segments), block D; segment s's partials of (l, h)
// are items [item_starts[s], item_starts[s + 1]) (none for a segment without blocks: its
// out is zero), its output out[s, l, h, :].
extern "C" __global__ void __launch_bounds__(256) attention_decode_segments_combine(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_acc, const int* __restrict__ item_starts, int num_items,
    int head_dim, float* __restrict__ out) {
  const size_t lh = blockIdx.x;
  const size_t s = blockIdx.y;
  const int d = threadIdx.x;
  if (d >= head_dim) return;
  const int i0 = __ldg(item_starts + s);
  const size_t p0 = lh * num_items + i0;
  combine_impl(part_m + p0, part_l + p0, part_acc + p0 * head_dim,
               __ldg(item_starts + s + 1) - i0, head_dim, d,
               out + (s * gridDim.x + lh) * head_dim + d);
}
