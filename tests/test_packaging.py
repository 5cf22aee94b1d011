"""The installed package exposes quantlab.calibrators / quantlab.kernels and never top-level names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib.util, os, quantlab, quantlab.kernels, quantlab.calibrators.rtn
root = os.path.dirname(os.path.dirname(os.path.abspath(quantlab.__file__)))
for name in ("kernels", "calibrators"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        continue
    # Another distribution may own the name (PyPI's `kernels` does); ours must not provide it.
    places = list(spec.submodule_search_locations or []) + [spec.origin or ""]
    own = os.path.join(root, name)  # the checkout's folder that quantlab maps as quantlab.<name>
    ours = [p for p in places if p and (os.path.abspath(p) + os.sep).startswith(own + os.sep)]
    assert not ours, f"a top-level {name!r} module resolves into the checkout: {ours}"
print(quantlab.kernels.__name__, quantlab.calibrators.rtn.__name__)
"""


def test_import_kernels_stays_unresolved(tmp_path: Path) -> None:
    # Run outside the repository, without PYTHONPATH, so only the installed package is seen.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["quantlab.kernels", "quantlab.calibrators.rtn"]


def test_console_script_installed(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("quantlab")
    r = subprocess.run(
        [str(exe), "list"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    listed = "calibrators: awq, fp8, gptq, kv_cache, kv_equalize, modelopt, rtn, smoothquant"
    assert listed in r.stdout and "int4_g64_asym" in r.stdout
    assert "Qwen2ForCausalLM         family qwen2, TensorRT-LLM Qwen2ForCausalLM" in r.stdout
