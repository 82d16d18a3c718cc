// mpcompile kernel mpk_conv_wgrad_float16_6ee5b783af6f: conv_wgrad float16 m=16 n=72 k=84 batch=1 split_k=2
// tile 32x32x32, warps 1x2, stages 2, A m-contiguous vec 8, B n-contiguous vec 8
// epilogue [] -> float32; generated, do not edit

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
// an integer the optimiser cannot see through: the tile coordinates decoded from the raster are
// kept opaque, or the compiler specialises the main loop on them (128x128 tile: 174 registers
// instead of 120)
__device__ __forceinline__ int opaque(int v) { asm("mov.b32 %0, %0;" : "+r"(v)); return v; }
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
__device__ __forceinline__ void cp_async_n(u32 dst, const void* src, int n) {  // n: 0 or 16
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
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

extern "C" __global__ void __launch_bounds__(64, 2)
mpk_conv_wgrad_float16_6ee5b783af6f(const u16* __restrict__ A, const u16* __restrict__ B, float* __restrict__ C,
    const u16* __restrict__ bias, const float* __restrict__ scale_ptr) {
  extern __shared__ __align__(128) u16 smem[];
  u16* sA = smem;
  u16* sB = smem + 2048;
  const u32 sA_u = smem_u32(sA);  // 32-bit shared-memory addresses
  const u32 sB_u = smem_u32(sB);
  (void)sA_u; (void)sB_u;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int bid = blockIdx.x;
  const int m0 = opaque(((((bid % 3) / 24) * 8) + (((bid % 3) % 24) % min((1 - (((bid % 3) / 24) * 8)), 8)))) * 32;
  const int n0 = opaque((((bid % 3) % 24) / min((1 - (((bid % 3) / 24) * 8)), 8))) * 32;
  const int z = (bid / 3);
  const int batch = z / 2;
  const int split = z % 2;
  const int k_start = split * 64;
  const int k_end = min(84, k_start + 64);
  const int k_tiles = k_end > k_start ? (k_end - k_start + 31) / 32 : 0;
  const int wm0 = ((warp / 2) * 32);
  const int wn0 = ((warp % 2) * 16);
  (void)lane; (void)bias;
  float acc[2][2][4];
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 2; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;


  // operand a: offsets and predicates of this thread's copies, computed once
  const u16* A_k = A + (long long)k_start * 16;
  int a_off[2];
  u32 a_dst[2];
  int a_n[2];
  int a_kr[2];
  #pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = tid + i * 64;
    const int row = (idx / 4);
    const int col = ((idx % 4) * 8);
    const int g_mn = (m0 + col);
    const int g_kr = row;
    const bool ok = ((g_mn < 16) && (g_kr < 84));
    a_off[i] = ok ? ((g_kr * 16) + g_mn) : 0;
    a_dst[i] = (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7)) * 2;
    a_n[i] = ok ? 16 : 0;
    a_kr[i] = g_kr;
  }
  (void)a_kr;
  // pipeline prologue: 1 k-tiles in flight
  #pragma unroll
  for (int s = 0; s < 1; ++s) {
    {  // copies of k-tile s + 0 into its stage
      const int tile = s + 0;
      if (tile < k_tiles) {
        const int stage = tile % 2;
        const int k0 = k_start + tile * 32;
        
    const u16* a_src = A_k + (long long)tile * 512;
    const u32 a_st = sA_u + stage * 2048;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(a_st + a_dst[i], a_src + a_off[i], (k0 + a_kr[i] < k_end ? a_n[i] : 0));
        
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 64;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (n0 + col);
        const int g_k = (k0 + row);
        const bool ok = ((((g_k < 84) && (g_mn < 72)) && (((((g_k % 42) / 6) - 1) + (g_mn / 24)) >= 0) && (((((g_k % 42) / 6) - 1) + (g_mn / 24)) < 7) && (((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8)) >= 0) && (((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8)) < 6)) && (g_k < k_end));
        const int off = ok ? (((((((g_k / 42) * 7) + ((((g_k % 42) / 6) - 1) + (g_mn / 24))) * 6) + ((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8))) * 8) + ((g_mn % 24) % 8)) : 0;
        cp_async(sB_u + (stage * 1024 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))) * 2, B + off, ok, 16);
      }
    }
      }
    }
    cp_async_commit();
  }
  #pragma unroll 1  // one k-tile per iteration: unrolling doubles the live addresses
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<0>();
    __syncthreads();
    {  // copies of k-tile kt + 1 into its stage
      const int tile = kt + 1;
      if (tile < k_tiles) {
        const int stage = tile % 2;
        const int k0 = k_start + tile * 32;
        
    const u16* a_src = A_k + (long long)tile * 512;
    const u32 a_st = sA_u + stage * 2048;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(a_st + a_dst[i], a_src + a_off[i], (k0 + a_kr[i] < k_end ? a_n[i] : 0));
        
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * 64;
      {
        const int row = (idx / 4);
        const int col = ((idx % 4) * 8);
        const int g_mn = (n0 + col);
        const int g_k = (k0 + row);
        const bool ok = ((((g_k < 84) && (g_mn < 72)) && (((((g_k % 42) / 6) - 1) + (g_mn / 24)) >= 0) && (((((g_k % 42) / 6) - 1) + (g_mn / 24)) < 7) && (((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8)) >= 0) && (((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8)) < 6)) && (g_k < k_end));
        const int off = ok ? (((((((g_k / 42) * 7) + ((((g_k % 42) / 6) - 1) + (g_mn / 24))) * 6) + ((((g_k % 42) % 6) - 1) + ((g_mn % 24) / 8))) * 8) + ((g_mn % 24) % 8)) : 0;
        cp_async(sB_u + (stage * 1024 + (((row * 32) + (((col >> 3) ^ ((row / 2) & 3)) * 8)) + (col & 7))) * 2, B + off, ok, 16);
      }
    }
      }
    }
    cp_async_commit();
    {  // compute k-tile kt + 0
      const int tile = kt + 0;
      {
        const int stage = tile % 2;
        
      #pragma unroll
      for (int ks = 0; ks < 32; ks += 16) {
        u32 af[2][4];
        u32 bf[2][2];
        #pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          ldsm_x4_t(sA_u + (stage * 1024 + (((((ks + (((lane >> 3) >> 1) * 8)) + (lane & 7)) * 32) + (((((wm0 + (mi * 16)) + (((lane >> 3) & 1) * 8)) >> 3) ^ ((((ks + (((lane >> 3) >> 1) * 8)) + (lane & 7)) / 2) & 3)) * 8)) + (((wm0 + (mi * 16)) + (((lane >> 3) & 1) * 8)) & 7))) * 2,
                af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
        #pragma unroll
        for (int nj = 0; nj < 2; nj += 2)
          ldsm_x4_t(sB_u + (stage * 1024 + (((((ks + (((lane >> 3) & 1) * 8)) + (lane & 7)) * 32) + (((((wn0 + (nj * 8)) + (((lane >> 3) >> 1) * 8)) >> 3) ^ ((((ks + (((lane >> 3) & 1) * 8)) + (lane & 7)) / 2) & 3)) * 8)) + (((wn0 + (nj * 8)) + (((lane >> 3) >> 1) * 8)) & 7))) * 2,
                bf[nj][0], bf[nj][1], bf[nj + 1][0], bf[nj + 1][1]);
        #pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          #pragma unroll
          for (int ni = 0; ni < 2; ++ni)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                         "{%0,%1,%2,%3};\n"
                         : "+f"(acc[mi][ni][0]), "+f"(acc[mi][ni][1]), "+f"(acc[mi][ni][2]),
                           "+f"(acc[mi][ni][3])
                         : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]),
                           "r"(bf[ni][0]), "r"(bf[ni][1]));
      }
      }
    }
  }
  cp_async_wait<0>();
    __syncthreads();

  float* stage_c = reinterpret_cast<float*>(smem) + warp * 640;
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 2; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = min((((n0 + wn0) + (ni * 8)) + ((2 * (lane & 3)) + (i & 1))), 71);
        float x = acc[mi][ni][i];
          
        stage_c[(((((mi * 16) + ((lane >> 2) + (8 * (i >> 1)))) * 20) + (ni * 8)) + ((2 * (lane & 3)) + (i & 1)))] = x;
        (void)col;
      }
  __syncwarp();
  #pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int row = m0 + wm0 + (((p * 32) + lane) / 4);
    const int col = n0 + wn0 + ((((p * 32) + lane) % 4) * 4);
    const float* src = stage_c + (((p * 32) + lane) / 4) * 20 + ((((p * 32) + lane) % 4) * 4);
    if (row < 16) {
      const long long off = (long long)split * 1152 + ((row * 72) + col);
      if (col < 72) *reinterpret_cast<uint4*>(C + off) = *reinterpret_cast<const uint4*>(src);
    }
  }
}
