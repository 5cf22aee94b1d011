#!/usr/bin/env bash
# Everything quantlab runs on the GPU machine, in stages that each fit one 10-minute device call:
#   tests   GPU tests (kernels_gpu, kernels_cuda: every forced path, every CUDA plan/config)
#   timing  python -m quantlab.kernels.bench --skip-check (the docs/kernels.md table)
#   check   python -m quantlab.kernels.bench --skip-timing (fp64 check of all shapes x M)
#   w8      python -m quantlab.kernels.bench --w8 (every W8A16 plan: fp64 check + graph timing)
#   aot     the W4A16 plugin kernel compiled ahead of time for this SM, launched from its cubin
#           through the CUDA driver API (tests/test_aot_gpu.py)
#   hopper  python -m quantlab.kernels.bench --hopper, M >= 64 (every W4 plan auto weighs on the
#           Hopper layout: fp64 check + graph timing)
# Results go under $OUT (default ./gpu_out). Prebuilt CUDA libraries in .cuda_cache are used when
# their source hash matches (build them here with nvcc for sm_90/sm_90a to save device time).
set -euo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -c "import pydantic" 2>/dev/null || [ ! -d .gpuwheels ] || python3 -m pip install --no-deps --no-index -q .gpuwheels/*.whl
export PYTHONPATH=$PWD QUANTLAB_CUDA_CACHE=${QUANTLAB_CUDA_CACHE:-$PWD/.cuda_cache}
shapes=28672x8192,8192x28672,4096x4096,11008x4096,4096x11008,14336x4096
for stage in "$@"; do
  start=$(date +%s)
  case $stage in
    tests) python3 -m pytest -q -m gpu tests/test_kernels_gpu.py tests/test_kernels_cuda.py \
             2>&1 | tee "$out/tests.txt" | tail -15 ;;
    timing) python3 -m quantlab.kernels.bench --skip-check --shapes $shapes --out "$out/t" \
              > "$out/timing.txt" 2>&1; tail -70 "$out/timing.txt" ;;
    check) python3 -m quantlab.kernels.bench --skip-timing --shapes $shapes --out "$out/c" \
             > "$out/check.txt" 2>&1; grep -E "FAIL|correctness|checked|total" "$out/check.txt" ;;
    w8) python3 -m quantlab.kernels.bench --w8 --shapes $shapes --out "$out/w8" > "$out/w8.txt" 2>&1
        grep -E "^W8" "$out/w8.txt" | cut -c1-300 ;;
    hopper) python3 -m quantlab.kernels.bench --hopper --shapes $shapes --ms 64,256,1024,4096 \
              --out "$out/h" > "$out/hopper.txt" 2>&1; grep -E "^W4" "$out/hopper.txt" | cut -c1-400 ;;
    aot) python3 -m pytest -q -p no:cacheprovider tests/test_aot_gpu.py 2>&1 | tee "$out/aot.txt" \
           | tail -15 ;;
    *) echo "unknown stage $stage (tests, timing, check, w8, hopper, aot)"; exit 2 ;;
  esac
  echo "stage $stage: $(( $(date +%s) - start )) s"
done
