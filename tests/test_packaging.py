"""The installed package exposes quantlab.calibrators / quantlab.kernels and never top-level names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib.util, quantlab.kernels, quantlab.calibrators.rtn
assert importlib.util.find_spec("kernels") is None, "a top-level 'kernels' module resolves"
assert importlib.util.find_spec("calibrators") is None, "a top-level 'calibrators' module resolves"
print(quantlab.kernels.__name__, quantlab.calibrators.rtn.__name__)
"""


def test_import_kernels_stays_unresolved(tmp_path: Path) -> None:
    # Run outside the repository so the checkout's folders are not on sys.path by accident.
    r = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["quantlab.kernels", "quantlab.calibrators.rtn"]


def test_console_script_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("quantlab")
    r = subprocess.run(
        [str(exe), "list"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    listed = "calibrators: awq, fp8, gptq, kv_cache, kv_equalize, rtn, smoothquant"
    assert listed in r.stdout and "int4_g64_asym" in r.stdout
