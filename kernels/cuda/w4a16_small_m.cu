// W4A16 small-M GEMM (M <= 8) on the checkpoint layout: qweight int8 [N/2, K], byte (p, k) holds
// output rows 2p (low nibble) and 2p+1 (high nibble) at column k.
//
// Work split: a warp owns RT tiles of 8 packed rows (16 output rows) and walks K in "units" of
// 4*VEC bytes; the KS warps of a block split the units of the same tiles (unit u goes to warp
// u % KS) and add their partial sums through shared memory at the end. Lane (g = lane/4,
// t = lane%4) loads VEC contiguous bytes of packed row 8*tile+g per unit with one streaming
// vector load, so each packed row is read by 4 lanes as 4*VEC contiguous bytes.
//
// Math: the int4 nibbles become fp16/bf16 integers with the magic-exponent trick (nibble OR'd
// into the mantissa of 1024.0 (fp16) or 128.0 (bf16), then one exact packed subtract of
// 1024+z / 128+z), which feed mma.m16n8k16 as the A operand (16 weight rows x 16 k) with x as
// B (16 k x 8 columns = the M <= 8 activation rows). Products of small integers and x are exact
// and accumulate in fp32; the group scale multiplies the fp32 unit sum (4*VEC divides G, so a
// unit never straddles two groups). Because a dot product does not care which k sits in which
// mma slot, thread t's mma k-slots {2t, 2t+1, 2t+8, 2t+9} of step j map to its own bytes
// 4j..4j+3: A and B then come straight out of the vector loads with no shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// (RT, CH) tile shapes compiled in; the Python side offers exactly these to its tuner.
#ifndef QL_TILE_CASES
#define QL_TILE_CASES QL_CASE(1, 4) QL_CASE(2, 2) QL_CASE(2, 4) QL_CASE(1, 8)
#endif

namespace {

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static constexpr uint32_t kMagic = 0x6400;  // fp16 1024.0: ulp 1, so 1024 | n == 1024 + n
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float to_f(__half v) { return __half2float(v); }
  __device__ static __forceinline__ uint32_t pack(float a, float b) {
    __half2 r = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct Num<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x4300;  // bf16 128.0: ulp 1, so 128 | n == 128 + n
  __device__ static __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <int VEC>
struct Vec;
template <>
struct Vec<16> {
  uint32_t w[4];
  // Weights are read once: skip L1 (keeps x and the scales there) and ask L2 for 256-byte
  // sectors, since the 4 lanes of a row read 64 contiguous bytes of it per unit.
  __device__ __forceinline__ void load_stream(const int8_t* p) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(p));
  }
};
template <>
struct Vec<8> {
  uint32_t w[2];
  __device__ __forceinline__ void load_stream(const int8_t* p) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];\n"
        : "=r"(w[0]), "=r"(w[1])
        : "l"(p));
  }
};

template <typename S>
__device__ __forceinline__ float load_scale(const S* p) {
  return Num<S>::to_f(__ldg(p));
}
template <>
__device__ __forceinline__ float load_scale<float>(const float* p) {
  return __ldg(p);
}

constexpr int kMaxWarps = 16;

template <typename T, typename S, bool ZERO, int VEC, int RT, int CH>
__global__ void __launch_bounds__(kMaxWarps * 32)
    w4a16_small_m_kernel(const T* __restrict__ x, const int8_t* __restrict__ qw,
                         const S* __restrict__ scales, const uint8_t* __restrict__ zeros,
                         const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                         int G, int s_stride, int z_stride) {
  constexpr int UNIT = 4 * VEC;  // k per unit = bytes of one packed row per unit
  constexpr int NW = VEC / 4;    // 32-bit weight words per lane per unit = mma steps
  __shared__ float red[kMaxWarps][RT][4][32];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int KS = blockDim.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int P = N >> 1;
  const int nunits = K / UNIT;

  const int8_t* qp[RT];
  const S* sp[RT];
  const uint8_t* zp[RT];
  for (int r = 0; r < RT; ++r) {
    // Rows past the end re-read the last row (never stored): keeps every load in bounds
    // without predicating the hot loop.
    const int p = min((blockIdx.x * RT + r) * 8 + g, P - 1);
    qp[r] = qw + static_cast<size_t>(p) * K + VEC * t;
    sp[r] = scales + static_cast<size_t>(2 * p) * s_stride;
    zp[r] = ZERO ? zeros + static_cast<size_t>(2 * p) * z_stride : nullptr;
  }
  const bool has_x = g < M;  // B column g is activation row g; columns >= M are zero
  const T* xp = x + static_cast<size_t>(has_x ? g : 0) * K + VEC * t;

  float acc[RT][4];
  for (int r = 0; r < RT; ++r)
    for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;

  auto step = [&](int u0, auto cnt) {
    constexpr int C = decltype(cnt)::value;
    Vec<VEC> wv[C][RT];
    uint32_t xv[C][VEC / 2];
    float se[C][RT], so[C][RT];
    uint32_t ze[C][RT], zo[C][RT];
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int r = 0; r < RT; ++r) wv[c][r].load_stream(qp[r] + static_cast<size_t>(u0 + c * KS) * UNIT);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int k0 = (u0 + c * KS) * UNIT;
#pragma unroll
      for (int v = 0; v < VEC / 8; ++v) {
        uint4 q = make_uint4(0, 0, 0, 0);
        if (has_x) q = __ldg(reinterpret_cast<const uint4*>(xp + k0) + v);
        xv[c][4 * v] = q.x;
        xv[c][4 * v + 1] = q.y;
        xv[c][4 * v + 2] = q.z;
        xv[c][4 * v + 3] = q.w;
      }
      const int grp = k0 / G;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        se[c][r] = load_scale(sp[r] + grp);
        so[c][r] = load_scale(sp[r] + s_stride + grp);
        // subtrahend (base + z) in both halves; symmetric codes were offset by 8 below.
        const uint32_t e = Num<T>::kMagic | (ZERO ? __ldg(zp[r] + grp) : 8u);
        const uint32_t o = Num<T>::kMagic | (ZERO ? __ldg(zp[r] + z_stride + grp) : 8u);
        ze[c][r] = e | (e << 16);
        zo[c][r] = o | (o << 16);
      }
    }
    // nibble ^ 8 maps the stored two's-complement value q (or u - 8) to q + 8 (or u) in
    // [0, 15]; folding it into the magic OR keeps extraction at one LOP3 per half2.
    constexpr uint32_t kOr = (Num<T>::kMagic | (Num<T>::kMagic << 16)) ^ 0x00080008u;
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < NW; ++j) {
          // bytes (b0 b1 b2 b3) -> (b0 b2 b1 b3): the low halves of the masks below then pair
          // k, k+1 (a0a1 / a2a3) and the shifted-by-8 ones k+2, k+3 (a4a5 / a6a7).
          const uint32_t w = __byte_perm(wv[c][r].w[j], 0, 0x3120);
          uint32_t a[4];
          a[0] = Num<T>::sub((w & 0x000F000Fu) ^ kOr, ze[c][r]);          // row 2p,   k+0,1
          a[1] = Num<T>::sub(((w >> 4) & 0x000F000Fu) ^ kOr, zo[c][r]);   // row 2p+1, k+0,1
          a[2] = Num<T>::sub(((w >> 8) & 0x000F000Fu) ^ kOr, ze[c][r]);   // row 2p,   k+2,3
          a[3] = Num<T>::sub(((w >> 12) & 0x000F000Fu) ^ kOr, zo[c][r]);  // row 2p+1, k+2,3
          Num<T>::mma(d, a, &xv[c][2 * j]);
        }
        acc[r][0] += d[0] * se[c][r];
        acc[r][1] += d[1] * se[c][r];
        acc[r][2] += d[2] * so[c][r];
        acc[r][3] += d[3] * so[c][r];
      }
  };

  int u = warp;
  for (; u + (CH - 1) * KS < nunits; u += CH * KS) step(u, std::integral_constant<int, CH>{});
  for (; u < nunits; u += KS) step(u, std::integral_constant<int, 1>{});

  for (int r = 0; r < RT; ++r)
    for (int i = 0; i < 4; ++i) red[warp][r][i][lane] = acc[r][i];
  __syncthreads();
  // One thread per (tile, lane, column half): sums the KS partials of rows 2p, 2p+1 for
  // activation row m = 2t + h and stores them as one 4-byte pair.
  for (int idx = threadIdx.x; idx < RT * 64; idx += blockDim.x) {
    const int r = idx >> 6, l = idx & 31, h = (idx >> 5) & 1;
    const int m = 2 * (l & 3) + h;
    const int p = (blockIdx.x * RT + r) * 8 + (l >> 2);
    if (m >= M || p >= P) continue;
    float ev = 0.f, od = 0.f;
    for (int w = 0; w < KS; ++w) {
      ev += red[w][r][h][l];
      od += red[w][r][2 + h][l];
    }
    if (bias != nullptr) {
      ev += Num<T>::to_f(bias[2 * p]);
      od += Num<T>::to_f(bias[2 * p + 1]);
    }
    *reinterpret_cast<uint32_t*>(out + static_cast<size_t>(m) * N + 2 * p) = Num<T>::pack(ev, od);
  }
}

template <typename T, typename S, bool ZERO, int VEC, int RT, int CH>
cudaError_t launch(const void* x, const void* qw, const void* s, const void* z, const void* b,
                   void* out, int M, int N, int K, int G, int ss, int zs, int ks,
                   cudaStream_t st) {
  const int tiles = (N / 2 + 8 * RT - 1) / (8 * RT);
  w4a16_small_m_kernel<T, S, ZERO, VEC, RT, CH><<<tiles, ks * 32, 0, st>>>(
      static_cast<const T*>(x), static_cast<const int8_t*>(qw), static_cast<const S*>(s),
      static_cast<const uint8_t*>(z), static_cast<const T*>(b), static_cast<T*>(out), M, N, K, G,
      ss, zs);
  return cudaGetLastError();
}

template <typename T, typename S, bool ZERO, int VEC>
cudaError_t pick_tile(int rt, int ch, const void* x, const void* qw, const void* s, const void* z,
                      const void* b, void* out, int M, int N, int K, int G, int ss, int zs,
                      int ks, cudaStream_t st) {
#define QL_CASE(R, C)                                                                      \
  if (rt == R && ch == C)                                                                  \
    return launch<T, S, ZERO, VEC, R, C>(x, qw, s, z, b, out, M, N, K, G, ss, zs, ks, st);
  QL_TILE_CASES
#undef QL_CASE
  return cudaErrorInvalidValue;
}

template <typename T, typename S>
cudaError_t pick_zero_vec(bool zero, int vec, int rt, int ch, const void* x, const void* qw,
                          const void* s, const void* z, const void* b, void* out, int M, int N,
                          int K, int G, int ss, int zs, int ks, cudaStream_t st) {
  if (zero && vec == 16)
    return pick_tile<T, S, true, 16>(rt, ch, x, qw, s, z, b, out, M, N, K, G, ss, zs, ks, st);
  if (zero && vec == 8)
    return pick_tile<T, S, true, 8>(rt, ch, x, qw, s, z, b, out, M, N, K, G, ss, zs, ks, st);
  if (vec == 16)
    return pick_tile<T, S, false, 16>(rt, ch, x, qw, s, z, b, out, M, N, K, G, ss, zs, ks, st);
  if (vec == 8)
    return pick_tile<T, S, false, 8>(rt, ch, x, qw, s, z, b, out, M, N, K, G, ss, zs, ks, st);
  return cudaErrorInvalidValue;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16 (x, bias, out); scale_f32: scales are fp32 (else x's dtype).
// Returns a cudaError_t (0 = launched); the caller checks shapes, alignment and M <= 8.
extern "C" int ql_w4a16_small_m(int device, const void* x, const void* qw, const void* s,
                                const void* z, const void* b, void* out, int M, int N, int K,
                                int G, int ss, int zs, int dtype, int scale_f32, int vec, int rt,
                                int ch, int ks, void* stream) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != device) {
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  if (ks < 1 || ks > kMaxWarps || M < 1 || M > 8) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool zero = z != nullptr;
  if (dtype == 0 && scale_f32)
    return pick_zero_vec<__half, float>(zero, vec, rt, ch, x, qw, s, z, b, out, M, N, K, G, ss,
                                        zs, ks, st);
  if (dtype == 0)
    return pick_zero_vec<__half, __half>(zero, vec, rt, ch, x, qw, s, z, b, out, M, N, K, G, ss,
                                         zs, ks, st);
  if (scale_f32)
    return pick_zero_vec<__nv_bfloat16, float>(zero, vec, rt, ch, x, qw, s, z, b, out, M, N, K,
                                               G, ss, zs, ks, st);
  return pick_zero_vec<__nv_bfloat16, __nv_bfloat16>(zero, vec, rt, ch, x, qw, s, z, b, out, M,
                                                     N, K, G, ss, zs, ks, st);
}

extern "C" const char* ql_error_string(int e) {
  return cudaGetErrorString(static_cast<cudaError_t>(e));
}
