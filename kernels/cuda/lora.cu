// Fused LoRA update for a batch whose rows use different adapters (the serving path's BGMV,
// after Punica): one launch per projection instead of a gather, two matmuls and a scatter-add
// per adapter.
//
//   out[t, :] = scales[g] * sum_j (down[g, j, :] . z[t, :]) * up[g, j, :],  g = idx[t]
//
// with down: [G, r, n_in], up: [G, r, n_out], z: [T, n_in], out: [T, n_out], all contiguous.
// Rows with idx[t] == 0xffffffff (no adapter) get zeros, and so do rows whose idx[t] >= G (the
// host cannot check idx without a sync; reading past the stacks would be worse). Adapters of smaller rank are padded
// with zero rows up to r. The forward pass is down = A, up = Bᵀ; the input gradient is the same
// kernel with down = Bᵀ, up = A and z = dy.
//
// One block per row: its warps compute the r dot products into shared memory (f32), then all
// threads write the row, reading up[g] row by row (coalesced). Accumulation is f32 whatever the
// storage type. The reference is flywheel-fused's CPU implementation of the same op.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define LORA_MAX_R 256
#define LORA_NONE 0xffffffffu

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T>
__device__ void lora_bgmv(const T* __restrict__ z, const T* __restrict__ down, const T* __restrict__ up,
                          const float* __restrict__ scales, const uint32_t* __restrict__ idx,
                          T* __restrict__ out, int n_in, int n_out, int r, int n_adapters) {
    __shared__ float v[LORA_MAX_R];
    const int t = blockIdx.x;
    const uint32_t g = idx[t];
    T* o = out + (size_t)t * n_out;
    if (g >= (uint32_t)n_adapters) {  // LORA_NONE, or out of range
        for (int i = threadIdx.x; i < n_out; i += blockDim.x) o[i] = from_f<T>(0.f);
        return;
    }
    const T* zt = z + (size_t)t * n_in;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float s = scales[g];
    for (int j = warp; j < r; j += warps) {
        const T* d = down + ((size_t)g * r + j) * n_in;
        float acc = 0.f;
        for (int k = lane; k < n_in; k += 32) acc += to_f(zt[k]) * to_f(d[k]);
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
        if (lane == 0) v[j] = acc * s;
    }
    __syncthreads();
    const T* u = up + (size_t)g * r * n_out;
    for (int i = threadIdx.x; i < n_out; i += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j < r; ++j) acc += v[j] * to_f(u[(size_t)j * n_out + i]);
        o[i] = from_f<T>(acc);
    }
}

#define LORA_BGMV(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const T* z, const T* down, const T* up, const float* scales,  \
                                    const uint32_t* idx, T* out, int n_in, int n_out, int r,      \
                                    int n_adapters) {                                             \
        lora_bgmv<T>(z, down, up, scales, idx, out, n_in, n_out, r, n_adapters);                  \
    }

LORA_BGMV(lora_bgmv_f32, float)
LORA_BGMV(lora_bgmv_bf16, __nv_bfloat16)
LORA_BGMV(lora_bgmv_f16, __half)
