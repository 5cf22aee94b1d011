#!/usr/bin/env bash
# Create the virtual environment and install quantlab with its test tools.
# torch: a CUDA machine keeps the user's torch (the venv sees system site-packages); a machine
# without CUDA gets the CPU build 2.13.0 (an unpinned `pip install torch` pulls a multi-GB CUDA build).
set -euo pipefail
venv=${1:-.venv}
python=${2:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA machine without torch: installing the default (CUDA) torch build"
    "${pip[@]}" install "torch>=2.4"
  else
    echo "setup: no CUDA: installing the CPU build torch==2.13.0"
    "${pip[@]}" install "torch==2.13.0" || \
      "${pip[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
else
  echo "setup: keeping installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
fi
"${pip[@]}" install -q -e ".[dev]"
