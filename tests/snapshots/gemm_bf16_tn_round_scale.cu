// mpcompile kernel mpk_gemm_bfloat16_b011243e69be: gemm bfloat16 m=96 n=80 k=200 batch=1 split_k=1
// tile 64x64x32, warps 2x2, stages 3, A m-contiguous vec 8 hoisted, B n-contiguous vec 8 hoisted
// epilogue ['round', 'scale'] -> float32; generated, do not edit

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
__device__ __forceinline__ void cp_async_if(u32 dst, const void* src, u32 ok) {  // else zeros
  asm volatile("{ .reg .pred p; setp.eq.u32 p, %2, 0;\n"
               "cp.async.cg.shared.global [%0], [%1], 16, p; }\n" :: "r"(dst), "l"(src), "r"(ok));
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

extern "C" __global__ void __launch_bounds__(128, 2)
mpk_gemm_bfloat16_b011243e69be(const u16* __restrict__ A, const u16* __restrict__ B, float* __restrict__ C,
    const u16* __restrict__ bias, const float* __restrict__ scale_ptr) {
  extern __shared__ __align__(128) u16 smem[];
  u16* sA = smem;
  u16* sB = smem + 6144;
  const u32 sA_u = smem_u32(sA);  // 32-bit shared-memory addresses
  const u32 sB_u = smem_u32(sB);
  (void)sA_u; (void)sB_u;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int bid = blockIdx.x;
  const int m0 = opaque(((((bid % 4) / 16) * 8) + (((bid % 4) % 16) % min((2 - (((bid % 4) / 16) * 8)), 8)))) * 64;
  const int n0 = opaque((((bid % 4) % 16) / min((2 - (((bid % 4) / 16) * 8)), 8))) * 64;
  const int z = (bid / 4);
  const int batch = z / 1;
  const int split = z % 1;
  const int k_start = split * 224;
  const int k_end = min(200, k_start + 224);
  const int k_tiles = k_end > k_start ? (k_end - k_start + 31) / 32 : 0;
  const float scale = *scale_ptr;
  const int wm0 = ((warp / 2) * 32);
  const int wn0 = ((warp % 2) * 32);
  (void)lane; (void)bias;
  float acc[2][4][4];
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;


  // ldmatrix: each thread's first offset; the others are an XOR and an immediate away
  const u32 a_fr = (((((((lane >> 3) >> 1) * 8) + (lane & 7)) * 64) + ((((wm0 + (((lane >> 3) & 1) * 8)) >> 3) ^ (((((lane >> 3) >> 1) * 8) + (lane & 7)) & 7)) * 8)) + ((wm0 + (((lane >> 3) & 1) * 8)) & 7)) * 2;
  const u32 b_fr = (((((((lane >> 3) & 1) * 8) + (lane & 7)) * 64) + ((((wn0 + (((lane >> 3) >> 1) * 8)) >> 3) ^ (((((lane >> 3) & 1) * 8) + (lane & 7)) & 7)) * 8)) + ((wn0 + (((lane >> 3) >> 1) * 8)) & 7)) * 2;

  // operand a: offsets and predicates of this thread's copies, computed once
  const u16* A_k = A + (long long)k_start * 96;
  int a_off[2];
  u32 a_dst[2];
  int a_n[2];
  int a_kr[2];
  #pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = tid + i * 128;
    const int row = (idx / 8);
    const int col = ((idx % 8) * 8);
    const int g_mn = (m0 + col);
    const int g_kr = row;
    const bool ok = ((g_mn < 96) && (g_kr < 200));
    a_off[i] = ok ? ((g_kr * 96) + g_mn) : 0;
    a_dst[i] = (((row * 64) + (((col >> 3) ^ (row & 7)) * 8)) + (col & 7)) * 2;
    a_n[i] = ok ? 16 : 0;
    a_kr[i] = g_kr;
  }
  (void)a_kr;
  // operand b: offsets and predicates of this thread's copies, computed once
  const u16* B_k = B + (long long)k_start * 80;
  int b_off[2];
  u32 b_dst[2];
  int b_n[2];
  int b_kr[2];
  #pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int idx = tid + i * 128;
    const int row = (idx / 8);
    const int col = ((idx % 8) * 8);
    const int g_mn = (n0 + col);
    const int g_kr = row;
    const bool ok = ((g_kr < 200) && (g_mn < 80));
    b_off[i] = ok ? ((g_kr * 80) + g_mn) : 0;
    b_dst[i] = (((row * 64) + (((col >> 3) ^ (row & 7)) * 8)) + (col & 7)) * 2;
    b_n[i] = ok ? 16 : 0;
    b_kr[i] = g_kr;
  }
  (void)b_kr;
  // pipeline prologue: 2 k-tiles in flight
  #pragma unroll
  for (int s = 0; s < 2; ++s) {
    {  // copies of k-tile s + 0 into its stage
      const int tile = s + 0;
      if (tile < k_tiles) {
        const int stage = tile % 3;
        const int k0 = k_start + tile * 32;
        
    const u16* a_src = A_k + (long long)tile * 3072;
    const u32 a_st = sA_u + stage * 4096;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(a_st + a_dst[i], a_src + a_off[i], (k0 + a_kr[i] < k_end ? a_n[i] : 0));
        
    const u16* b_src = B_k + (long long)tile * 2560;
    const u32 b_st = sB_u + stage * 4096;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(b_st + b_dst[i], b_src + b_off[i], (k0 + b_kr[i] < k_end ? b_n[i] : 0));
      }
    }
    cp_async_commit();
  }
  #pragma unroll 1  // one k-tile per iteration: unrolling doubles the live addresses
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<1>();
    __syncthreads();
    {  // copies of k-tile kt + 2 into its stage
      const int tile = kt + 2;
      if (tile < k_tiles) {
        const int stage = tile % 3;
        const int k0 = k_start + tile * 32;
        
    const u16* a_src = A_k + (long long)tile * 3072;
    const u32 a_st = sA_u + stage * 4096;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(a_st + a_dst[i], a_src + a_off[i], (k0 + a_kr[i] < k_end ? a_n[i] : 0));
        
    const u16* b_src = B_k + (long long)tile * 2560;
    const u32 b_st = sB_u + stage * 4096;
    #pragma unroll
    for (int i = 0; i < 2; ++i)
      cp_async_n(b_st + b_dst[i], b_src + b_off[i], (k0 + b_kr[i] < k_end ? b_n[i] : 0));
      }
    }
    cp_async_commit();
    {  // compute k-tile kt + 0
      const int tile = kt + 0;
      {
        const int stage = tile % 3;
        
      const u32 a_fb = sA_u + stage * 4096 + a_fr;
      const u32 b_fb = sB_u + stage * 4096 + b_fr;
      {  // k16 step 0
        u32 af[2][4];
        u32 bf[4][2];
        ldsm_x4_t(a_fb, af[0][0], af[0][1], af[0][2], af[0][3]);
        ldsm_x4_t((a_fb ^ 32), af[1][0], af[1][1], af[1][2], af[1][3]);
        ldsm_x4_t(b_fb, bf[0][0], bf[0][1], bf[1][0], bf[1][1]);
        ldsm_x4_t((b_fb ^ 32), bf[2][0], bf[2][1], bf[3][0], bf[3][1]);
        #pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          #pragma unroll
          for (int ni = 0; ni < 4; ++ni)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                         "{%0,%1,%2,%3};\n"
                         : "+f"(acc[mi][ni][0]), "+f"(acc[mi][ni][1]), "+f"(acc[mi][ni][2]),
                           "+f"(acc[mi][ni][3])
                         : "r"(af[mi][0]), "r"(af[mi][1]), "r"(af[mi][2]), "r"(af[mi][3]),
                           "r"(bf[ni][0]), "r"(bf[ni][1]));
      }
      {  // k16 step 16
        u32 af[2][4];
        u32 bf[4][2];
        ldsm_x4_t(a_fb + 2048, af[0][0], af[0][1], af[0][2], af[0][3]);
        ldsm_x4_t((a_fb ^ 32) + 2048, af[1][0], af[1][1], af[1][2], af[1][3]);
        ldsm_x4_t(b_fb + 2048, bf[0][0], bf[0][1], bf[1][0], bf[1][1]);
        ldsm_x4_t((b_fb ^ 32) + 2048, bf[2][0], bf[2][1], bf[3][0], bf[3][1]);
        #pragma unroll
        for (int mi = 0; mi < 2; ++mi)
          #pragma unroll
          for (int ni = 0; ni < 4; ++ni)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
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

  float* stage_c = reinterpret_cast<float*>(smem) + warp * 1152;
  #pragma unroll
  for (int mi = 0; mi < 2; ++mi)
    #pragma unroll
    for (int ni = 0; ni < 4; ++ni)
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = min((((n0 + wn0) + (ni * 8)) + ((2 * (lane & 3)) + (i & 1))), 79);
        float x = acc[mi][ni][i];
          x = bf16_to_f32(f32_to_bf16(x));
          x *= scale;
        stage_c[(((((mi * 16) + ((lane >> 2) + (8 * (i >> 1)))) * 36) + (ni * 8)) + ((2 * (lane & 3)) + (i & 1)))] = x;
        (void)col;
      }
  __syncwarp();
  #pragma unroll
  for (int p = 0; p < 8; ++p) {
    const int row = m0 + wm0 + (((p * 32) + lane) / 8);
    const int col = n0 + wn0 + ((((p * 32) + lane) % 8) * 4);
    const float* src = stage_c + (((p * 32) + lane) / 8) * 36 + ((((p * 32) + lane) % 8) * 4);
    if (row < 96) {
      const int off = ((row * 80) + col);
      if (col < 80) *reinterpret_cast<uint4*>(C + off) = *reinterpret_cast<const uint4*>(src);
    }
  }
}
