// W4A16 GEMM for small and medium M with mma.m16n8k16 (weights = A, activations = B).
//
// Weight layouts (MODE):
//   0  checkpoint layout int8 [N/2, K] (TensorRT-LLM: byte (p, k) = rows 2p (low), 2p+1 (high)).
//      Lane (g = lane/4, t = lane%4) of a warp reads 16 contiguous bytes of packed row 8*tile+g per
//      64-k "unit" (k = 16t .. 16t+15); one PRMT per 32-bit word puts the nibbles in mma order.
//      Needs G % 64 == 0 (each mma spans the 64 k of one unit).
//   1  kernel-native layout int32 [ceil(N/16), K/64, 128] (packing.to_mma_layout): per 16-row
//      tile and 64-k unit, the 512 bytes a warp needs, lane-major, each lane's 16 bytes already in
//      mma nibble order. mma j of a unit covers k in [0, 32) for j = 0, 1 and [32, 64) for
//      j = 2, 3 (lane t: k = 32*(j/2) + 8t + 4*(j%2) + 0..3), so groups of 32 work too.
//   2  Hopper layout uint8 [N, K/2] (packing.to_wgmma_layout, the layout cutlass_w4 reads): one
//      16-row x 16-k atom (128 bytes) per warp and k16 step, lane 4*(r%8) + (c%8)/2 owning one
//      32-bit word whose nibbles are already in mma order; atoms run along N first, so the 4 atoms
//      of a 64-k unit are 8*N bytes apart. Lane L copies 16 bytes of atom L/8 per unit, the ring
//      slot keeps the atoms in order (128 bytes each), and after a warp barrier each lane reads
//      its 4 words (one per atom) with 32-bit shared loads. Rows r and r + 8
//      of the tile (not 2p, 2p + 1) share a word; lane t's k are the standard fragment's 2t, 2t+1,
//      2t+8, 2t+9 of each atom, so x goes through the ring too (16-byte chunks, XOR-swizzled by
//      row) and ldmatrix hands each lane its pairs. MT <= 4 only (M >= 64 goes to cutlass_w4 on
//      this layout).
//
// Work split: a block owns WN*RT tiles of 16 output rows and MT*8 activation rows (grid.x walks
// M, so the blocks of one tile group run together and share its weights in L2); each of its WN
// warp columns owns RT tiles, and the KS warps of a column split K in chunks of one group (or one
// unit for G = 32), chunk c to warp c % KS; partial sums are added through shared memory at the
// end. Each warp streams its weight
// bytes through a private ST-deep ring in shared memory with 16-byte cp.async (no block barrier in
// the main loop: every lane reads back only the bytes it copied), so ST-1 units per tile are in
// flight per warp without holding registers.
//
// Math: 32-bit word w holds 8 nibbles in the order (e k0, o k0, e k2, o k2, e k1, o k1, e k3,
// o k3) (e/o = even/odd output row, k0..k3 = its 4 k). One LOP3 ((w & mask) ^ magic) turns a
// nibble pair into fp16/bf16 (base + (n ^ 8)) (n ^ 8 maps the stored two's complement q, or
// u - 8, to q + 8, or u); one packed subtract of (base + z) (z = 8 when symmetric) or, for the fp16
// high nibbles, one HFMA2 by 1/16 gives the exact integer q or u - z. Products with x are exact,
// sums fp32, and the group scale multiplies each chunk's fp32 sum.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// (MT, RT, ST) tile shapes compiled in; the Python side offers exactly these to its tuner.
#ifndef QL_MMA_TILES
#define QL_MMA_TILES                                                                          \
  QL_T(1, 1, 4) QL_T(1, 2, 4) QL_T(1, 4, 4) QL_T(1, 1, 8) QL_T(1, 2, 8) QL_T(2, 1, 4)          \
  QL_T(2, 2, 4) QL_T(2, 1, 8) QL_T(2, 2, 8) QL_T(2, 4, 4) QL_T(4, 1, 4) QL_T(4, 1, 8)          \
  QL_T(4, 2, 4) QL_T(8, 1, 4) QL_T(8, 1, 8) QL_T(8, 2, 4)
#endif

namespace {

__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;  // (a & b) ^ c in one LOP3 (the compiler otherwise emits two)
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

template <typename T>
struct Mma;
// cvt(w, a): the 8 nibbles of w (order e k0, o k0, e k2, o k2, e k1, o k1, e k3, o k3) as the A
// fragment of rows e (a0: k0 k1, a2: k2 k3) and o (a1, a3), each value RAW = base + (n ^ 8) with
// n ^ 8 = q + 8 (symmetric) or u (asymmetric); for fp16 the odd row holds base + 16 (n ^ 8).
// The true weight integer is (RAW - CE) / FE with CE = base + z, so the kernel corrects each
// group's fp32 sum d by d - CE * sum(x) and folds 1/FE into the scale (z = 8 when symmetric).
template <>
struct Mma<__half> {
  static constexpr uint32_t kOnes = 0x3C003C00u;  // fp16 1.0 in both halves
  static constexpr float kBase = 1024.f;           // fp16 1024: ulp 1
  static constexpr float kOddMul = 16.f;           // odd row nibble sits at bits 4-7
  __device__ static __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ static __forceinline__ float to_f(__half v) { return __half2float(v); }
  __device__ static __forceinline__ uint32_t pack(float a, float b) {
    __half2 r = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ void cvt(uint32_t w, uint32_t* a) {
    const uint32_t w2 = w >> 8;
    a[0] = and_xor(w, 0x000F000Fu, 0x64086408u);   // 1024 + (n ^ 8): e k0, e k1
    a[1] = and_xor(w, 0x00F000F0u, 0x64806480u);   // 1024 + 16 (n ^ 8): o k0, o k1
    a[2] = and_xor(w2, 0x000F000Fu, 0x64086408u);  // e k2, e k3
    a[3] = and_xor(w2, 0x00F000F0u, 0x64806480u);  // o k2, o k3
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static constexpr uint32_t kOnes = 0x3F803F80u;  // bf16 1.0 in both halves
  static constexpr float kBase = 128.f;            // bf16 128: ulp 1 (7 mantissa bits)
  static constexpr float kOddMul = 1.f;
  __device__ static __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ static __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  // bf16 has 7 mantissa bits, so every nibble is shifted down to bits 0-3 (128 + n).
  __device__ static __forceinline__ void cvt(uint32_t w, uint32_t* a) {
    a[0] = and_xor(w, 0x000F000Fu, 0x43084308u);        // e k0, e k1
    a[1] = and_xor(w >> 4, 0x000F000Fu, 0x43084308u);   // o k0, o k1
    a[2] = and_xor(w >> 8, 0x000F000Fu, 0x43084308u);   // e k2, e k3
    a[3] = and_xor(w >> 12, 0x000F000Fu, 0x43084308u);  // o k2, o k3
  }
};

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
// A lane's 4 words of one 64-k unit from its ring slot (slot = the warp's slot + 16 lane): its own
// 16 bytes, or (Hopper layout: the slot holds the unit's 4 atoms in order) word lane of each atom.
template <int MODE>
__device__ __forceinline__ void read_unit(uint32_t* w, uint32_t slot, int lane) {
  if constexpr (MODE == 2) {
    const uint32_t a = slot - 12 * lane;  // warp slot + 4 lane
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(w[j]) : "r"(a + 128 * j));
  } else {
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                 : "r"(slot));
  }
}
// 16-byte copy that writes zeros instead when !ok (activation rows past M); .ca keeps x in L1,
// where the other warps and blocks of the SM that read the same k find it
__device__ __forceinline__ void cp_async16z(uint32_t dst, const void* src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <typename T>
__device__ __forceinline__ float load_scale(const void* s, int sf32, size_t i) {
  return sf32 ? __ldg(static_cast<const float*>(s) + i)
              : Mma<T>::to_f(__ldg(static_cast<const T*>(s) + i));
}

// MODE: 0 checkpoint layout, 1 native layout, 2 Hopper layout. CU: 64-k units per group (1: G =
// 64, 2: G = 128), or 0 for G = 32 (native and Hopper layouts: one unit holds two groups).
// Scales: element (n, grp) at n * ss + grp * sg; zeros at n * zs + grp.
// Tiles of >= 8 (m-tile, row-tile) pairs hold more accumulators than 128 registers: they launch
// at most 256 threads (8 warps), which lets each thread use up to 255.
constexpr bool big_tile(int mt, int rt) { return mt >= 8 || mt * rt >= 8; }

// SZ (symmetric weights only, MT < 8): subtract base + 8 from each converted A register (4 packed
// subtracts per 16x16 weight block, exact) instead of correcting each group's sum with sum(x)
// (4 mma per 8 activation rows and 64 k, as the zero-point path must).
template <typename T, int MODE, int CU_, int MT, int RT, int ST, bool SZ>
__global__ void __launch_bounds__(big_tile(MT, RT) ? 256 : 512, 1)
    w4_mma_kernel(const T* __restrict__ x, const int8_t* __restrict__ qw,
                  const void* __restrict__ scales, const uint8_t* __restrict__ zeros,
                  const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K, int G,
                  int ss, int sg, int zs, int wn_) {
  extern __shared__ __align__(16) uint8_t smem[];
  static_assert(MODE != 2 || MT < 8, "the Hopper layout runs MT <= 4 tiles");
  constexpr bool HOP = MODE == 2;
  constexpr bool NAT = MODE != 0;  // nibbles already in mma order (native and Hopper layouts)
  constexpr int OROW = HOP ? 8 : 1;  // row of a lane's second ("odd") value: 2p + 1, or r + 8
  constexpr int NH = CU_ == 0 ? 2 : 1;        // groups per unit
  constexpr int CU = CU_ == 0 ? 1 : CU_;      // units per chunk (a chunk = one group, or a unit)
  // bytes between a lane's consecutive units, and (Hopper) between the 4 atoms of a unit
  const size_t USTRIDE = HOP ? static_cast<size_t>(32) * N : (NAT ? 512 : 64);
  const size_t jstride = static_cast<size_t>(8) * N;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // WN warps side by side on different tiles share each K chunk (so x rows are re-read from
  // L1); KS = warps / WN of them split K.
  const int WN = wn_;
  const int KS = (blockDim.x >> 5) / WN;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int P = N >> 1;
  const int ntiles = (P + 7) >> 3;
  const int U = K >> 6;
  const int nchunks = U / CU;
  const int m0 = blockIdx.x * 8 * MT;  // blockIdx.x walks M: blocks sharing a tile run together
  const int o0 = NAT ? 8 * t : 16 * t;       // x offsets (in elements) of the lane's two k runs
  const int o1 = NAT ? 32 + 8 * t : 16 * t + 8;  // (Hopper: 32-bit pairs at 16j + 2t, + 8)

  // A warp's chunks: wk, wk + KS, ...; CU consecutive units each. The ring holds ST units:
  // PD = ST / CU - 1 chunks are in flight while one is computed.
  constexpr int PD = ST / CU - 1;
  static_assert(PD >= 1 && ST % CU == 0, "ring must hold at least two chunks");
  const int nmy = wk < nchunks ? (nchunks - 1 - wk) / KS + 1 : 0;
  const size_t cstride = static_cast<size_t>(KS) * CU * USTRIDE;  // bytes between my chunks

  const int8_t* lp[RT];   // weights of my first chunk, per tile
  const uint8_t* sp[RT];  // scale of row 2p at my first group (row 2p+1: + sstep bytes)
  const uint8_t* zp[RT];
  constexpr int esz = sizeof(T);  // scales are in x's dtype
  const size_t sstep = static_cast<size_t>(ss) * esz * OROW;  // bytes from row e to row o
  const size_t sgb = static_cast<size_t>(sg) * esz;           // bytes between groups
  const bool has_zero = zeros != nullptr;
  const int grp0 = CU_ == 0 ? 2 * wk : wk;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    // Tiles/rows past the end re-read the last ones (never stored), so loads stay in bounds.
    const int tile = min((static_cast<int>(blockIdx.y) * WN + wn) * RT + r, ntiles - 1);
    const int p = min(tile * 8 + g, P - 1);
    const int rowe = HOP ? tile * 16 + g : 2 * p;  // output row of the lane's first value
    lp[r] = (HOP   ? qw + static_cast<size_t>(tile) * 128 + (lane >> 3) * jstride + (lane & 7) * 16
             : NAT ? qw + (static_cast<size_t>(tile) * U * 32 + lane) * 16
                   : qw + static_cast<size_t>(p) * K + 16 * t) +
            static_cast<size_t>(wk) * CU * USTRIDE;
    sp[r] = static_cast<const uint8_t*>(scales) + static_cast<size_t>(rowe) * ss * esz +
            static_cast<size_t>(grp0) * sgb;
    zp[r] = has_zero ? zeros + static_cast<size_t>(rowe) * zs + grp0 : zeros;
  }
  const T* xp[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m0 + 8 * mt + g;
    xok[mt] = row < M;
    xp[mt] = x + static_cast<size_t>(xok[mt] ? row : 0) * K + wk * CU * 64;
  }
  // A ring slot per unit: RT x 512 weight bytes, then (Hopper layout) the unit's x rows: row g of
  // m-tile mt at 1024 mt + 128 g, its 16-byte chunk c stored at chunk c ^ g so that the 8 rows an
  // ldmatrix reads fall in 8 different bank groups.
  constexpr int USZ = RT * 512 + (HOP ? MT * 1024 : 0);
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem)) +
                        static_cast<uint32_t>(warp * ST * USZ + lane * 16);
  auto copy_x = [&](uint32_t uslot, size_t off) {  // uslot: a unit slot of ring (incl. 16 lane)
    if constexpr (HOP) {
      const uint32_t xb = uslot - 16 * lane + RT * 512;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          cp_async16z(xb + mt * 1024 + g * 128 + (((2 * t + h) ^ g) << 4),
                      xp[mt] + off + 16 * t + 8 * h, xok[mt]);
    }
  };

  // Prologue: chunks 0 .. PD-1 into ring chunk-slots 0 .. PD-1 (one commit group per unit).
#pragma unroll
  for (int c = 0; c < PD; ++c)
#pragma unroll
    for (int cu = 0; cu < CU; ++cu) {
      if (c < nmy) {
#pragma unroll
        for (int r = 0; r < RT; ++r)
          cp_async16(ring + (c * CU + cu) * USZ + r * 512, lp[r] + c * cstride + cu * USTRIDE);
        copy_x(ring + (c * CU + cu) * USZ, static_cast<size_t>(c) * KS * CU * 64 + cu * 64);
      }
      cp_commit();
    }

  float acc[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[r][mt][q] = 0.f;

  int cslot = 0, lslot = PD;  // chunk-slots (of CU units) being computed / loaded
  const size_t sadv = static_cast<size_t>(CU_ == 0 ? 2 * KS : KS);  // groups between my chunks
  if constexpr (MT >= 8) {
    // Scaled mode (MT = 8): exact integers by one packed subtract of (base + z), times the group
    // scale in x's dtype (the product rounds like Marlin's), accumulated straight into acc: no
    // per-group sums, so 64 activation rows fit in registers.
    for (int c = 0; c < nmy; ++c) {
      uint32_t za[RT][NH], zb[RT][NH], s2e[RT][NH], s2o[RT][NH];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int h = 0; h < NH; ++h) {
          const T* s0 = reinterpret_cast<const T*>(sp[r] + h * sgb);
          const float se = Mma<T>::to_f(__ldg(s0));
          const float so = Mma<T>::to_f(__ldg(reinterpret_cast<const T*>(sp[r] + h * sgb + sstep))) *
                           (1.f / Mma<T>::kOddMul);
          float ze = 8.f, zo = 8.f;
          if (has_zero) {
            ze = static_cast<float>(__ldg(zp[r] + h));
            zo = static_cast<float>(__ldg(zp[r] + h + OROW * zs));
          }
          za[r][h] = Mma<T>::pack(Mma<T>::kBase + ze, Mma<T>::kBase + ze);
          zb[r][h] = Mma<T>::pack(Mma<T>::kBase + Mma<T>::kOddMul * zo,
                                  Mma<T>::kBase + Mma<T>::kOddMul * zo);
          s2e[r][h] = Mma<T>::pack(se, se);
          s2o[r][h] = Mma<T>::pack(so, so);
        }
      const bool more = c + PD < nmy;
#pragma unroll
      for (int cu = 0; cu < CU; ++cu) {
        if constexpr (HOP) __syncwarp();  // every lane has read the slot about to be refilled
        if (more) {
#pragma unroll
          for (int r = 0; r < RT; ++r)
            cp_async16(ring + (lslot * CU + cu) * USZ + r * 512,
                       lp[r] + PD * cstride + cu * USTRIDE);
        }
        cp_commit();
        cp_wait<PD * CU>();
        if constexpr (HOP) __syncwarp();  // the unit's other lanes' bytes have landed too
        const uint32_t slot = ring + static_cast<uint32_t>((cslot * CU + cu) * USZ);
        uint32_t wj[RT][4];
#pragma unroll
        for (int r = 0; r < RT; ++r) read_unit<MODE>(wj[r], slot + r * 512, lane);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {  // k run hh of the unit: words 2hh, 2hh+1
          uint32_t xv[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint4 q = make_uint4(0, 0, 0, 0);
            if (xok[mt]) q = __ldg(reinterpret_cast<const uint4*>(xp[mt] + cu * 64 + (hh ? o1 : o0)));
            xv[mt][0] = q.x;
            xv[mt][1] = q.y;
            xv[mt][2] = q.z;
            xv[mt][3] = q.w;
          }
#pragma unroll
          for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int j = 2 * hh + jj;
              const int h = NH == 2 ? hh : 0;
              const uint32_t w = NAT ? wj[r][j] : __byte_perm(wj[r][j], 0, 0x3120);
              uint32_t a[4];
              Mma<T>::cvt(w, a);
              a[0] = Mma<T>::mul2(Mma<T>::sub2(a[0], za[r][h]), s2e[r][h]);
              a[1] = Mma<T>::mul2(Mma<T>::sub2(a[1], zb[r][h]), s2o[r][h]);
              a[2] = Mma<T>::mul2(Mma<T>::sub2(a[2], za[r][h]), s2e[r][h]);
              a[3] = Mma<T>::mul2(Mma<T>::sub2(a[3], zb[r][h]), s2o[r][h]);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc[r][mt], a, &xv[mt][2 * jj]);
            }
        }
      }
      cslot = cslot == PD ? 0 : cslot + 1;
      lslot = lslot == PD ? 0 : lslot + 1;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        lp[r] += cstride;
        sp[r] += sadv * sgb;
        zp[r] += sadv;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xp[mt] += KS * CU * 64;
    }
  } else {
  const uint32_t ones[4] = {Mma<T>::kOnes, Mma<T>::kOnes, Mma<T>::kOnes, Mma<T>::kOnes};
  // SZ: base + 8 (even rows) and base + kOddMul * 8 (odd rows), so RAW - these = q (or 16 q)
  const uint32_t sze = Mma<T>::pack(Mma<T>::kBase + 8.f, Mma<T>::kBase + 8.f);
  const uint32_t szo = Mma<T>::pack(Mma<T>::kBase + 8.f * Mma<T>::kOddMul,
                                    Mma<T>::kBase + 8.f * Mma<T>::kOddMul);
  for (int c = 0; c < nmy; ++c) {
    float d[RT][MT][NH][4];
    float xs[MT][NH][4];  // sum of x over the group (mma with an all-ones A): columns 2t, 2t+1
    float se[RT][NH], so[RT][NH], ce[RT][NH], co[RT][NH];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < NH; ++h) {
        const T* s0 = reinterpret_cast<const T*>(sp[r] + h * sgb);
        se[r][h] = Mma<T>::to_f(__ldg(s0));
        so[r][h] = Mma<T>::to_f(__ldg(reinterpret_cast<const T*>(sp[r] + h * sgb + sstep))) *
                   (1.f / Mma<T>::kOddMul);
        float ze = 8.f, zo = 8.f;
        if (has_zero) {
          ze = static_cast<float>(__ldg(zp[r] + h));
          zo = static_cast<float>(__ldg(zp[r] + h + OROW * zs));
        }
        ce[r][h] = Mma<T>::kBase + ze;
        co[r][h] = Mma<T>::kBase + Mma<T>::kOddMul * zo;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int q = 0; q < 4; ++q) d[r][mt][h][q] = 0.f;
      }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < NH; ++h)
#pragma unroll
        for (int q = 0; q < 4; ++q) xs[mt][h][q] = 0.f;
    const bool more = c + PD < nmy;
#pragma unroll
    for (int cu = 0; cu < CU; ++cu) {
      if constexpr (HOP) __syncwarp();  // every lane has read the slot about to be refilled
      if (more) {
#pragma unroll
        for (int r = 0; r < RT; ++r)
          cp_async16(ring + (lslot * CU + cu) * USZ + r * 512, lp[r] + PD * cstride + cu * USTRIDE);
        copy_x(ring + (lslot * CU + cu) * USZ, static_cast<size_t>(PD) * KS * CU * 64 + cu * 64);
      }
      cp_commit();
      cp_wait<PD * CU>();               // unit (c, cu) has landed
      if constexpr (HOP) __syncwarp();  // (Hopper layout: in every lane)
      const uint32_t slot = ring + static_cast<uint32_t>((cslot * CU + cu) * USZ);
      uint32_t xv[MT][8];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (HOP) {
          // b0, b1 of mma j (the pairs at k = 16j + 2t and 16j + 2t + 8 of row g) for j = 2jj,
          // 2jj + 1: one ldmatrix.x4 of chunks 4jj .. 4jj + 3; lane l addresses row l % 8 of
          // matrix l / 8.
          const int rr = lane & 7, mi = lane >> 3;
          const uint32_t xb = slot - 16 * lane + RT * 512 + mt * 1024 + rr * 128;
#pragma unroll
          for (int jj = 0; jj < 2; ++jj)
            asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(xv[mt][4 * jj]), "=r"(xv[mt][4 * jj + 1]), "=r"(xv[mt][4 * jj + 2]),
                           "=r"(xv[mt][4 * jj + 3])
                         : "r"(xb + (((4 * jj + mi) ^ rr) << 4)));
        } else {
          uint4 q0 = make_uint4(0, 0, 0, 0), q1 = make_uint4(0, 0, 0, 0);
          if (xok[mt]) {
            q0 = __ldg(reinterpret_cast<const uint4*>(xp[mt] + cu * 64 + o0));
            q1 = __ldg(reinterpret_cast<const uint4*>(xp[mt] + cu * 64 + o1));
          }
          xv[mt][0] = q0.x;
          xv[mt][1] = q0.y;
          xv[mt][2] = q0.z;
          xv[mt][3] = q0.w;
          xv[mt][4] = q1.x;
          xv[mt][5] = q1.y;
          xv[mt][6] = q1.z;
          xv[mt][7] = q1.w;
        }
        if constexpr (!SZ) {
#pragma unroll
          for (int j = 0; j < 4; ++j)
            Mma<T>::run(xs[mt][NH == 2 ? (j >> 1) : 0], ones, &xv[mt][2 * j]);
        }
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        uint32_t wj[4];
        read_unit<MODE>(wj, slot + r * 512, lane);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t w = NAT ? wj[j] : __byte_perm(wj[j], 0, 0x3120);
          const int h = NH == 2 ? (j >> 1) : 0;
          uint32_t a[4];
          Mma<T>::cvt(w, a);
          if constexpr (SZ) {
            a[0] = Mma<T>::sub2(a[0], sze);
            a[1] = Mma<T>::sub2(a[1], szo);
            a[2] = Mma<T>::sub2(a[2], sze);
            a[3] = Mma<T>::sub2(a[3], szo);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) Mma<T>::run(d[r][mt][h], a, &xv[mt][2 * j]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < NH; ++h) {
          if constexpr (SZ) {
            acc[r][mt][0] += se[r][h] * d[r][mt][h][0];
            acc[r][mt][1] += se[r][h] * d[r][mt][h][1];
            acc[r][mt][2] += so[r][h] * d[r][mt][h][2];
            acc[r][mt][3] += so[r][h] * d[r][mt][h][3];
          } else {
            acc[r][mt][0] += se[r][h] * fmaf(-ce[r][h], xs[mt][h][0], d[r][mt][h][0]);
            acc[r][mt][1] += se[r][h] * fmaf(-ce[r][h], xs[mt][h][1], d[r][mt][h][1]);
            acc[r][mt][2] += so[r][h] * fmaf(-co[r][h], xs[mt][h][2], d[r][mt][h][2]);
            acc[r][mt][3] += so[r][h] * fmaf(-co[r][h], xs[mt][h][3], d[r][mt][h][3]);
          }
        }
    cslot = cslot == PD ? 0 : cslot + 1;
    lslot = lslot == PD ? 0 : lslot + 1;
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      lp[r] += cstride;
      sp[r] += sadv * sgb;
      zp[r] += sadv;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) xp[mt] += KS * CU * 64;
  }
  }
  cp_wait<0>();
  __syncthreads();  // every warp is done with its ring: reuse the shared memory for the partials
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[(((warp * RT + r) * MT + mt) * 4 + q) * 32 + lane] = acc[r][mt][q];
  __syncthreads();
  // One thread per (tile, m-tile, column half, lane): sums the KS partials of rows 2p, 2p+1 for
  // activation row m and stores them as one 4-byte pair.
  for (int idx = threadIdx.x; idx < WN * RT * MT * 64; idx += blockDim.x) {
    const int l = idx & 31, h = (idx >> 5) & 1, rm = idx >> 6;
    const int mt = rm % MT, r = (rm / MT) % RT, n0 = rm / (MT * RT);
    const int m = m0 + 8 * mt + 2 * (l & 3) + h;
    const int tl = (static_cast<int>(blockIdx.y) * WN + n0) * RT + r;
    const int p = tl * 8 + (l >> 2);
    if (m >= M || p >= P) continue;
    float ev = 0.f, od = 0.f;
    for (int w = 0; w < KS; ++w) {
      const int base = (((w * WN + n0) * RT + r) * MT + mt) * 4;
      ev += red[(base + h) * 32 + l];
      od += red[(base + 2 + h) * 32 + l];
    }
    // rows 2p, 2p + 1 (one 4-byte store), or (Hopper layout) 16 tl + l/4 and 8 rows below
    const int ne = HOP ? tl * 16 + (l >> 2) : 2 * p;
    if (bias != nullptr) {
      ev += Mma<T>::to_f(bias[ne]);
      od += Mma<T>::to_f(bias[ne + OROW]);
    }
    T* o = out + static_cast<size_t>(m) * N + ne;
    if constexpr (HOP) {
      const uint32_t pr = Mma<T>::pack(ev, od);
      o[0] = *reinterpret_cast<const T*>(&pr);
      o[8] = *(reinterpret_cast<const T*>(&pr) + 1);
    } else {
      *reinterpret_cast<uint32_t*>(o) = Mma<T>::pack(ev, od);
    }
  }
}

// ---- W8A16: int8 weights [N, K], one scale per output row ---------------------------------------
// Lane (g, t) owns rows 16 tile + g ("e") and 16 tile + g + 8 ("o") of each of its RT tiles and,
// per 64-k unit, k = 16t .. 16t + 15: 16 contiguous bytes of each row and 32 bytes of activation
// row g, all copied into the warp's ring with cp.async and read back by the same lane (no warp
// barrier). mma j (0..3) of a unit takes k = 16t + 4j .. 16t + 4j + 3 as the fragment's k pairs
// (2t, 2t+1) and (2t+8, 2t+9): the same renaming in A (weights) and B (x) leaves the sum unchanged.
// int8 -> exact integer q in x's dtype: fp16 builds 1024 + (b ^ 0x80) with one PRMT per pair and
// subtracts 1152; bf16 (8 significant bits) goes through fp32, 2^23 + (b ^ 0x80) - (2^23 + 128),
// and keeps the high halves (exact: |q| <= 128). Sums are fp32; the per-channel scale multiplies
// each output once at the end.
template <typename T>
struct W8Cvt;
template <>
struct W8Cvt<__half> {
  __device__ static __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    lo = Mma<__half>::sub2(__byte_perm(u, 0x64646464u, 0x5140), 0x64806480u);
    hi = Mma<__half>::sub2(__byte_perm(u, 0x64646464u, 0x5342), 0x64806480u);
  }
};
template <>
struct W8Cvt<__nv_bfloat16> {
  __device__ static __forceinline__ void run(uint32_t w, uint32_t& lo, uint32_t& hi) {
    const uint32_t u = w ^ 0x80808080u;
    uint32_t f[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      f[i] = __float_as_uint(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440 + i)) -
                             8388736.f);
    lo = __byte_perm(f[0], f[1], 0x7632);
    hi = __byte_perm(f[2], f[3], 0x7632);
  }
};

// Work split as in w4_mma_kernel: grid.x walks M in blocks of 8 MT rows, grid.y groups of WN * RT
// tiles; KS / WN warps of each warp column split K unit by unit (unit u to warp u % KS); partials
// meet in shared memory at the end.
template <typename T, int MT, int RT, int ST>
__global__ void __launch_bounds__(512, 1)
    w8_mma_kernel(const T* __restrict__ x, const int8_t* __restrict__ qw,
                  const void* __restrict__ scales, const T* __restrict__ bias, T* __restrict__ out,
                  int M, int N, int K, int wn_, int sf32) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int WN = wn_;
  const int KS = (blockDim.x >> 5) / WN;
  const int wn = warp % WN;
  const int wk = warp / WN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int ntiles = (N + 15) >> 4;
  const int U = K >> 6;
  const int m0 = blockIdx.x * 8 * MT;
  constexpr int PD = ST - 1;  // units in flight while one is computed
  const int nmy = wk < U ? (U - 1 - wk) / KS + 1 : 0;
  const size_t ustep = static_cast<size_t>(KS) * 64;  // bytes (and x elements) between my units

  const int8_t* lp[RT][2];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    // rows past N re-read row N - 1 (never stored), so loads stay in bounds
    const int tile = min((static_cast<int>(blockIdx.y) * WN + wn) * RT + r, ntiles - 1);
#pragma unroll
    for (int h = 0; h < 2; ++h)
      lp[r][h] = qw + static_cast<size_t>(min(tile * 16 + g + 8 * h, N - 1)) * K + 16 * t + wk * 64;
  }
  const T* xp[MT];
  bool xok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = m0 + 8 * mt + g;
    xok[mt] = row < M;
    xp[mt] = x + static_cast<size_t>(xok[mt] ? row : 0) * K + 16 * t + wk * 64;
  }
  // A ring slot per unit: RT x (512 bytes of rows e, 512 of rows o), then MT x 1024 bytes of x;
  // lane l's bytes at 16 l (weights) and 32 l (x) of each part.
  constexpr int USZ = (RT + MT) * 1024;
  const uint32_t ring =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem)) + static_cast<uint32_t>(warp * ST * USZ);
  auto copy_unit = [&](int slot, size_t off) {
    const uint32_t b = ring + slot * USZ;
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int h = 0; h < 2; ++h) cp_async16(b + r * 1024 + h * 512 + lane * 16, lp[r][h] + off);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      if (xok[mt])
#pragma unroll
        for (int h = 0; h < 2; ++h)
          cp_async16z(b + RT * 1024 + mt * 1024 + lane * 32 + h * 16, xp[mt] + off + 8 * h, true);
  };
  // x rows past M: zeros written once into every slot (never copied; each lane reads only its own)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    if (!xok[mt])
      for (int sl = 0; sl < ST; ++sl)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};\n" ::"r"(
                           ring + sl * USZ + RT * 1024 + mt * 1024 + lane * 32 + h * 16),
                       "r"(0));
#pragma unroll
  for (int c = 0; c < PD; ++c) {
    if (c < nmy) copy_unit(c, static_cast<size_t>(c) * ustep);
    cp_commit();
  }

  float acc[RT][MT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[r][mt][q] = 0.f;

  int cslot = 0, lslot = PD;
  for (int c = 0; c < nmy; ++c) {
    if (c + PD < nmy) copy_unit(lslot, static_cast<size_t>(c + PD) * ustep);
    cp_commit();
    cp_wait<PD>();  // unit c has landed (each lane reads only its own bytes)
    const uint32_t b = ring + cslot * USZ;
    uint32_t xv[MT][8];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(xv[mt][4 * h]), "=r"(xv[mt][4 * h + 1]), "=r"(xv[mt][4 * h + 2]),
                       "=r"(xv[mt][4 * h + 3])
                     : "r"(b + RT * 1024 + mt * 1024 + lane * 32 + h * 16));
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      uint32_t we[4], wo[4];
      read_unit<0>(we, b + r * 1024 + lane * 16, lane);
      read_unit<0>(wo, b + r * 1024 + 512 + lane * 16, lane);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t a[4];
        W8Cvt<T>::run(we[j], a[0], a[2]);
        W8Cvt<T>::run(wo[j], a[1], a[3]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc[r][mt], a, &xv[mt][2 * j]);
      }
    }
    cslot = cslot == PD ? 0 : cslot + 1;
    lslot = lslot == PD ? 0 : lslot + 1;
  }
  cp_wait<0>();
  __syncthreads();  // every warp is done with its ring: reuse the shared memory for the partials
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[(((warp * RT + r) * MT + mt) * 4 + q) * 32 + lane] = acc[r][mt][q];
  __syncthreads();
  // One thread per output of the block: d0, d1 = rows e, columns 2t, 2t + 1; d2, d3 = rows o.
  for (int idx = threadIdx.x; idx < WN * RT * MT * 128; idx += blockDim.x) {
    const int l = idx & 31, q = (idx >> 5) & 3, rm = idx >> 7;
    const int mt = rm % MT, r = (rm / MT) % RT, n0 = rm / (MT * RT);
    const int m = m0 + 8 * mt + 2 * (l & 3) + (q & 1);
    const int n = ((static_cast<int>(blockIdx.y) * WN + n0) * RT + r) * 16 + (l >> 2) + 8 * (q >> 1);
    if (m >= M || n >= N) continue;
    float v = 0.f;
    for (int w = 0; w < KS; ++w) v += red[((((w * WN + n0) * RT + r) * MT + mt) * 4 + q) * 32 + l];
    v *= load_scale<T>(scales, sf32, n);
    if (bias != nullptr) v += Mma<T>::to_f(bias[n]);
    out[static_cast<size_t>(m) * N + n] = static_cast<T>(v);
  }
}

// Native layout -> dense w [N, K] in T (for dequantize + cuBLAS at large M). One thread per
// lane chunk (16 bytes = 32 weights of rows 2p, 2p+1); four 16-byte stores.
template <typename T>
__global__ void w4_native_dequant_kernel(const int8_t* __restrict__ qw,
                                         const void* __restrict__ scales,
                                         const uint8_t* __restrict__ zeros, T* __restrict__ w,
                                         int N, int K, int G, int ss, int zs, int sf32) {
  const int U = K >> 6;
  const int P = N >> 1;
  const size_t ntiles = (P + 7) >> 3;
  const size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= ntiles * U * 32) return;
  const int lane = static_cast<int>(idx & 31);
  const size_t tu = idx >> 5;
  const int u = static_cast<int>(tu % U);
  const int tile = static_cast<int>(tu / U);
  const int g = lane >> 2, t = lane & 3;
  const int p = tile * 8 + g;
  if (p >= P) return;
  const uint4 wv = __ldg(reinterpret_cast<const uint4*>(qw) + idx);
  const uint32_t wj[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int k0 = 64 * u + 32 * h + 8 * t;
    const int grp = k0 / G;
    const size_t si = static_cast<size_t>(2 * p) * ss + grp;
    const float se = load_scale<T>(scales, sf32, si), so = load_scale<T>(scales, sf32, si + ss);
    int ze = 8, zo = 8;
    if (zeros != nullptr) {
      const size_t zi = static_cast<size_t>(2 * p) * zs + grp;
      ze = zeros[zi];
      zo = zeros[zi + zs];
    }
    uint32_t ev[4], ov[4];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const uint32_t word = wj[2 * h + jj];
      // nibble positions: e k0..k3 at 0, 4, 2, 6; o k0..k3 at 1, 5, 3, 7
      const int pe[4] = {0, 4, 2, 6};
      float fe[4], fo[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int ne = static_cast<int>(((word >> (4 * pe[q])) & 15u) ^ 8u);
        const int no = static_cast<int>(((word >> (4 * pe[q] + 4)) & 15u) ^ 8u);
        fe[q] = static_cast<float>(ne - ze) * se;
        fo[q] = static_cast<float>(no - zo) * so;
      }
      ev[2 * jj] = Mma<T>::pack(fe[0], fe[1]);
      ev[2 * jj + 1] = Mma<T>::pack(fe[2], fe[3]);
      ov[2 * jj] = Mma<T>::pack(fo[0], fo[1]);
      ov[2 * jj + 1] = Mma<T>::pack(fo[2], fo[3]);
    }
    *reinterpret_cast<uint4*>(w + static_cast<size_t>(2 * p) * K + k0) =
        make_uint4(ev[0], ev[1], ev[2], ev[3]);
    *reinterpret_cast<uint4*>(w + static_cast<size_t>(2 * p + 1) * K + k0) =
        make_uint4(ov[0], ov[1], ov[2], ov[3]);
  }
}

int g_max_smem = -1;

template <typename T, int MODE, int CU, int MT, int RT, int ST, bool SZ>
cudaError_t launch(const void* x, const void* qw, const void* s, const void* z, const void* b,
                   void* out, int M, int N, int K, int G, int ss, int sg, int zs, int wn, int ks,
                   cudaStream_t st) {
  auto kern = w4_mma_kernel<T, MODE, CU, MT, RT, ST, SZ>;
  if (SZ && z != nullptr) return cudaErrorInvalidValue;  // SZ assumes symmetric weights
  const int ring = ks * ST * (RT * 512 + (MODE == 2 ? MT * 1024 : 0)), red = ks * RT * MT * 512;
  const int smem = ring > red ? ring : red;
  static bool raised = false;  // one opt-in per instantiation, to the device's limit
  if (smem > 48 * 1024 && !raised) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         g_max_smem);
    if (e != cudaSuccess) return e;
    raised = true;
  }
  if (smem > g_max_smem) return cudaErrorInvalidValue;
  if (wn < 1 || ks % wn || (big_tile(MT, RT) && ks > 8)) return cudaErrorInvalidValue;  // bounds
  const int groups = ((N / 2 + 7) / 8 + RT * wn - 1) / (RT * wn);
  if (groups > 65535) return cudaErrorInvalidValue;
  const dim3 grid((M + 8 * MT - 1) / (8 * MT), groups);
  kern<<<grid, ks * 32, smem, st>>>(static_cast<const T*>(x), static_cast<const int8_t*>(qw), s,
                                    static_cast<const uint8_t*>(z), static_cast<const T*>(b),
                                    static_cast<T*>(out), M, N, K, G, ss, sg, zs, wn);
  return cudaGetLastError();
}

template <typename T, int MODE, int CU>
cudaError_t pick_tile(int mt, int rt, int st_, int sz, const void* x, const void* qw,
                      const void* s, const void* z, const void* b, void* out, int M, int N, int K,
                      int G, int ss, int sg, int zs, int wn, int ks, cudaStream_t st) {
  // (the Hopper layout compiles the MT <= 4 tiles only; SZ exists for MT < 8)
#define QL_T(A, B, C)                                                                         \
  if constexpr (MODE != 2 || A < 8) {                                                         \
    if (mt == A && rt == B && st_ == C && !sz)                                                \
      return launch<T, MODE, CU, A, B, C, false>(x, qw, s, z, b, out, M, N, K, G, ss, sg, zs, \
                                                 wn, ks, st);                                 \
  }                                                                                           \
  if constexpr (A < 8) {                                                                      \
    if (mt == A && rt == B && st_ == C && sz)                                                 \
      return launch<T, MODE, CU, A, B, C, true>(x, qw, s, z, b, out, M, N, K, G, ss, sg, zs,  \
                                                wn, ks, st);                                  \
  }
  QL_MMA_TILES
#undef QL_T
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t pick_mode(int layout, int mt, int rt, int st_, int sz, const void* x, const void* qw,
                      const void* s, const void* z, const void* b, void* out, int M, int N, int K,
                      int G, int ss, int sg, int zs, int wn, int ks, cudaStream_t st) {
#define QL_ARGS mt, rt, st_, sz, x, qw, s, z, b, out, M, N, K, G, ss, sg, zs, wn, ks, st
  if (layout == 0 && G == 64) return pick_tile<T, 0, 1>(QL_ARGS);
  if (layout == 0 && G == 128) return pick_tile<T, 0, 2>(QL_ARGS);
  if (layout == 1 && G == 32) return pick_tile<T, 1, 0>(QL_ARGS);
  if (layout == 1 && G == 64) return pick_tile<T, 1, 1>(QL_ARGS);
  if (layout == 1 && G == 128) return pick_tile<T, 1, 2>(QL_ARGS);
  if (layout == 2 && N % 16) return cudaErrorInvalidValue;
  if (layout == 2 && G == 32) return pick_tile<T, 2, 0>(QL_ARGS);
  if (layout == 2 && G == 64) return pick_tile<T, 2, 1>(QL_ARGS);
  if (layout == 2 && G == 128) return pick_tile<T, 2, 2>(QL_ARGS);
#undef QL_ARGS
  return cudaErrorInvalidValue;
}

#ifndef QL_W8_TILES
#define QL_W8_TILES                                                                           \
  QL_T(1, 1, 4) QL_T(1, 2, 4) QL_T(1, 1, 8) QL_T(1, 2, 8) QL_T(1, 1, 16) QL_T(1, 2, 16)       \
  QL_T(2, 1, 4) QL_T(2, 2, 4) QL_T(2, 1, 8) QL_T(2, 1, 16) QL_T(4, 1, 4) QL_T(4, 1, 8)
#endif

template <typename T, int MT, int RT, int ST>
cudaError_t launch_w8(const void* x, const void* qw, const void* s, const void* b, void* out,
                      int M, int N, int K, int wn, int ks, int sf32, cudaStream_t st) {
  auto kern = w8_mma_kernel<T, MT, RT, ST>;
  const int ring = ks * ST * (RT + MT) * 1024, red = ks * RT * MT * 512;
  const int smem = ring > red ? ring : red;
  static bool raised = false;  // one opt-in per instantiation, to the device's limit
  if (smem > 48 * 1024 && !raised) {
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         g_max_smem);
    if (e != cudaSuccess) return e;
    raised = true;
  }
  if (smem > g_max_smem || wn < 1 || ks % wn) return cudaErrorInvalidValue;
  const int groups = ((N + 15) / 16 + RT * wn - 1) / (RT * wn);
  if (groups > 65535) return cudaErrorInvalidValue;
  const dim3 grid((M + 8 * MT - 1) / (8 * MT), groups);
  kern<<<grid, ks * 32, smem, st>>>(static_cast<const T*>(x), static_cast<const int8_t*>(qw), s,
                                    static_cast<const T*>(b), static_cast<T*>(out), M, N, K, wn,
                                    sf32);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pick_w8(int mt, int rt, int st_, const void* x, const void* qw, const void* s,
                    const void* b, void* out, int M, int N, int K, int wn, int ks, int sf32,
                    cudaStream_t st) {
#define QL_T(A, B, C)                                                                    \
  if (mt == A && rt == B && st_ == C)                                                    \
    return launch_w8<T, A, B, C>(x, qw, s, b, out, M, N, K, wn, ks, sf32, st);
  QL_W8_TILES
#undef QL_T
  return cudaErrorInvalidValue;
}

cudaError_t set_device(int device) {
  int cur = -1;
  if (cudaGetDevice(&cur) != cudaSuccess || cur != device) {
    cudaError_t e = cudaSetDevice(device);
    if (e != cudaSuccess) return e;
  }
  if (g_max_smem < 0) {
    cudaError_t e =
        cudaDeviceGetAttribute(&g_max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace

// dtype: 0 = fp16, 1 = bf16 (x, bias, out, scales); wn: warps side by side on tiles (divides
// ks, the block's warps); layout: 0 checkpoint, 1 kernel-native, 2 Hopper; scale (n, grp) at
// n * ss + grp * sg, zero at n * zs + grp. Returns a cudaError_t (0 = launched); the caller checks
// shapes and alignment. sz = 1 runs the symmetric-only SZ kernel (z must be null; MT < 8).
extern "C" int ql_w4_mma(int device, const void* x, const void* qw, const void* s, const void* z,
                         const void* b, void* out, int M, int N, int K, int G, int ss, int sg,
                         int zs, int dtype, int wn, int layout, int mt, int rt, int st_, int ks,
                         int sz, void* stream) {
  cudaError_t e = set_device(device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (ks < 1 || ks > 16 || M < 1 || K % 64 || N % 2 || K % G)
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return static_cast<int>(pick_mode<__half>(layout, mt, rt, st_, sz, x, qw, s, z, b, out, M, N,
                                              K, G, ss, sg, zs, wn, ks, st));
  return static_cast<int>(pick_mode<__nv_bfloat16>(layout, mt, rt, st_, sz, x, qw, s, z, b, out, M,
                                                   N, K, G, ss, sg, zs, wn, ks, st));
}

// W8A16: x [M, K] fp16/bf16 (dtype 0/1), qw int8 [N, K] row-major, scales [N] in x's dtype or
// fp32 (sf32), bias [N] in x's dtype or null; (mt, rt, st_) one of QL_W8_TILES, ks warps per block
// in wn columns. Returns a cudaError_t (0 = launched).
extern "C" int ql_w8_mma(int device, const void* x, const void* qw, const void* s, const void* b,
                         void* out, int M, int N, int K, int dtype, int sf32, int wn, int mt,
                         int rt, int st_, int ks, void* stream) {
  cudaError_t e = set_device(device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (ks < 1 || ks > 16 || M < 1 || N < 1 || K < 64 || K % 64)
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return static_cast<int>(pick_w8<__half>(mt, rt, st_, x, qw, s, b, out, M, N, K, wn, ks, sf32, st));
  return static_cast<int>(
      pick_w8<__nv_bfloat16>(mt, rt, st_, x, qw, s, b, out, M, N, K, wn, ks, sf32, st));
}

extern "C" int ql_w4_native_dequant(int device, const void* qw, const void* s, const void* z,
                                    void* w, int N, int K, int G, int ss, int zs, int dtype,
                                    int sf32, void* stream) {
  cudaError_t e = set_device(device);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (K % 64 || N % 2 || G % 32 || K % G) return static_cast<int>(cudaErrorInvalidValue);
  const size_t threads = static_cast<size_t>((N / 2 + 7) / 8) * (K / 64) * 32;
  const unsigned blocks = static_cast<unsigned>((threads + 255) / 256);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    w4_native_dequant_kernel<__half><<<blocks, 256, 0, st>>>(
        static_cast<const int8_t*>(qw), s, static_cast<const uint8_t*>(z),
        static_cast<__half*>(w), N, K, G, ss, zs, sf32);
  else
    w4_native_dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, st>>>(
        static_cast<const int8_t*>(qw), s, static_cast<const uint8_t*>(z),
        static_cast<__nv_bfloat16*>(w), N, K, G, ss, zs, sf32);
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* ql_mma_error_string(int e) {
  return cudaGetErrorString(static_cast<cudaError_t>(e));
}
