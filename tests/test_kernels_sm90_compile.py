"""The engine's newer Triton kernels (group-wise W8A16, SmoothQuant W8A8, the fused elementwise
kernels, the paged decode and prefill attention, fp32 included) compile for sm_90 with every plan and flag set their wrappers launch, within an sm_90
block's shared memory: benchmarks/sm90_compile.py, on the CPU (Triton's own ptxas), no GPU.

The interpreter runs the numerics on CPU but never compiles; on 2026-12-07 this check found a
kernel global that the GPU compiler refuses (ROUND_MAGIC, not a constexpr) before any GPU ran it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sm90_compile.py"


@pytest.mark.slow
def test_new_triton_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile afresh, not from a cache
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dtypes", "fp16", "--out", str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(", 0 failed"), last
    count = int(last.split()[1])
    # every plan of the four groups: far more than one launch each
    assert count >= 60, last
    names = ("_w8g_kernel", "w8a8_kernel", "quant_int8_kernel", "_rope_kv_write_kernel")
    for name in (*names, "_decode_split_kernel", "_prefill_kernel"):
        assert f'"kernel": "{name}"' in res.stdout, name
