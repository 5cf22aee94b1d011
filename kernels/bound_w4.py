"""W4A16 launches bound to one linear's weights: the Hopper-layout plans with their host work done once.

`linear_w4a16` checks its arguments, lists and tunes plans and rebuilds the launch arguments on
every call: 80-270 µs of host time per call on an H100 (docs/engine.md, run 10), which an eager
engine step pays once per linear. `bind_hopper` does that work once for one M bucket and returns a
function of x alone that allocates the output, launches the tuned plan with the weights' pointers,
strides and plan fields already converted, and returns. The weight tensors are held by the
function, so their pointers stay valid while it lives; a caller that moves or replaces the weights
must bind again.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from quantlab.kernels import cuda_mma, cutlass_w4, packing
from quantlab.kernels._tune import Plan

Launch = Callable[[torch.Tensor], torch.Tensor]


def _stream_fn(device: torch.device) -> Callable[[], int]:
    """A function returning the current CUDA stream's handle on device (torch's raw getter when
    it has one: the public one costs a few µs per call)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return lambda: int(raw(idx))
    return lambda: int(torch.cuda.current_stream(device).cuda_stream)


def bind_mma(
    p: Plan,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Launch:
    """cuda_mma.run_plan with all but x fixed: x [M, K] contiguous in dtype -> [M, N]."""
    lib = cuda_mma._load(device)
    dev = device.index if device.index is not None else torch.cuda.current_device()
    cfg = dict(p.cfg)
    n = scales.shape[0]
    weights = (
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else None,
        bias.data_ptr() if bias is not None else None,
    )
    tail = (
        n,
        k,
        group_size,
        scales.stride(0),
        scales.stride(1),
        zeros.stride(0) if zeros is not None else 0,
        0 if dtype == torch.float16 else 1,
        cfg["WN"],
        cuda_mma.layout_id(qweight),
        cfg["MT"],
        cfg["RT"],
        cfg["ST"],
        cfg["KS"],
        cfg.get("SZ", 0),
    )
    stream = _stream_fn(device)
    fn = lib.ql_w4_mma
    held = (qweight, scales, zeros, bias)

    def launch(x: torch.Tensor) -> torch.Tensor:
        assert held  # the closure keeps the weights (and so their pointers) alive
        m = x.shape[0]
        out = torch.empty((m, n), dtype=dtype, device=device)
        err = fn(dev, x.data_ptr(), *weights, out.data_ptr(), m, *tail, stream())
        if err:
            raise RuntimeError(f"cuda_mma launch failed: {lib.ql_mma_error_string(err).decode()}")
        return out

    return launch


def bind_cutlass(
    p: Plan,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Launch:
    """cutlass_w4.run_plan with all but x fixed: x [M, K] contiguous in dtype -> [M, N]. The
    kernel's N-major scales (and pre-scaled zeros) are made once, not per call; the workspace
    size is asked once per M."""
    lib = cutlass_w4._load()
    st, zt = cutlass_w4.kernel_scales(scales, zeros, dtype)
    sched = dict(p.cfg)
    sk = (sched.get("DM", 0), sched.get("SP", 1), sched.get("ND", 0))
    n = scales.shape[0]
    head = (sched["ID"],)
    weights = (qweight.data_ptr(), st.data_ptr(), 0 if zt is None else zt.data_ptr())
    shape = (n, k, group_size, cutlass_w4.sm_count(device), *sk)
    bias_c = None if bias is None else bias.to(dtype)
    stream = _stream_fn(device)
    fn = lib.ql_cutlass_w4
    needs: dict[int, int] = {}
    held = (qweight, st, zt)

    def launch(x: torch.Tensor) -> torch.Tensor:
        assert held  # the closure keeps the weights (and so their pointers) alive
        m = x.shape[0]
        out = torch.empty((m, n), dtype=dtype, device=device)
        if m == 0:
            return out
        ptrs = (*head, x.data_ptr(), *weights, out.data_ptr(), m, *shape)
        need = needs.get(m)
        if need is None:
            c = ctypes.c_size_t(0)
            fn(*ptrs, None, 0, None, ctypes.byref(c))
            need = needs[m] = max(int(c.value), 1)
        ws = torch.empty(need, dtype=torch.uint8, device=device)
        err = fn(*ptrs, ws.data_ptr(), need, stream(), None)
        if err:
            raise RuntimeError(f"cutlass_w4 plan {p}: {cutlass_w4.LAUNCH_ERRORS.get(err, err)}")
        if bias_c is not None:
            out.add_(bias_c)
        return out

    return launch


def bind_hopper(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    plans: list[Plan],
) -> Launch:
    """The plan w4a16_hopper_auto picks for x's M bucket (tuned now on x [M, K] if not yet), bound
    to these weights: returns f(x [M', K]) -> [M', N] for any M' of that bucket."""
    chosen = cutlass_w4.pick_hopper(x, qweight, scales, zeros, group_size, bias, plans)
    bind = bind_mma if chosen.backend == "cuda_mma" else bind_cutlass
    return bind(chosen, qweight, scales, zeros, group_size, bias, x.shape[1], x.dtype, x.device)


def bind_w4a16(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> Launch:
    """linear_w4a16 bound to one linear's weights for x's M bucket: f(x [..., K]) -> [..., N].

    The arguments are checked once, here (KernelArgumentError as linear_w4a16 raises it). On the
    Hopper layout with backend "auto" on CUDA, the tuned plan for x's M bucket is bound with its
    launch arguments precomputed (bind_hopper); otherwise f calls linear_w4a16's implementation
    without its per-call checks. f's x must keep the dtype, device and K of the x given here, and
    its rows should stay in the same M bucket (another bucket runs, untuned for it, on this
    bucket's plan; a caller keeps one f per bucket). Not for use under torch.compile or while a
    CUDA graph is being captured (tuning cannot run there): bind first, then capture.
    """
    from quantlab.kernels import ops

    ops.check_w4a16(x, qweight, scales, zeros, group_size, backend)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    n = packing.mma_layout_n(qweight, scales)
    plans: list[Plan] = []
    if packing.is_wgmma_layout(qweight) and backend == "auto" and x.is_cuda:
        plans = cutlass_w4.hopper_plans(x2, qweight, scales, zeros, group_size, bias)
    if plans:
        run = bind_hopper(x2, qweight, scales, zeros, group_size, bias, plans)
    else:
        run = functools.partial(
            ops._linear_w4a16_impl,
            qweight=qweight,
            scales=scales,
            zeros=zeros,
            group_size=group_size,
            bias=bias,
            backend=backend,
        )

    def call(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if not x2.is_contiguous() or x2.data_ptr() % 16:  # the kernels read 16-byte vectors
            x2 = x2.clone(memory_format=torch.contiguous_format)
        return run(x2).reshape(*x.shape[:-1], n)

    return call
