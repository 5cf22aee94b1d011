"""Launch an AOT-built W4A16 cubin (plugins/*.cubin) through the CUDA driver API, as a C++
plugin's enqueue would: cuModuleLoadData, cuModuleGetFunction, cuLaunchKernel on the caller's
stream. No Triton at launch time; used by the GPU tests to check the shipped binaries."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

_SHARED_ATTR = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_loaded: dict[tuple[str, int], ctypes.c_void_p] = {}


_lib: list[Any] = []


def _cuda() -> Any:
    if _lib:
        return _lib[0]
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuModuleGetFunction.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_void_p,
        ctypes.c_char_p,
    ]
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 6, ctypes.c_uint]
    lib.cuLaunchKernel.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    _lib.append(lib)
    return lib


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


def _function(lib: Any, folder: Path, rec: dict[str, Any]) -> ctypes.c_void_p:
    key = (str(folder / rec["cubin"]), torch.cuda.current_device())
    if key not in _loaded:
        image = (folder / rec["cubin"]).read_bytes()
        buf = ctypes.create_string_buffer(image, len(image))
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _ok(lib.cuModuleLoadData(ctypes.byref(module), buf), "cuModuleLoadData")
        _ok(
            lib.cuModuleGetFunction(ctypes.byref(fn), module, rec["kernel"].encode()),
            "cuModuleGetFunction",
        )
        if rec["shared"] > 49152:
            _ok(lib.cuFuncSetAttribute(fn, _SHARED_ATTR, rec["shared"]), "cuFuncSetAttribute")
        _loaded[key] = fn
    return _loaded[key]


def launch_w4a16(
    folder: Path,
    rec: dict[str, Any],
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W4^T through the cubin `rec` names (kernels.json record)."""
    torch.cuda.init()
    lib = _cuda()
    m, k = x.shape
    n = qweight.shape[0] * 2
    x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    z = zeros.contiguous() if zeros is not None else None
    ptrs = [x, qweight, scales, z if z is not None else scales, scales, out]
    ints = [m, n, k, k, k, scales.stride(0), z.stride(0) if z is not None else 0, n, m * n]
    vals: list[Any] = [ctypes.c_uint64(t.data_ptr()) for t in ptrs]
    vals += [ctypes.c_int32(v) for v in ints]
    vals += [ctypes.c_uint64(0), ctypes.c_uint64(0)]  # Triton's global / profile scratch
    assert len(vals) == len(rec["params"])
    args = (ctypes.c_void_p * len(vals))(
        *[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals]
    )
    fn = _function(lib, folder, rec)
    grid = -(-m // rec["bm"]) * -(-n // rec["bn"])
    stream = torch.cuda.current_stream().cuda_stream
    _ok(
        lib.cuLaunchKernel(
            fn, grid, 1, 1, 32 * rec["num_warps"], 1, 1, rec["shared"], stream, args, None
        ),
        "cuLaunchKernel",
    )
    return out
