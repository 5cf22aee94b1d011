// quantlab W4A16 GEMM for sm_90a on CUTLASS 3 mixed-input collectives (kernels/cutlass_w4.py).
// y [M, N] = x [M, K] @ W^T runs as the swapped problem y^T = W x^T (shape N, M, K) so that the
// int4 weights are the wgmma A operand read from registers; the output is written transposed back
// by the TMA epilogue. Weights: int4 [N, K] permuted into warp-fragment order (ShuffleAtom below;
// packing.to_wgmma_layout writes it). Scales (and zeros) [K/G, N], N contiguous, in x's dtype;
// asym: w = q * s + z with z = -(zp - 8) * s (codes are stored as u - 8).
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace ql {

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using Persist = void;
using StreamK = cutlass::gemm::StreamKScheduler;

using LayoutW = cutlass::layout::ColumnMajor;  // W^T [K, N], K contiguous (un-swapped B)
using StrideW = cutlass::detail::TagToStrideB_t<LayoutW>;

// Shuffled weight layout. One atom covers 16 weight rows x 16 k: the A fragment of one warp for
// one k16 step of a 16-bit wgmma. Lane l holds rows r0 = l / 4 (+ 8 r1) and k = 2 (l % 4) + kk0
// (+ 8 kk2); its 8 values v = kk0 + 2 r1 + 4 kk2 are stored at 8 l + p with p = 4 (v % 2) + v / 2
// (value order 0,2,4,6,1,3,5,7, which lets the converter expand nibble pairs with one shift).
// offset(r, k) = 32 (r % 8) + (r / 8) + 4 (k % 2) + 8 ((k % 8) / 2) + 2 (k / 8).
using ShuffleAtom = Layout<Shape<Shape<_8, _2>, Shape<_2, _4, _2>>,
                           Stride<Stride<_32, _1>, Stride<_4, _8, _2>>>;
// Atoms tile the matrix with the weight-row direction fastest: 256 nibbles per atom,
// atom (i, j) at 256 (i + j N / 16).
using ShuffledW = decltype(cute::tile_to_shape(ShuffleAtom{}, Layout<Shape<int, int, int>, StrideW>{}));
template <class T, bool Zero, class Tile, class Cluster, class Kernel, class Epi, class Sched>
struct W4Gemm {
  using LayoutX = cutlass::layout::RowMajor;  // x [M, K] (un-swapped A)
  using LayoutY = cutlass::layout::RowMajor;  // y [M, N]
  using LayoutXt = typename cutlass::layout::LayoutTranspose<LayoutX>::type;
  using LayoutYt = typename cutlass::layout::LayoutTranspose<LayoutY>::type;
  static constexpr int AlignX = 8, AlignW = 32, AlignY = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutYt, AlignY, T,
      LayoutYt, AlignY, Epi>::CollectiveOp;
  using WElem = cute::conditional_t<Zero, cute::tuple<cutlass::int4b_t, T, T>,
                                    cute::tuple<cutlass::int4b_t, T>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, WElem, ShuffledW, AlignW, T,
      LayoutXt, AlignX, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Kernel>::CollectiveOp;
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Sched>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static int run(const void* x, const void* qw, const void* scales, const void* zeros, void* y,
                 int m, int n, int k, int g, int sms, int decomp, int splits, int nondet,
                 void* ws, size_t ws_bytes, cudaStream_t stream, size_t* need) {
    using StrideX = cutlass::detail::TagToStrideA_t<LayoutX>;
    using StrideS = typename Mainloop::StrideScale;
    auto sx = cutlass::make_cute_packed_stride(StrideX{}, cute::make_shape(m, k, 1));
    auto ss = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(n, k / g, 1));
    auto sy = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{},
                                               cute::make_shape(n, m, 1));
    auto dw = cute::tile_to_shape(ShuffleAtom{}, cute::make_shape(n, k, 1));
    auto pw = reinterpret_cast<const cutlass::int4b_t*>(qw);
    auto px = reinterpret_cast<const T*>(x);
    auto ps = reinterpret_cast<const T*>(scales);
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {n, m, k, 1};
    if constexpr (Zero) {
      args.mainloop = {pw, dw, px, sx, ps, ss, g, reinterpret_cast<const T*>(zeros)};
    } else {
      args.mainloop = {pw, dw, px, sx, ps, ss, g};
    }
    args.epilogue = {{1.0f, 0.0f}, nullptr, {}, reinterpret_cast<T*>(y), sy};
    args.hw_info.sm_count = sms;
    if constexpr (std::is_same_v<Sched, StreamK>) {
      // decomp: 0 heuristic, 1 data-parallel, 2 split-K (into `splits`), 3 stream-K;
      // nondet: 1 lets the K pieces of a tile be summed in any order (atomics, not a turnstile)
      using Dm = decltype(args.scheduler.decomposition_mode);
      using Rm = decltype(args.scheduler.reduction_mode);
      args.scheduler.decomposition_mode = static_cast<Dm>(decomp);
      args.scheduler.splits = splits;
      args.scheduler.reduction_mode = static_cast<Rm>(nondet);
    }
    size_t bytes = Gemm::get_workspace_size(args);
    if (need != nullptr) {
      *need = bytes;
      return 0;
    }
    if (bytes > ws_bytes) return 1;
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 2;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

}  // namespace ql

using bf16 = cutlass::bfloat16_t;
using f16 = cutlass::half_t;

// QL_W4_CONFIGS is generated from CONFIGS in _cutlass_w4_src.py.
// @QL_W4_CONFIGS@ (replaced by the generated #define when the library is built)
#define QL_CASE(id, T, Z, TN, TM, KS, ES, SC, CL, TK)                                         \
  case id:                                                                                      \
    return ql::W4Gemm<T, Z, Shape<Int<TN>, Int<TM>, Int<TK>>, Shape<Int<CL>, _1, _1>, ql::KS,   \
                      ql::ES, ql::SC>::run(x, qw, s, z, y, m, n, k, g, sms, decomp, splits,     \
                                           nondet, ws, ws_bytes, stream, need);

extern "C" int ql_cutlass_w4(int cfg, const void* x, const void* qw, const void* s, const void* z,
                             void* y, int m, int n, int k, int g, int sms, int decomp, int splits,
                             int nondet, void* ws, size_t ws_bytes, cudaStream_t stream,
                             size_t* need) {
  switch (cfg) { QL_W4_CONFIGS(QL_CASE) }
  return 6;
}

