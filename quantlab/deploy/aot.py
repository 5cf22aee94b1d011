"""Ahead-of-time builds of quantlab's Triton W4A16 kernel for the W4A16Gemm plugin.

`compile_w4a16` compiles `_w4a16_rows_kernel` (kernels/triton_w4a16.py) for one target SM with
Triton's own compiler, on a machine without a GPU: PTX and cubin, plus the launch record a
plugin's enqueue needs without Python (kernel name, parameter order, grid formula, warps, shared
memory). Two tilings per (group size, zero points, activation dtype): "decode" (BM 16) for
M <= 16 rows and "prefill" (BM 64) above. `write_w4a16_kernels` puts them in an engine folder's
plugins/ with a kernels.json index.

Kernel parameters, in order (all by value; pointers are 64-bit device addresses):
x [M, K], qweight int8 [N/2, K], scales [N, K/G], zeros uint8 [N, K/G] (the scales' address when
there are none), bias (unused: the scales' address), out [M, N], then int32 M, N, K, the row
strides of x, qweight, scales, zeros (0 without), out (= N) and the split stride (= M * N), then
Triton's two scratch pointers (null: both scratch sizes are 0 and checked). Grid:
(ceil(M / BM) * ceil(N / BN), 1, 1), block (32 * num_warps, 1, 1), dynamic shared memory `shared`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantlab.errors import InputError

KERNEL = "_w4a16_rows_kernel"
PARAMS = (
    "x",
    "qweight",
    "scales",
    "zeros",
    "bias",
    "out",
    "M",
    "N",
    "K",
    "stride_xm",
    "stride_qn",
    "stride_sn",
    "stride_zn",
    "stride_om",
    "stride_os",
    "global_scratch",
    "profile_scratch",
)
_PTR = {"x": "X", "scales": "X", "bias": "X", "out": "X", "qweight": "*i8", "zeros": "*u8"}
_TRITON_DTYPE = {"float16": "*fp16", "bfloat16": "*bf16"}
# (name, BM, BN, num_warps, num_stages, largest M it is meant for); BK = min(128, group)
TILINGS = (("decode", 16, 64, 4, 4, 16), ("prefill", 64, 128, 4, 3, None))


@dataclass(frozen=True)
class AotKernel:
    """One compiled tiling and how to launch it."""

    name: str  # file stem in plugins/
    kernel: str  # the entry symbol in the PTX/cubin
    sm: str
    dtype: str
    group_size: int
    has_zeros: bool
    tiling: str
    max_m: int | None
    bm: int
    bn: int
    bk: int
    num_warps: int
    num_stages: int
    shared: int
    params: tuple[str, ...]
    grid: str
    triton: str
    ptx: str
    cubin: str


def check_target(group_size: int | None, sm: str, dtype: str) -> None:
    """InputError when the AOT kernel cannot serve this group size, SM or activation dtype."""
    if group_size is not None and (group_size < 16 or group_size & (group_size - 1)):
        raise InputError(
            f"the W4A16 plugin kernel needs a power-of-two group size >= 16 (got {group_size}); "
            "build with --w4-gemm native."
        )
    if dtype not in _TRITON_DTYPE:
        raise InputError(
            f"the W4A16 plugin kernel takes float16 or bfloat16 activations, not {dtype}; export "
            "the checkpoint in float16/bfloat16 or build with --w4-gemm native."
        )
    if not sm.isdigit() or int(sm) < 80:
        raise InputError(
            f"the W4A16 plugin kernel is built for SM 8.0 and newer (tensor-core dots), not SM{sm}."
        )
    if importlib.util.find_spec("triton") is None:
        raise InputError(
            "the W4A16 plugin kernel is compiled with Triton, which is not installed: pip install "
            "'quantlab[kernels]' (triton 3.6), or build with --w4-gemm native."
        )


def compile_w4a16(
    group_size: int, has_zeros: bool, dtype: str, sm: str
) -> list[tuple[AotKernel, str, bytes]]:
    """Each tiling of the kernel compiled for SM `sm`: (record, PTX text, cubin bytes)."""
    check_target(group_size, sm, dtype)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from quantlab.kernels.triton_w4a16 import _w4a16_rows_kernel

    fn = _w4a16_rows_kernel
    bk = min(128, group_size)
    out = []
    for tiling, bm, bn, warps, stages, max_m in TILINGS:
        types = [_PTR.get(p, "i32") for p in PARAMS[:15]]
        types = [_TRITON_DTYPE[dtype] if t == "X" else t for t in types]
        sig = dict(zip(fn.arg_names[:15], types, strict=True))
        const = {
            "GROUP": group_size,
            "HAS_ZERO": has_zeros,
            "HAS_BIAS": False,
            "PARTIAL": False,
            "BM": bm,
            "BN": bn,
            "BK": bk,
            "SPLIT_K": 1,
            "GROUP_M": 1,
            "DOT_F32": False,
        }
        sig |= {c: "constexpr" for c in const}
        src = ASTSource(
            fn=fn,
            signature=sig,
            constexprs={(fn.arg_names.index(c),): v for c, v in const.items()},
        )
        target = GPUTarget("cuda", int(sm), 32)
        ck = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        md = ck.metadata
        if md.global_scratch_size or md.profile_scratch_size:
            raise RuntimeError(f"{KERNEL} now needs Triton scratch memory; update aot.py")
        name = f"w4a16_{dtype}_g{group_size}{'_zp' if has_zeros else ''}_{tiling}_sm{sm}"
        rec = AotKernel(
            name=name,
            kernel=md.name,
            sm=sm,
            dtype=dtype,
            group_size=group_size,
            has_zeros=has_zeros,
            tiling=tiling,
            max_m=max_m,
            bm=bm,
            bn=bn,
            bk=bk,
            num_warps=md.num_warps,
            num_stages=stages,
            shared=int(md.shared),
            params=PARAMS,
            grid=f"(ceil(M/{bm}) * ceil(N/{bn}), 1, 1)",
            triton=str(triton.__version__),
            ptx=name + ".ptx",
            cubin=name + ".cubin",
        )
        out.append((rec, ck.asm["ptx"], bytes(ck.asm["cubin"])))
    return out


def write_w4a16_kernels(
    folder: Path, configs: set[tuple[int, bool]], dtype: str, sm: str
) -> list[dict[str, Any]]:
    """Compile every (group, zeros) config into folder/plugins/; the kernels.json records.

    Triton's CPU interpreter (TRITON_INTERPRET=1) replaces @triton.jit functions with objects its
    compiler cannot take, so under it the compile runs in a child process without the variable."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        arg = json.dumps([[g, z] for g, z in sorted(configs)])
        cmd = [sys.executable, "-m", "quantlab.deploy.aot", str(folder), arg, dtype, sm]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"AOT compile of the W4A16 kernel failed:\n{done.stderr[-2000:]}")
        return list(json.loads((folder / "plugins" / "kernels.json").read_text())["kernels"])
    plugins = folder / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    records = []
    for group, zeros in sorted(configs):
        for rec, ptx, cubin in compile_w4a16(group, zeros, dtype, sm):
            (plugins / rec.ptx).write_text(ptx)
            (plugins / rec.cubin).write_bytes(cubin)
            records.append(asdict(rec))
    (plugins / "kernels.json").write_text(json.dumps({"kernels": records}, indent=2))
    return records


def pick(records: list[dict[str, Any]], group: int, zeros: bool, m: int) -> dict[str, Any]:
    """The record a plugin launches for M rows of (group, zeros): decode up to its max_m."""
    mine = [r for r in records if r["group_size"] == group and r["has_zeros"] == zeros]
    if not mine:
        raise KeyError(f"no AOT kernel for group {group}, zeros {zeros}")
    for r in sorted(mine, key=lambda r: r["bm"]):
        if r["max_m"] is None or m <= r["max_m"]:
            return r
    return mine[-1]


if __name__ == "__main__":  # python -m quantlab.deploy.aot FOLDER '[[group, zeros], ...]' DTYPE SM
    _folder, _configs, _dtype, _sm = sys.argv[1:5]
    write_w4a16_kernels(
        Path(_folder), {(int(g), bool(z)) for g, z in json.loads(_configs)}, _dtype, _sm
    )
