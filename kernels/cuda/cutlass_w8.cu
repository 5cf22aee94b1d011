// quantlab W8A16 GEMM for sm_90a on CUTLASS 3 mixed-input collectives (kernels/cutlass_w8.py).
// y [M, N] = x [M, K] @ (q * s)^T runs as the swapped problem y^T = W x^T (shape N, M, K): the
// int8 weights (checkpoint layout [N, K], K contiguous, no permutation) are the wgmma A operand,
// converted in registers and multiplied by the per-channel scale (one scale "group" of K), x is
// the B operand from shared memory, and the TMA epilogue writes y [M, N] row-major.
#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace ql8 {
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Persist = void;
using StreamK = cutlass::gemm::StreamKScheduler;

template <class T, class Tile, class Sched>
struct W8Gemm {
  using LayoutW = cutlass::layout::RowMajor;     // W [N, K], K contiguous: A of the swapped problem
  using LayoutXt = cutlass::layout::ColumnMajor;  // x [M, K] row-major seen as B = x^T [K, M]
  using LayoutYt = cutlass::layout::ColumnMajor;  // y [M, N] row-major seen as y^T [N, M]
  static constexpr int AlignW = 16, AlignX = 8, AlignY = 8;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Shape<_1, _1, _1>,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutYt, AlignY, T,
      LayoutYt, AlignY, CoopEpi>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<int8_t, T>, LayoutW, AlignW,
      T, LayoutXt, AlignX, float, Tile, Shape<_1, _1, _1>,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      Coop>::CollectiveOp;
  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Sched>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static int run(const void* x, const void* qw, const void* scales, void* y, int m, int n, int k,
                 int sms, void* ws, size_t ws_bytes, cudaStream_t stream, size_t* need) {
    auto sw = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{},
                                               cute::make_shape(n, k, 1));
    auto sx = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{},
                                               cute::make_shape(m, k, 1));
    auto ss = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                               cute::make_shape(n, 1, 1));
    auto sy = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{},
                                               cute::make_shape(n, m, 1));
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {n, m, k, 1};
    args.mainloop = {reinterpret_cast<const int8_t*>(qw), sw, reinterpret_cast<const T*>(x), sx,
                     reinterpret_cast<const T*>(scales), ss, k};
    args.epilogue = {{1.0f, 0.0f}, nullptr, {}, reinterpret_cast<T*>(y), sy};
    args.hw_info.sm_count = sms;
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
}  // namespace ql8

using bf16 = cutlass::bfloat16_t;
using f16 = cutlass::half_t;

// QL_W8_CONFIGS is generated from CONFIGS in _cutlass_w8_src.py.
// @QL_W8_CONFIGS@ (replaced by the generated #define when the library is built)

#define QL_CASE(id, T, TN, TM, SC)                                                   \
  case id:                                                                           \
    return ql8::W8Gemm<T, Shape<Int<TN>, Int<TM>, _64>, ql8::SC>::run(x, qw, s, y, m, n, k, sms, \
                                                                    ws, ws_bytes, stream, need);

// x [M, K] and y [M, N] in the config's dtype, qw int8 [N, K], s [N] in that dtype; need != null:
// only report the workspace bytes. Returns 0 or an error code (see cutlass_w8.run_plan).
extern "C" int ql_cutlass_w8(int cfg, const void* x, const void* qw, const void* s, void* y, int m,
                             int n, int k, int sms, void* ws, size_t ws_bytes, cudaStream_t stream,
                             size_t* need) {
  switch (cfg) { QL_W8_CONFIGS(QL_CASE) }
  return 6;
}
