// Device-side finishing of ingested KV payloads (synapse/drivers/needle.py).
//
// The scenario drivers ingest synthetic KV that already sits in page-locked host memory
// (a pool of random fp16, synapse/workloads/payload.py), so a block's bytes cross PCIe by
// DMA with no host copy. The needle workload then overwrites the first `kd` elements of
// every key row of a block with that block's structured key (the same vector for every
// token, layer and head): done here, one launch per ingest op, so the host never touches
// the 2 MiB of a block (that host copy was most of a needle run's host time on the H200).
//
// Region r: `ntok[r]` tokens in the token-major layout [token][2][rows][head_dim] fp16
// (rows = layers * kv_heads; plane 0 keys, plane 1 values) starting at dst[r];
// keys + r * kd: its kd fp16 values. Launch: grid.x = regions, any grid.y >= 1,
// blockDim.x any multiple of 32 (grid-stride over the region's ntok * rows * kd elements).
// Contracts the caller (synapse/hw/kernels.py) checks: kd <= head_dim, pointers 2-byte
// aligned.

#include <cuda_fp16.h>

extern "C" __global__ void kv_key_prefix(const unsigned long long* __restrict__ dst,
                                         const __half* __restrict__ keys,
                                         const int* __restrict__ ntok,
                                         int kd, int rows, int head_dim)
{
    const int r = blockIdx.x;
    __half* base = reinterpret_cast<__half*>(dst[r]);
    const __half* key = keys + static_cast<size_t>(r) * kd;
    const long long total = static_cast<long long>(ntok[r]) * rows * kd;
    for (long long i = threadIdx.x + static_cast<long long>(blockIdx.y) * blockDim.x; i < total;
         i += static_cast<long long>(blockDim.x) * gridDim.y) {
        const int c = static_cast<int>(i % kd);
        const long long row = i / kd;            // token * rows + row within the key plane
        const long long t = row / rows;
        const long long rr = row - t * rows;
        base[(t * 2 * rows + rr) * head_dim + c] = key[c];
    }
}
