"""W4A16 GEMM for Hopper (sm_90a) on CUTLASS's mixed-input collectives ("cutlass_w4").

y [M, N] = x [M, K] @ W^T runs as y^T = W x^T, so the int4 weights are the operand wgmma reads
from registers: a TMA producer warp streams weight, scale and x tiles into shared memory, two
consumer warpgroups turn nibbles into fp16/bf16 (times the group scale, plus the pre-scaled zero)
and issue wgmma, and a TMA epilogue writes y. The weights must be in the Hopper layout
(packing.to_wgmma_layout: a pure permutation of the checkpoint's nibbles so that one 32-bit load
gives a lane its whole fragment); the scales are read N-major ([K/G, N] storage), the zero points
as -(z - 8) * s in x's dtype. Both are derived per call unless scales already arrive N-major.

The kernel source is ours (_cutlass_w4_src.py); CUTLASS (headers from the `nvidia-cutlass` wheel,
or QUANTLAB_CUTLASS_DIR) supplies the pipelines. nvcc builds the library on first use into the
same cache as the other CUDA kernels (cuda_gemv.build_library), named by a hash of source and
flags, so a library built elsewhere for sm_90a can be carried in. Group sizes: multiples of 64
(the K tile). Plans: the C++ table's configurations for x's dtype and the zero mode.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from pathlib import Path

import torch
from quantlab.kernels import packing
from quantlab.kernels._cutlass_w4_src import CONFIGS, SOURCE
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan
from quantlab.kernels.cuda_gemv import build_library, can_load, library_path

STEM = "w4a16_cutlass"
ARCH = "90a"  # wgmma and setmaxnreg: sm_90a only
FLAGS = ("--expt-relaxed-constexpr", "-DNDEBUG", "-Xcudafe", "--diag_suppress=177")
TILE_K = 64

TUNER = Tuner("w4a16_cutlass")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: str | None = None
_sms: dict[int, int] = {}
# return codes of the CUTLASS entry points (ql_cutlass_w4, ql_cutlass_w8)
LAUNCH_ERRORS = {1: "workspace too small", 2: "problem not supported", 3: "initialize failed",
                 4: "launch failed", 5: "CUDA error", 6: "unknown configuration"}  # fmt: skip


def cutlass_include_dirs() -> tuple[Path, Path]:
    """(include, tools/util/include) of CUTLASS: QUANTLAB_CUTLASS_DIR or the nvidia-cutlass wheel."""
    root_env = os.environ.get("QUANTLAB_CUTLASS_DIR")
    if root_env:
        root = Path(root_env)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or spec.origin is None:
            raise RuntimeError(
                "cutlass_w4: CUTLASS headers not found. Install them with "
                "`pip install --no-deps nvidia-cutlass==4.2.0.0` or point QUANTLAB_CUTLASS_DIR at a "
                "CUTLASS checkout (the folder holding include/ and tools/)."
            )
        root = Path(spec.origin).parent / "source"
    inc, util = root / "include", root / "tools" / "util" / "include"
    if not (inc / "cutlass" / "cutlass.h").is_file():
        raise RuntimeError(f"cutlass_w4: {inc} holds no cutlass/cutlass.h")
    return inc, util


def build_cutlass(source: str, stem: str, verbose: bool = False) -> Path:
    """Compile a CUTLASS-based source for sm_90a into the cache (needs nvcc and the CUTLASS
    headers only when no library of this source hash is there yet); its path."""
    cached = library_path(source, stem, ARCH, FLAGS)
    if cached.is_file():  # built earlier, here or elsewhere: no headers needed
        return cached
    return build_library(
        source,
        stem,
        arch=ARCH,
        verbose=verbose,
        extra_flags=FLAGS,
        include_dirs=cutlass_include_dirs(),
    )


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
        lib.ql_cutlass_w4.restype = ctypes.c_int
        # config, 5 pointers (x, qweight, scales, zeros, y), m n k g sms, stream-K decomposition
        # + splits + reduction mode, workspace + bytes, stream, size_t* (non-null: only report
        # the workspace bytes)
        lib.ql_cutlass_w4.argtypes = [
            ctypes.c_int,
            *[ctypes.c_void_p] * 5,
            *[ctypes.c_int] * 8,
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
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    check_x_layout: bool = True,
) -> str | None:
    """Why the cutlass_w4 kernel cannot take these arguments (x [M, K] or [..., K]), else None.

    Pure Python (no build); check_x_layout=False skips the data-pointer alignment checks and x's
    contiguity (what torch.compile cannot trace; the op checks them again at run time).
    """
    if not x.is_cuda:
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return "needs an sm_90 (Hopper) GPU"
    if not packing.is_wgmma_layout(qweight):
        return "reads the Hopper layout only (packing.to_wgmma_layout)"
    n, k = scales.shape[0], x.shape[-1]
    if n % 16 or k % TILE_K:
        return f"needs N % 16 == 0 and K % {TILE_K} == 0, got N={n} K={k}"
    if group_size % TILE_K:
        return f"group size must be a multiple of {TILE_K}, got {group_size}"
    if not qweight.is_contiguous() or (check_x_layout and qweight.data_ptr() % 16):
        return "qweight must be contiguous and 16-byte aligned"
    if bias is not None and bias.shape != (n,):
        return f"bias must be [{n}]"
    if check_x_layout and (x.data_ptr() % 16 or not x.is_contiguous()):
        return "x must be contiguous and 16-byte aligned"
    if max(n, k) >= 2**31 or x.numel() >= 2**31:
        return "shape too large"
    return None


def candidates(x_dtype: torch.dtype, asym: bool, m: int, group_size: int = 128) -> list[Plan]:
    """The compiled configurations for this dtype and zero mode whose activation tile fits M and
    whose k step divides the group size (plan keys: ID, TN, TM, and CL / TK where not 1 / 64,
    PP=1 for the ping-pong schedule, DM / SP for a forced stream-K decomposition)."""
    return list(_candidates(x_dtype, asym, m_bucket(m), group_size))


@functools.lru_cache(maxsize=256)
def _candidates(x_dtype: torch.dtype, asym: bool, b: int, group_size: int) -> tuple[Plan, ...]:
    """candidates() per M bucket, built once (the engine's eager steps ask on every linear)."""
    dt = "f16" if x_dtype == torch.float16 else "bf16"
    rows = [
        c
        for c in CONFIGS
        if c["dtype"] == dt and c["zero"] == asym and group_size % c["tile_k"] == 0
    ]
    fit = [c for c in rows if c["tile_m"] <= max(64, b)] or rows
    out = []
    for c in fit:
        extra = {"CL": c["cluster"]} if c["cluster"] != 1 else {}
        extra |= {"TK": c["tile_k"]} if c["tile_k"] != TILE_K else {}
        extra |= {"PP": 1} if c["sched"] == "pingpong" else {}
        base = dict(ID=c["id"], TN=c["tile_n"], TM=c["tile_m"], **extra)
        out.append(plan("cutlass_w4", **base))
        for sk in _stream_k_variants(c):
            out.append(plan("cutlass_w4", **base, **sk))
    return tuple(out)


def _stream_k_variants(c: dict) -> list[dict[str, int]]:
    """Runtime decompositions tried besides CUTLASS's heuristic on a stream-K configuration, all
    with the deterministic (turnstile) reduction: split-K in 2 and 4 for 128-row tiles of up to
    128 activation rows, forced stream-K for 256-activation-row tiles (run 35's probe: each won
    somewhere at M = 64 or 256; data-parallel and split 8 never did)."""
    if c["sched"] != "streamk":
        return []
    if c["tile_n"] == 128 and c["tile_m"] <= 128:
        return [{"DM": 2, "SP": 2}, {"DM": 2, "SP": 4}]
    if c["tile_m"] == 256:
        return [{"DM": 3}]
    return []


def sm_count(device: torch.device) -> int:
    """Number of SMs of device (cached)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sms:
        _sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sms[idx]


def kernel_scales(
    scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scales [N, K/G] and zeros uint8 [N, K/G] -> the kernel's ([K/G, N], -(z - 8) * s [K/G, N])
    in dtype, N contiguous. No copy when scales already are N-major in dtype (scales.t() contiguous).
    """
    st = scales.t()
    if st.dtype != dtype or not st.is_contiguous():
        st = st.to(dtype).contiguous()
    if zeros is None:
        return st, None
    zt = (-(zeros.t().float() - packing.ASYM_OFFSET) * st.float()).to(dtype).contiguous()
    return st, zt


def run_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Launch one plan: x [M, K] fp16/bf16 -> out [M, N] in x's dtype.

    qweight uint8 [N, K/2] (Hopper layout); scales [N, K/G] (any float dtype, N-major storage
    avoids a copy); zeros uint8 [N, K/G] or None; bias [N] or None. fill poisons the output.
    """
    m, k = x.shape
    n = scales.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if fill is not None:
        out.fill_(fill)
    if m == 0:
        return out
    lib = _load()
    st, zt = kernel_scales(scales, zeros, x.dtype)
    cfg = p.get("ID")
    # stream-K configurations: DM decomposition (0 heuristic, 1 data-parallel, 2 split-K into SP
    # pieces, 3 stream-K); ND 1 sums a tile's K pieces in any order (not bit-reproducible)
    sched = dict(p.cfg)
    sk = (sched.get("DM", 0), sched.get("SP", 1), sched.get("ND", 0))
    sms = sm_count(x.device)
    need = ctypes.c_size_t(0)
    args = (x.data_ptr(), qweight.data_ptr(), st.data_ptr(), 0 if zt is None else zt.data_ptr())
    lib.ql_cutlass_w4(cfg, *args, out.data_ptr(), m, n, k, group_size, sms, *sk, None, 0, None,
                      ctypes.byref(need))  # fmt: skip
    ws = torch.empty(max(int(need.value), 1), dtype=torch.uint8, device=x.device)
    err = lib.ql_cutlass_w4(
        cfg,
        *args,
        out.data_ptr(),
        m,
        n,
        k,
        group_size,
        sms,
        *sk,
        ws.data_ptr(),
        ws.numel(),
        torch.cuda.current_stream(x.device).cuda_stream,
        None,
    )
    if err:
        raise RuntimeError(f"cutlass_w4 plan {p}: {LAUNCH_ERRORS.get(err, err)}")
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def w4a16_cutlass_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Backend "cutlass_w4" (forced, or auto on the Hopper layout): x [M, K] -> [M, N], tuned
    per (M bucket, N, K, group, dtype, zeros, bias) among the compiled configurations."""
    reason = unsupported_reason(x, qweight, scales, zeros, group_size, bias)
    if reason is not None:
        raise ValueError(f"cutlass_w4: {reason}")
    key = (
        m_bucket(x.shape[0]),
        scales.shape[0],
        x.shape[1],
        group_size,
        x.dtype,
        zeros is not None,
        bias is not None,
    )
    chosen = TUNER.pick(
        key,
        candidates(x.dtype, zeros is not None, x.shape[0], group_size),
        lambda c: run_plan(c, x, qweight, scales, zeros, group_size, bias),
    )
    return run_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)


HOPPER_TUNER = Tuner("w4a16_hopper_auto")
# cuda_mma plans join auto's candidates on the Hopper layout up to this M bucket. At M = 64 they
# lose to cutlass_w4 on most shapes (run 48: 0.80-1.09x against 1.54-1.98x of cuBLAS) but win on
# 4096x4096 (the SZ plans, 0.97x against 0.87x); run 21a's tuner once mis-picked them there.
MMA_MAX_M = 64


def hopper_plans(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> list[Plan]:
    """auto's candidates on the Hopper layout: cuda_mma plans (M <= 64, sm_80+) and cutlass_w4
    configurations (sm_90); empty when neither kernel takes the arguments here."""
    from quantlab.kernels import cuda_mma

    plans: list[Plan] = []
    m = x.shape[0]
    if (
        m_bucket(m) <= MMA_MAX_M
        and cuda_mma.unsupported_reason(x, qweight, scales, zeros, group_size, bias) is None
        and cuda_mma.available(x.device)
    ):
        plans += cuda_mma.candidates(m, hopper=True, sym=zeros is None)
    if unsupported_reason(x, qweight, scales, zeros, group_size, bias) is None and available(
        x.device
    ):
        plans += candidates(x.dtype, zeros is not None, m, group_size)
    return plans


def run_hopper_plan(
    p: Plan,
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """One plan of hopper_plans: x [M, K] -> [M, N] in x's dtype."""
    if p.backend == "cuda_mma":
        from quantlab.kernels import cuda_mma

        return cuda_mma.run_plan(p, x, qweight, scales, zeros, group_size, bias, fill)
    return run_plan(p, x, qweight, scales, zeros, group_size, bias, fill)


def w4a16_hopper_auto(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
    plans: list[Plan] | None = None,
) -> torch.Tensor:
    """backend "auto" on the Hopper layout: x [M, K] -> [M, N], the fastest of cuda_mma (small M)
    and cutlass_w4, tuned per (M bucket, N, K, group, dtype, zeros, bias, scale order); plans:
    hopper_plans' result when the caller already has it."""
    if plans is None:
        plans = hopper_plans(x, qweight, scales, zeros, group_size, bias)
    chosen = pick_hopper(x, qweight, scales, zeros, group_size, bias, plans)
    return run_hopper_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)


def pick_hopper(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    plans: list[Plan],
) -> Plan:
    """The tuned plan among plans (hopper_plans' list) for x [M, K]'s M bucket and these weights."""
    if not plans:
        raise ValueError("Hopper layout: neither cuda_mma nor cutlass_w4 takes these arguments")
    key = (
        m_bucket(x.shape[0]),
        scales.shape[0],
        x.shape[1],
        group_size,
        x.dtype,
        scales.dtype,
        scales.stride(0) == 1,
        zeros is not None,
        bias is not None,
    )
    return HOPPER_TUNER.pick(
        key, plans, lambda c: run_hopper_plan(c, x, qweight, scales, zeros, group_size, bias)
    )


if (
    __name__ == "__main__"
):  # prebuild the library (no GPU needed): python -m quantlab.kernels.cutlass_w4
    print(build(verbose=False))
