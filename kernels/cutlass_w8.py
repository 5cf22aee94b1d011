"""W8A16 GEMM for Hopper (sm_90a) on CUTLASS's mixed-input collectives ("cutlass_w8").

The large-M companion of cuda_mma's W8 kernel. y [M, N] = x [M, K] @ (q * s)^T runs as
y^T = W x^T: the int8 weights, in the checkpoint layout [N, K] as they are, are the operand wgmma
reads from registers. Consumer warpgroups convert them to fp16/bf16 and multiply by the
per-channel scale (CUTLASS's scale mode with one group spanning K) before the wgmma; x tiles come
through TMA. Bias is added afterwards. Build, cache and CUTLASS headers work as for cutlass_w4
(the same nvcc flags; a library built elsewhere for sm_90a can be carried in).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from quantlab.kernels._cutlass_w8_src import CONFIGS, SOURCE
from quantlab.kernels._tune import Plan, m_bucket, plan
from quantlab.kernels.cuda_gemv import can_load
from quantlab.kernels.cutlass_w4 import LAUNCH_ERRORS, TILE_K, build_cutlass, sm_count

STEM = "w8a16_cutlass"
# "auto" on W8A16 adds these plans from this M bucket on (below it cuda_mma's W8 plans stream the
# weights faster than any 64-row wgmma tile).
MIN_M = 64
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: str | None = None


def build(verbose: bool = False) -> Path:
    """Compile the library for sm_90a (cached; needs nvcc and the CUTLASS headers); its path."""
    return build_cutlass(SOURCE, STEM, verbose)


def _load() -> ctypes.CDLL:
    global _lib, _build_error
    with _lock:
        if _lib is not None:
            return _lib
        if _build_error is not None:
            raise RuntimeError(_build_error)
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError) as err:
            _build_error = str(err)
            raise
        lib.ql_cutlass_w8.restype = ctypes.c_int
        # config, 4 pointers (x, qweight, scales, y), m n k sms, workspace + bytes, stream,
        # size_t* (non-null: only report the workspace bytes)
        lib.ql_cutlass_w8.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 4,
            *[ctypes.c_int] * 4,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        _lib = lib
        return lib


def available(device: torch.device) -> bool:
    """True on sm_90 if the library is (or can now be) built and loaded; never builds under capture."""
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return _lib is not None or can_load(_build_error, _load)


def unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    check_x_layout: bool = True,
) -> str | None:
    """Why cutlass_w8 cannot take x [M, K], qweight int8 [N, K], scales [N], bias; else None.

    check_x_layout=False skips the data-pointer alignment checks and x's contiguity (what
    torch.compile cannot trace; the op checks them again at run time)."""
    if not x.is_cuda:
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return "needs an sm_90 (Hopper) GPU"
    n, k = qweight.shape
    if n % 16 or k % TILE_K:
        return f"needs N % 16 == 0 and K % {TILE_K} == 0, got N={n} K={k}"
    if not qweight.is_contiguous() or (check_x_layout and qweight.data_ptr() % 16):
        return "qweight must be contiguous and 16-byte aligned"
    if check_x_layout and (x.data_ptr() % 16 or not x.is_contiguous()):
        return "x must be contiguous and 16-byte aligned"
    if max(n, k) >= 2**31 or x.numel() >= 2**31:
        return "shape too large"
    return None


def candidates(x_dtype: torch.dtype, m: int) -> list[Plan]:
    """The compiled configurations for x's dtype whose activation tile fits M."""
    dt = "f16" if x_dtype == torch.float16 else "bf16"
    rows = [c for c in CONFIGS if c["dtype"] == dt]
    fit = [c for c in rows if c["tile_m"] <= max(64, m_bucket(m))] or rows
    return [plan("cutlass_w8", ID=c["id"], TN=c["tile_n"], TM=c["tile_m"]) for c in fit]


def run_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Launch one plan: x [M, K] fp16/bf16 @ (qweight int8 [N, K] * scales [N])^T -> [M, N].

    scales in any float dtype (cast to x's); bias [N] or None; fill poisons the output first.
    """
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if fill is not None:
        out.fill_(fill)
    if m == 0:
        return out
    lib = _load()
    s = scales.to(x.dtype).contiguous()  # no copy when already so
    cfg = p.get("ID")
    sms = sm_count(x.device)
    need = ctypes.c_size_t(0)
    args = (x.data_ptr(), qweight.data_ptr(), s.data_ptr(), out.data_ptr(), m, n, k, sms)
    lib.ql_cutlass_w8(cfg, *args, None, 0, None, ctypes.byref(need))
    ws = torch.empty(max(int(need.value), 1), dtype=torch.uint8, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = lib.ql_cutlass_w8(cfg, *args, ws.data_ptr(), ws.numel(), stream, None)
    if err:
        raise RuntimeError(f"cutlass_w8 plan {p}: {LAUNCH_ERRORS.get(err, err)}")
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


if (
    __name__ == "__main__"
):  # prebuild the library (no GPU needed): python -m quantlab.kernels.cutlass_w8
    print(build(verbose=False))
