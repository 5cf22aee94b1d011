"""The one dispatch point: linear_w4a16 / linear_w8a16 / linear_w8a16_group / linear_fp8 /
linear_w8a8 as torch custom ops.

Each public function validates its arguments, flattens x [..., K] to [M, K] and calls a custom
op (quantlab::linear_*) whose fake implementation only computes the output shape, so
torch.compile traces through it and CUDA graphs capture the kernels it launches.

backend:
  "auto"       CUDA: the Triton plans tuned per (M bucket, N, K, group) (see _tune.py); FP8 uses
               torch._scaled_mm. CPU (or no triton): the torch reference.
  "reference"  dequantize-then-matmul in fp32 (kernels.reference), any device.
  "gemv" | "halves" | "splitk" | "tiled" | "dequant"  force one W4A16 path ("halves" is
               W4-only; W8A16 and group-wise W8A16 have the other four), tuned among that
               path's configs. Group-wise W8A16 (triton_w8a16_group.py) has these and "reference"
               only.
  "swap"       force the W4A16 Triton kernel with the weights as the dot's left operand
               (triton_w4a16_swap.py); "auto" tries it from M = 9 on.
  "cuda_gemv"  force the CUDA C++ W4A16 kernel for M <= 8 (cuda_gemv.py; nvcc builds it on
               first use); "auto" also tries it there and keeps it where it times fastest.
  "cuda_mma"   force the CUDA C++ tensor-core kernel (cuda_mma.py; any M; W4A16 on any of the three
               weight layouts, W8A16 with K % 64 == 0; "auto" tries its W8A16 plans up to
               M = 32); "auto" tries it for M <= 64 on the checkpoint and Hopper layouts,
               and on the kernel-native layout (packing.to_mma_layout) it is auto's path
               together with its dequantize + cuBLAS plan.
  "cutlass"    force the sm_90a GEMM on CUTLASS's mixed-input pipelines (W4: cutlass_w4.py, the
               Hopper layout (packing.to_wgmma_layout) only; W8: cutlass_w8.py, int8 [N, K] as
               it is, "auto" tries it from M = 64 on). On that layout "auto" tunes it
               together with cuda_mma's plans (M <= 64): one layout for decode and prefill.
W4 weights come in the checkpoint layout (int8 [N/2, K]), the kernel-native layout (int32
[ceil(N/16), K/64, 128], packing.to_mma_layout) or the Hopper layout (uint8 [N, K/2],
packing.to_wgmma_layout); N is scales.shape[0] for the last two. Paths that only read the
checkpoint layout (reference, Triton, cuda_gemv) convert another layout back on every call
(correct, but an extra pass over the weights).
  "scaled_mm"  force the FP8 cuBLASLt path.
Forced Triton paths on CPU tensors run only under TRITON_INTERPRET=1 (that is how tests use them).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from quantlab.kernels import packing
from quantlab.kernels.reference import (
    ref_linear_fp8,
    ref_linear_w4a16,
    ref_linear_w8a8,
    ref_linear_w8a16,
    ref_linear_w8a16_group,
)

W4_BACKENDS = (
    "auto",
    "reference",
    "gemv",
    "halves",
    "splitk",
    "tiled",
    "dequant",
    "swap",
    "cuda_gemv",
    "cuda_mma",
    "cutlass",
)
W8_BACKENDS = ("auto", "reference", "gemv", "splitk", "tiled", "dequant", "cuda_mma", "cutlass")
W8G_BACKENDS = ("auto", "reference", "gemv", "splitk", "tiled", "dequant")
FP8_BACKENDS = ("auto", "reference", "scaled_mm")
W8A8_BACKENDS = ("auto", "reference", "gemv", "splitk", "tiled")
TRITON_GROUPS = (32, 64, 128)


class KernelArgumentError(ValueError):
    """Arguments that no kernel of this format accepts (shape, dtype or backend)."""


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_reference(x: torch.Tensor, backend: str) -> bool:
    return backend == "reference" or (
        backend == "auto" and (not x.is_cuda or not _triton_available())
    )


def _check_x(x: torch.Tensor, k: int, name: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise KernelArgumentError(f"{name}: activations must be fp16 or bf16, got {x.dtype}")
    if x.shape[-1] != k:
        raise KernelArgumentError(f"{name}: x has K={x.shape[-1]} but the weight has K={k}")


def _op_or_impl(op: Any, impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The registered op while torch.compile traces (its fake kernel gives the shapes), else the
    plain implementation: eager calls skip the dispatcher's per-call cost (host time that the
    engine's eager mixed and prefill steps pay once per linear)."""
    return op if _DISPATCH_ALWAYS or torch.compiler.is_compiling() else impl


# QUANTLAB_KERNELS_DISPATCH=op: eager calls go through the registered op too (to measure its cost).
_DISPATCH_ALWAYS = os.environ.get("QUANTLAB_KERNELS_DISPATCH") == "op"


# ---- W4A16 -----------------------------------------------------------------------------------


def _linear_w4a16_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    n = packing.mma_layout_n(qweight, scales)
    native = packing.is_mma_layout(qweight)
    hopper = packing.is_wgmma_layout(qweight)
    if backend == "cutlass":
        from quantlab.kernels.cutlass_w4 import w4a16_cutlass_gemm

        y = w4a16_cutlass_gemm(x2, qweight, scales, zeros, group_size, bias)
    elif (
        hopper
        and backend == "auto"
        and x.is_cuda
        and (plans := _hopper_plans(x2, qweight, scales, zeros, group_size, bias))
    ):
        from quantlab.kernels.cutlass_w4 import w4a16_hopper_auto

        y = w4a16_hopper_auto(x2, qweight, scales, zeros, group_size, bias, plans=plans)
    elif backend == "cuda_mma":
        from quantlab.kernels.cuda_mma import w4a16_mma_gemm

        y = w4a16_mma_gemm(x2, qweight, scales, zeros, group_size, bias)
    elif native and backend == "auto" and x.is_cuda:
        from quantlab.kernels.cuda_mma import available, w4a16_native_auto

        if available(x.device):
            y = w4a16_native_auto(x2, qweight, scales, zeros, group_size, bias)
        else:  # no nvcc: the Triton plans on the weight converted back
            from quantlab.kernels.triton_w4a16 import w4a16_gemm

            qw = packing.from_mma_layout(qweight, n)
            y = w4a16_gemm(x2, qw, scales, zeros, group_size, bias, backend)
    else:
        qw = packing.w4_to_checkpoint(qweight, n)
        if _use_reference(x, backend):
            y = ref_linear_w4a16(x2, qw, scales, zeros, group_size, bias)
        elif backend == "cuda_gemv":
            from quantlab.kernels.cuda_gemv import w4a16_cuda_gemm

            y = w4a16_cuda_gemm(x2, qw, scales, zeros, group_size, bias)
        else:
            from quantlab.kernels.triton_w4a16 import w4a16_gemm

            y = w4a16_gemm(x2, qw, scales, zeros, group_size, bias, backend)
    return y.reshape(*x.shape[:-1], n)


def _hopper_plans(x, qweight, scales, zeros, group_size, bias) -> list:
    from quantlab.kernels.cutlass_w4 import hopper_plans

    return hopper_plans(x, qweight, scales, zeros, group_size, bias)


_linear_w4a16_op = torch.library.custom_op(
    "quantlab::linear_w4a16", _linear_w4a16_impl, mutates_args=()
)


@_linear_w4a16_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias, backend):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def check_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    backend: str,
) -> None:
    """Raise KernelArgumentError unless the W4A16 arguments fit (see reference.py for layouts)."""
    if backend not in W4_BACKENDS:
        raise KernelArgumentError(f"linear_w4a16: backend must be one of {W4_BACKENDS}")
    native = packing.is_mma_layout(qweight)
    hopper = packing.is_wgmma_layout(qweight)
    if native:
        n, k = scales.shape[0], qweight.shape[1] * packing.MMA_UNIT_K
        if n % 2 or -(-n // packing.MMA_TILE_ROWS) != qweight.shape[0]:
            raise KernelArgumentError(
                f"linear_w4a16: native qweight {tuple(qweight.shape)} does not hold N={n} rows "
                "(scales.shape[0])"
            )
    elif hopper:
        n, k = scales.shape[0], qweight.shape[1] * 2
        if qweight.shape[0] != n or n % packing.WGMMA_ATOM or k % packing.WGMMA_ATOM:
            raise KernelArgumentError(
                f"linear_w4a16: Hopper-layout qweight {tuple(qweight.shape)} must be uint8 "
                f"[N, K/2] with N = scales.shape[0] = {n} and N, K multiples of 16"
            )
    elif qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise KernelArgumentError(
            "linear_w4a16: qweight must be int8 [N // 2, K] (pack_int4_rows), the native "
            "int32 [ceil(N/16), K/64, 128] (to_mma_layout) or the Hopper uint8 [N, K/2] "
            "(to_wgmma_layout)"
        )
    else:
        n, k = qweight.shape[0] * 2, qweight.shape[1]
    _check_x(x, k, "linear_w4a16")
    if k % group_size or scales.shape != (n, k // group_size):
        raise KernelArgumentError(
            f"linear_w4a16: scales must be [{n}, {k}//{group_size}], got {tuple(scales.shape)}"
        )
    if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape):
        raise KernelArgumentError("linear_w4a16: zeros must be uint8 shaped like scales")
    if backend == "cuda_gemv":
        from quantlab.kernels.cuda_gemv import unsupported_reason

        reason = unsupported_reason(x, qweight, scales, zeros, group_size, None, False)
        if reason is None and native:
            reason = "reads the checkpoint layout only"
        if reason is not None:
            raise KernelArgumentError(f"linear_w4a16: backend 'cuda_gemv' {reason}")
    if backend == "cuda_mma":
        from quantlab.kernels.cuda_mma import unsupported_reason as mma_reason

        reason = mma_reason(x, qweight, scales, zeros, group_size, None, False)
        if reason is not None:
            raise KernelArgumentError(f"linear_w4a16: backend 'cuda_mma' {reason}")
    if backend == "cutlass":
        from quantlab.kernels.cutlass_w4 import unsupported_reason as cutlass_reason

        reason = cutlass_reason(x, qweight, scales, zeros, group_size, None, False)
        if reason is not None:
            raise KernelArgumentError(f"linear_w4a16: backend 'cutlass' {reason}")
    if backend not in ("auto", "reference", "cutlass") and group_size not in TRITON_GROUPS:
        raise KernelArgumentError(f"linear_w4a16: Triton paths support group sizes {TRITON_GROUPS}")
    if x.is_cuda and backend == "auto" and group_size not in TRITON_GROUPS:
        raise KernelArgumentError(
            f"linear_w4a16: group size {group_size} has no CUDA kernel; use {TRITON_GROUPS} or "
            "backend='reference'"
        )


def linear_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W4^T + bias; qweight int8 [N/2, K], scales [N, K/G], zeros uint8|None.

    perm (int64 [K], from packing.act_order_perm) gathers x's columns for act-order checkpoints
    whose weight columns were permuted offline; the weights are never permuted at run time.
    """
    check_w4a16(x, qweight, scales, zeros, group_size, backend)
    if perm is not None:
        x = x.index_select(-1, perm)
    return _op_or_impl(_linear_w4a16_op, _linear_w4a16_impl)(
        x, qweight, scales, zeros, group_size, bias, backend
    )


# ---- W8A16 -----------------------------------------------------------------------------------


def _linear_w8a16_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if _use_reference(x, backend):
        y = ref_linear_w8a16(x2, qweight, scales, bias)
    else:
        from quantlab.kernels.triton_w8a16 import w8a16_gemm

        y = w8a16_gemm(x2, qweight, scales, bias, backend)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


_linear_w8a16_op = torch.library.custom_op(
    "quantlab::linear_w8a16", _linear_w8a16_impl, mutates_args=()
)


@_linear_w8a16_op.register_fake
def _(x, qweight, scales, bias, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_w8a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (qweight int8 [N, K] * scales [N])^T + bias [N]."""
    if backend not in W8_BACKENDS:
        raise KernelArgumentError(f"linear_w8a16: backend must be one of {W8_BACKENDS}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise KernelArgumentError("linear_w8a16: qweight must be int8 [N, K]")
    _check_x(x, qweight.shape[1], "linear_w8a16")
    if scales.shape != (qweight.shape[0],):
        raise KernelArgumentError(f"linear_w8a16: scales must be [{qweight.shape[0]}]")
    if backend == "cuda_mma":
        from quantlab.kernels.cuda_mma import w8_unsupported_reason

        reason = w8_unsupported_reason(x, qweight, scales, bias, False)
        if reason is not None:
            raise KernelArgumentError(f"linear_w8a16: backend 'cuda_mma' {reason}")
    if backend == "cutlass":
        from quantlab.kernels.cutlass_w8 import unsupported_reason as cutlass8_reason

        reason = cutlass8_reason(x, qweight, scales, bias, False)
        if reason is not None:
            raise KernelArgumentError(f"linear_w8a16: backend 'cutlass' {reason}")
    return _op_or_impl(_linear_w8a16_op, _linear_w8a16_impl)(x, qweight, scales, bias, backend)


# ---- W8A16 group-wise (W8A16_GPTQ) ------------------------------------------------------------


def _linear_w8a16_group_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if _use_reference(x, backend):
        y = ref_linear_w8a16_group(x2, qweight, scales, zeros, group_size, bias)
    else:
        from quantlab.kernels.triton_w8a16_group import w8a16_group_gemm

        y = w8a16_group_gemm(x2, qweight, scales, zeros, group_size, bias, backend)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


_linear_w8a16_group_op = torch.library.custom_op(
    "quantlab::linear_w8a16_group", _linear_w8a16_group_impl, mutates_args=()
)


@_linear_w8a16_group_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_w8a16_group(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ ((qweight int8 [N, K] - zeros int8 [N, K/G]) * scales [N, K/G])^T
    + bias [N]; zeros None for symmetric groups."""
    name = "linear_w8a16_group"
    if backend not in W8G_BACKENDS:
        raise KernelArgumentError(f"{name}: backend must be one of {W8G_BACKENDS}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise KernelArgumentError(f"{name}: qweight must be int8 [N, K]")
    n, k = qweight.shape
    _check_x(x, k, name)
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise KernelArgumentError(
            f"{name}: group_size must be a power of two >= 16 dividing K={k}, got {group_size}"
        )
    groups = (n, k // group_size)
    if tuple(scales.shape) != groups or not scales.is_floating_point():
        raise KernelArgumentError(f"{name}: scales must be float [{n}, {groups[1]}]")
    if zeros is not None and (tuple(zeros.shape) != groups or zeros.dtype != torch.int8):
        raise KernelArgumentError(f"{name}: zeros must be int8 [{n}, {groups[1]}] or None")
    return _op_or_impl(_linear_w8a16_group_op, _linear_w8a16_group_impl)(
        x, qweight, scales, zeros, group_size, bias, backend
    )


# ---- FP8 W8A8 --------------------------------------------------------------------------------


def _linear_fp8_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    granularity: str,
    backend: str,
    fast_accum: bool = False,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    # _scaled_mm needs sm_89+ (Ada/Hopper fp8 tensor cores); older GPUs use the reference.
    fast = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
    if backend == "reference" or (backend == "auto" and not fast):
        y = ref_linear_fp8(x2, weight, weight_scale, bias, x_scale, granularity)
    else:
        from quantlab.kernels.fp8 import fp8_scaled_mm

        y = fp8_scaled_mm(x2, weight, weight_scale, bias, x_scale, granularity, fast_accum)
    return y.reshape(*x.shape[:-1], weight.shape[0])


_linear_fp8_op = torch.library.custom_op("quantlab::linear_fp8", _linear_fp8_impl, mutates_args=())


@_linear_fp8_op.register_fake
def _(x, weight, weight_scale, bias, x_scale, granularity, backend, fast_accum=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    granularity: str = "tensor",
    backend: str = "auto",
    fast_accum: bool = False,
) -> torch.Tensor:
    """y [..., N] from x [..., K] (quantized to e4m3 per tensor or per row) and e4m3 weight [N, K].

    weight_scale: fp32 [1] ('tensor') or [N] ('row'); x_scale: optional static fp32 [1] scale;
    fast_accum: FP8 tensor-core accumulation without fp32 promotion (cuBLASLt; the reference
    ignores it).
    """
    if backend not in FP8_BACKENDS:
        raise KernelArgumentError(f"linear_fp8: backend must be one of {FP8_BACKENDS}")
    if granularity not in ("tensor", "row"):
        raise KernelArgumentError("linear_fp8: granularity must be 'tensor' or 'row'")
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise KernelArgumentError("linear_fp8: weight must be float8_e4m3fn [N, K]")
    _check_x(x, weight.shape[1], "linear_fp8")
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        raise KernelArgumentError("linear_fp8: N and K must be multiples of 16 (cuBLASLt fp8)")
    return _op_or_impl(_linear_fp8_op, _linear_fp8_impl)(
        x, weight, weight_scale, bias, x_scale, granularity, backend, fast_accum
    )


# ---- SmoothQuant W8A8 (int8 activations) -----------------------------------------------------


def _linear_w8a8_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    x_scale: torch.Tensor | None,
    pre: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if _use_reference(x, backend):
        y = ref_linear_w8a8(x2, qweight, weight_scale, bias, x_scale, pre)
    else:
        from quantlab.kernels.triton_w8a8 import w8a8_gemm

        y = w8a8_gemm(x2, qweight, weight_scale, bias, x_scale, pre, backend)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


_linear_w8a8_op = torch.library.custom_op(
    "quantlab::linear_w8a8", _linear_w8a8_impl, mutates_args=()
)


@_linear_w8a8_op.register_fake
def _(x, qweight, weight_scale, bias, x_scale, pre, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_w8a8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """SmoothQuant W8A8: y [..., N] from x [..., K] (* pre [K]) quantized to int8 (static x_scale
    or per token) and int8 qweight [N, K] with fp32 weight_scale [1] or [N]; int32 accumulation.

    The reference also takes fp32 activations (CPU engines); the Triton path wants fp16/bf16."""
    if backend not in W8A8_BACKENDS:
        raise KernelArgumentError(f"linear_w8a8: backend must be one of {W8A8_BACKENDS}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise KernelArgumentError("linear_w8a8: qweight must be int8 [N, K]")
    if x.shape[-1] != qweight.shape[1]:
        raise KernelArgumentError(
            f"linear_w8a8: x has K={x.shape[-1]} but the weight has K={qweight.shape[1]}"
        )
    if weight_scale.numel() not in (1, qweight.shape[0]):
        raise KernelArgumentError(f"linear_w8a8: weight_scale must be [1] or [{qweight.shape[0]}]")
    if x_scale is not None and x_scale.numel() != 1:
        raise KernelArgumentError("linear_w8a8: x_scale must be one static scale")
    if pre is not None and pre.shape != (qweight.shape[1],):
        raise KernelArgumentError(f"linear_w8a8: pre must be [{qweight.shape[1]}]")
    if not _use_reference(x, backend):
        _check_x(x, qweight.shape[1], "linear_w8a8")
    return _op_or_impl(_linear_w8a8_op, _linear_w8a8_impl)(
        x, qweight, weight_scale, bias, x_scale, pre, backend
    )
