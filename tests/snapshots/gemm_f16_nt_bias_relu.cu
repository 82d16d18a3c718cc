// mpcompile kernel mpk_gemm_float16_51285fa72f27: gemm float16 m=256 n=512 k=128 batch=1 split_k=1
// tile 128x128x32, warps 2x4, stages 3, A k-contiguous vec 8, B k-contiguous vec 8
// epilogue ['bias_n', 'relu'] -> float16; generated, do not edit

typedef unsigned short u16;
typedef unsigned int u32;

__device__ __forceinline__ float f16_to_f32(u16 v) {
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}
__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 f32_to_f16(float f) {
  u16 v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 v; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v;
}
__device__ __forceinline__ float float32_to_f32(float v) { return v; }
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void cp_async(u32 dst, const void* src, bool ok, int bytes) {
  const int n = ok ? bytes : 0;  // 0 bytes read: the destination is zero-filled
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
  else if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" :: "r"(dst), "l"(src), "r"(n));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

extern "C" __global__ void __launch_bounds__(256)
mpk_gemm_float16_51285fa72f27(const u16* __restrict__ A, const u16* __restrict__ B, u16* __restrict__ C,
    const u16* __restrict__ bias, const float* __restrict__ scale_ptr) {
  extern __shared__ __align__(128) u16 smem[];
  u16* sA = smem;
  u16* sB = smem + 12288;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int m0 = blockIdx.y * 128;
  const int n0 = blockIdx.x * 128;
  const int batch = blockIdx.z / 1;
  const int split = blockIdx.z % 1;
  const int k_start = split * 128;
  const int k_end = min(128, k_start + 128);
  const int k_tiles = k_end > k_start ? (k_end - k_start + 31) / 32 : 0;
  const int wm0 = ((warp / 4) * 64);
  const int wn0 = ((warp % 4) * 32);
  (void)lane; (void)bias;
  float acc[4][4][4];
  #pragma unroll
  for (int mi = 0; mi < 4; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

  // prologue: stages 0 .. 1 in flight
  #pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (s < k_tiles) {
      const int stage = s;
      const int k0 = k_start + s * 32;
      
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 256;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (m0 + row);
        const int g_k = (k0 + col);
        const bool ok = (((g_mn < 256) && (g_k < 128)) && (g_k < k_end));
        const int off = ok ? ((g_mn * 128) + g_k) : 0;
        cp_async(smem_u32(sA + stage * 4096 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))), A + (ok ? off : 0), ok, 16);
      }
    }
      
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 256;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (n0 + row);
        const int g_k = (k0 + col);
        const bool ok = (((g_k < 128) && (g_mn < 512)) && (g_k < k_end));
        const int off = ok ? ((g_mn * 128) + g_k) : 0;
        cp_async(smem_u32(sB + stage * 4096 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))), B + (ok ? off : 0), ok, 16);
      }
    }
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<1>();
    __syncthreads();
    {  // refill the stage computed in the previous iteration
      const int next = kt + 2;
      if (next < k_tiles) {
        const int stage = next % 3;
        const int k0 = k_start + next * 32;
        
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 256;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (m0 + row);
        const int g_k = (k0 + col);
        const bool ok = (((g_mn < 256) && (g_k < 128)) && (g_k < k_end));
        const int off = ok ? ((g_mn * 128) + g_k) : 0;
        cp_async(smem_u32(sA + stage * 4096 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))), A + (ok ? off : 0), ok, 16);
      }
    }
        
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 256;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (n0 + row);
        const int g_k = (k0 + col);
        const bool ok = (((g_k < 128) && (g_mn < 512)) && (g_k < k_end));
        const int off = ok ? ((g_mn * 128) + g_k) : 0;
        cp_async(smem_u32(sB + stage * 4096 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))), B + (ok ? off : 0), ok, 16);
      }
    }
      }
      cp_async_commit();
    }
    {
      const int stage = kt % 3;
      
      #pragma unroll
      for (int ks = 0; ks < 32; ks += 16) {
        u32 af[4][4];
        u32 bf[4][2];
        #pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          ldsm_x4(smem_u32(sA + stage * 4096 + ((((((wm0 + (mi * 16)) + (((lane >> 3) & 1) * 8)) + (lane & 7)) * 32) + ((((ks + (((lane >> 3) >> 1) * 8)) >> 3) ^ (((((wm0 + (mi * 16)) + (((lane >> 3) & 1) * 8)) + (lane & 7)) / 2) & 3)) * 8)) + ((ks + (((lane >> 3) >> 1) * 8)) & 7))),
                af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
        #pragma unroll
        for (int nj = 0; nj < 4; nj += 2)
          ldsm_x4(smem_u32(sB + stage * 4096 + ((((((wn0 + (nj * 8)) + (((lane >> 3) >> 1) * 8)) + (lane & 7)) * 32) + ((((ks + (((lane >> 3) & 1) * 8)) >> 3) ^ (((((wn0 + (nj * 8)) + (((lane >> 3) >> 1) * 8)) + (lane & 7)) / 2) & 3)) * 8)) + ((ks + (((lane >> 3) & 1) * 8)) & 7))),
                bf[nj][0], bf[nj][1], bf[nj + 1][0], bf[nj + 1][1]);
        #pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          #pragma unroll
          for (int ni = 0; ni < 4; ++ni)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                         "{%0,%1,%2,%3};\n"
                         : "+f"(acc[mi][ni][0]), "+f"(acc[mi][ni][1]), "+f"(acc[mi][ni][2]),
                           "+f"(acc[mi][ni][3])
                         : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]),
                           "r"(bf[ni][0]), "r"(bf[ni][1]));
      }
    }
  }
  cp_async_wait<0>();

  #pragma unroll
  for (int mi = 0; mi < 4; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (((m0 + wm0) + (mi * 16)) + ((lane >> 2) + (8 * (i >> 1))));
        const int col = (((n0 + wn0) + (ni * 8)) + ((2 * (lane & 3)) + (i & 1)));
        if (row < 256 && col < 512) {
          float x = acc[mi][ni][i];
            x += f16_to_f32(bias[col]);
            x = fmaxf(x, 0.f);
          const int off = ((row * 512) + col);
          C[off] = f32_to_f16(x);
        }
      }
}
