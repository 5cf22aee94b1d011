"""Small-M (M <= 8) W4A16 GEMM as a CUDA C++ kernel: build on first use, plans, launch.

The kernel (source in cuda/w4a16_small_m.cu) reads the checkpoint layout (qweight int8 [N/2, K]) with
16-byte streaming loads, turns nibbles into fp16/bf16 integers with the magic-exponent trick and
runs mma.m16n8k16 with the activations as the 8-column operand, fp32 accumulation, group scales
on the fp32 unit sums. See cuda/w4a16_small_m.cu for the work split.

Build: on the first CUDA call, nvcc compiles the source for the device's compute capability into
a shared library (static cudart) under QUANTLAB_CUDA_CACHE, else $TORCH_EXTENSIONS_DIR/quantlab,
else ~/.cache/quantlab/torch_extensions, named by a hash of source + flags + arch; ctypes loads
it. No torch C++ extension is built (compiling torch headers takes minutes; this takes ~20 s),
and importing this module never compiles anything. Launches go to torch's current stream, so
CUDA-graph capture records them; the library is built and loaded outside any capture.

Plans (backend "cuda_gemv"): VEC bytes per lane per load (16, or 8 for G = 32 since a 4*VEC
unit must lie inside one group), RT tiles of 8 packed rows per warp, CH units per loop step,
KS warps per block splitting K.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from quantlab.kernels._tune import Plan, Tuner, m_bucket, plan

log = logging.getLogger(__name__)


def cuda_source(name: str) -> str:
    """Text of a CUDA C++ source shipped in the package (kernels/cuda/NAME)."""
    return (Path(__file__).parent / "cuda" / name).read_text()


SOURCE = cuda_source("w4a16_small_m.cu")

MAX_M = 8  # B operand of mma.m16n8k16 holds 8 activation rows
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo")
# (RT, CH) pairs compiled into the library (QL_TILE_CASES in the source); KS is a launch value.
# Run 1 (H100, g128): VEC = 8 lost to VEC = 16 on every shape, so it serves G = 32 only; KS = 16
# won on 4096x4096 and 4096x11008, RT = 2 with KS = 8/16 on the other four shapes.
TILES = ((1, 4), (1, 8), (2, 2), (2, 4))
_KS = {(1, 4): (4, 8, 16), (1, 8): (4, 8), (2, 2): (8, 16), (2, 4): (4, 8)}

TUNER = Tuner("w4a16_cuda")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: str | None = None


def cache_dir() -> Path:
    """Folder holding the compiled libraries (created on demand)."""
    env = os.environ.get("QUANTLAB_CUDA_CACHE")
    if env:
        return Path(env)
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    if ext:
        return Path(ext) / "quantlab"
    return Path.home() / ".cache" / "quantlab" / "torch_extensions"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def library_path(source: str, stem: str, arch: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Cache path of the library built from source for arch: the name hashes source + flags."""
    flags = (*NVCC_FLAGS, *extra_flags, f"-gencode=arch=compute_{arch},code=sm_{arch}")
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}_{digest}_sm{arch}.so"


def build_library(
    source: str,
    stem: str,
    device: torch.device | None = None,
    verbose: bool = False,
    arch: str | None = None,
    extra_flags: tuple[str, ...] = (),
    include_dirs: tuple[Path, ...] = (),
) -> Path:
    """Compile source for device's compute capability (or arch, e.g. "90a") into a cached shared
    library; its path.

    The file name carries a hash of source + flags + arch (not the include folders), so an edited
    source rebuilds; a library already in the cache (built here or carried in) is reused as is.
    """
    if arch is None:
        dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        arch = _arch(dev)
    out = library_path(source, stem, arch, extra_flags)
    if out.is_file():
        return out
    flags = (*NVCC_FLAGS, *extra_flags, f"-gencode=arch=compute_{arch},code=sm_{arch}")
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError(f"{stem}: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    flags = (*flags, *(f"-I{d}" for d in include_dirs))
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: compiling %s for sm_%s with nvcc (first use; cached after)", stem, out.name, arch)
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        cu = Path(tmp) / f"{stem}.cu"
        cu.write_text(source)
        so = Path(tmp) / out.name
        # --split-compile=0: ptxas/cicc use every core (the library holds dozens of kernels)
        cmd = [nvcc, *flags, "--split-compile=0", "-o", str(so), str(cu)]
        if verbose:
            cmd.insert(1, "-Xptxas=-v")
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{stem}: nvcc failed:\n{res.stderr[-4000:]}")
        if verbose:
            (out.parent / f"{out.stem}.ptxas.txt").write_text(res.stderr)
        os.replace(so, out)  # atomic: concurrent builders never load a half-written file
    log.info("%s: built %s in %.0f s", stem, out, time.time() - t0)
    return out


def build(
    device: torch.device | None = None, verbose: bool = False, arch: str | None = None
) -> Path:
    """Compile the small-M kernel library for device's compute capability, or for arch (e.g. "90",
    no GPU needed), into the cache; its path."""
    return build_library(SOURCE, "w4a16_small_m", device, verbose, arch=arch)


def _load(device: torch.device) -> ctypes.CDLL:
    global _lib, _build_error
    with _lock:
        if _lib is not None:
            return _lib
        if _build_error is not None:
            raise RuntimeError(_build_error)
        try:
            lib = ctypes.CDLL(str(build(device)))
        except (RuntimeError, OSError) as err:
            _build_error = str(err)
            raise
        fn = lib.ql_w4a16_small_m
        fn.restype = ctypes.c_int
        # device, 6 pointers (x, qweight, scales, zeros, bias, out), 12 ints, stream
        fn.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 6, *[ctypes.c_int] * 12, ctypes.c_void_p]
        lib.ql_error_string.restype = ctypes.c_char_p
        lib.ql_error_string.argtypes = [ctypes.c_int]
        _lib = lib
        return lib


def can_load(build_error: str | None, load: Callable[[], object]) -> bool:
    """The guard every CUDA path's available() shares: False after a failed build, with
    QUANTLAB_KERNELS_NO_CUDA=1 or during a CUDA-graph capture (nothing is built there); else
    whether load() (build if needed, then load) succeeds."""
    if (
        build_error is not None
        or os.environ.get("QUANTLAB_KERNELS_NO_CUDA") == "1"
        or torch.cuda.is_current_stream_capturing()
    ):
        return False
    try:
        load()
    except (RuntimeError, OSError):
        return False
    return True


def available(device: torch.device) -> bool:
    """True if the library is (or can now be) built and loaded; never builds under capture."""
    if _lib is not None:
        return True
    # bf16 mma needs sm_80
    return torch.cuda.get_device_capability(device) >= (8, 0) and can_load(
        _build_error, lambda: _load(device)
    )


def unsupported_reason(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    check_x_layout: bool = True,
) -> str | None:
    """Why the CUDA kernel cannot take these arguments (x [M, K] or [..., K]), else None.

    Pure Python (no build): the dispatch falls back to Triton on a reason, a forced
    backend="cuda_gemv" raises it. check_x_layout=False skips the data-pointer alignment checks and
    x's contiguity (what torch.compile cannot trace; the op checks them again at run time).
    """
    m = x.numel() // max(x.shape[-1], 1)
    if not x.is_cuda:
        return "needs CUDA tensors"
    if not 1 <= m <= MAX_M:
        return f"serves 1 <= M <= {MAX_M} rows, got M={m}"
    if group_size % 32:
        return f"group size must be a multiple of 32, got {group_size}"
    if scales.dtype not in (x.dtype, torch.float32):
        return f"scales must be {x.dtype} or float32, got {scales.dtype}"
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return "bias must be contiguous in x's dtype"
    if not qweight.is_contiguous() or (check_x_layout and qweight.data_ptr() % 16):
        return "qweight must be contiguous and 16-byte aligned"
    if scales.stride(-1) != 1 or (zeros is not None and zeros.stride(-1) != 1):
        return "scales/zeros need unit stride along groups"
    if check_x_layout and (x.data_ptr() % 16 or not x.is_contiguous()):
        return "x must be contiguous and 16-byte aligned"
    if x.shape[-1] * 2 > 2**31 or qweight.numel() >= 2**40:
        return "shape too large"
    return None


def candidates(group_size: int) -> list[Plan]:
    """Launch plans for this group size (VEC = 16 needs 64 | G so a unit stays in one group)."""
    vec = 16 if group_size % 64 == 0 else 8
    return [
        plan("cuda_gemv", VEC=vec, RT=rt, CH=ch, KS=ks)
        for (rt, ch) in TILES
        for ks in _KS[(rt, ch)]
    ]


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
    """Launch one plan: x [M, K] fp16/bf16 (M <= 8) -> out [M, N] in x's dtype.

    qweight int8 [N/2, K]; scales [N, K/G] in x's dtype or fp32; zeros uint8 [N, K/G] or None;
    bias [N] in x's dtype or None. fill poisons the output first (tests pass NaN).
    """
    m, k = x.shape
    n = qweight.shape[0] * 2
    lib = _load(x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if fill is not None:
        out.fill_(fill)
    cfg = dict(p.cfg)
    err = lib.ql_w4a16_small_m(
        x.device.index if x.device.index is not None else torch.cuda.current_device(),
        x.data_ptr(),
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr() if zeros is not None else None,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        m,
        n,
        k,
        group_size,
        scales.stride(0),
        zeros.stride(0) if zeros is not None else 0,
        0 if x.dtype == torch.float16 else 1,
        int(scales.dtype == torch.float32),
        cfg["VEC"],
        cfg["RT"],
        cfg["CH"],
        cfg["KS"],
        torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"cuda_gemv launch failed: {lib.ql_error_string(err).decode()}")
    return out


def tune_key(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> tuple:
    """Tuning key: (M bucket, N, K, group, x dtype, scale dtype, zeros?, bias?)."""
    return (
        m_bucket(x.shape[0]),
        qweight.shape[0] * 2,
        x.shape[1],
        group_size,
        x.dtype,
        scales.dtype,
        zeros is not None,
        bias is not None,
    )


def w4a16_cuda_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fill: float | None = None,
) -> torch.Tensor:
    """Forced backend "cuda_gemv": x [M, K] (M <= 8) -> [M, N], tuned among the CUDA plans."""
    reason = unsupported_reason(x, qweight, scales, zeros, group_size, bias)
    if reason is not None:
        raise ValueError(f"cuda_gemv: {reason}")
    chosen = TUNER.pick(
        tune_key(x, qweight, scales, zeros, group_size, bias),
        candidates(group_size),
        lambda c: run_plan(c, x, qweight, scales, zeros, group_size, bias),
    )
    return run_plan(chosen, x, qweight, scales, zeros, group_size, bias, fill)
