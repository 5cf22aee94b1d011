"""GPU: the W4A16 plugin kernel compiled ahead of time (deploy/aot.py) for the local SM, written to
disk, loaded back and launched through the CUDA driver API alone (deploy/aot_launch.py), against
the torch reference in float64."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from quantlab.kernels import packing, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_aot_cubin_matches_reference(
    dtype: torch.dtype, group: int, asym: bool, tmp_path: Path
) -> None:
    """Both tilings at M = 1, 5, 16 (decode) and 17, 100 (prefill); poisoned outputs would show."""
    from quantlab.deploy.aot import pick, write_w4a16_kernels
    from quantlab.deploy.aot_launch import launch_w4a16
    from quantlab.deploy.tensorrt import local_sm

    sm = local_sm()
    assert sm is not None
    name = str(dtype).removeprefix("torch.")
    prebuilt = os.environ.get("QUANTLAB_AOT_PREBUILT")  # a folder compiled on a machine without GPU
    if prebuilt:
        folder = Path(prebuilt)
        recs = json.loads((folder / "plugins" / "kernels.json").read_text())["kernels"]
        recs = [r for r in recs if r["dtype"] == name and r["sm"] == sm]
    else:
        folder = tmp_path
        recs = write_w4a16_kernels(tmp_path, {(group, asym)}, name, sm)
    n, k = 1536, 2048
    scale = (torch.rand(n, k // group, device="cuda") * 0.02 + 0.005).to(dtype)
    if asym:
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        zero = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, device="cuda")
        qw, s, z = packing.w4_from_codes(codes, scale, zero)
    else:
        codes8 = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
        qw, s, z = packing.w4_from_codes(codes8, scale)
    for m in (1, 5, 16, 17, 100):
        rec = pick(recs, group, asym, m)
        assert rec["tiling"] == ("decode" if m <= 16 else "prefill")
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = launch_w4a16(folder / "plugins", rec, x, qw, s, z)
        torch.cuda.synchronize()
        ref = reference.ref_linear_w4a16(x, qw, s, z, group, compute_dtype=torch.float64)
        err = float((y.double() - ref).norm() / ref.norm())
        assert not torch.isnan(y).any() and err < (8e-3 if dtype == torch.bfloat16 else 1e-3), (
            m,
            err,
        )
