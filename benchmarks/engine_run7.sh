#!/usr/bin/env bash
# One device call (<= 10 min). Part "a": the new kernels' GPU tests, the engine correctness
# check, the per-mode speed table, then the decode-step profile with whatever time is left.
# Part "b": bandwidth floor + decode profile, KV fit, the in-flight trace, HF eager and static +
# compile against the engine. Part "c": part a without W4 in the check, for a short call.
# Part "p": engine perplexity of the SmolLM2 checkpoints packed by engine_ppl_gpu.py (parts copied
# to /tmp/ppl by earlier calls on the same warm machine).
# Usage (device, repo root): bash benchmarks/engine_run7.sh "$OUT" a|b [speed modes] [batches]
# carry: [".gpuwheels", ".cuda_prebuilt"] (the second from benchmarks/prebuild_cuda.py)
set -u
out=${1:?OUT}; part=${2:-a}; modes=${3:-"fp16,W8A8 SQ per-channel,FP8 (,W4A16_AWQ,W8A16"}
batches=${4:-1,16,32,64}
start=$SECONDS
left() { echo $((580 - (SECONDS - start))); }
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --find-links .gpuwheels pydantic
export PYTHONPATH=$PWD
# CUDA libraries prebuilt on the CPU machine (benchmarks/prebuild_cuda.py), carried in: no nvcc run
[ -d .cuda_prebuilt ] && export QUANTLAB_CUDA_CACHE=$PWD/.cuda_prebuilt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [ "$part" = p ]; then  # SmolLM2 perplexity, checkpoints carried in parts (engine_ppl_gpu.py)
  timeout 400 python3 benchmarks/engine_ppl_gpu.py run \
    --parts /tmp/ppl/.pplpack1,/tmp/ppl/.pplpack2,/tmp/ppl/.pplpack3 \
    --out "$out/ppl" 2>&1 | tee "$out/ppl.log" | tail -20
  exit 0
fi
if [ "$part" = b ]; then
  timeout 330 python3 benchmarks/engine_profile.py bw profile kvfit hf --out "$out/profile" \
    --work /tmp/p > "$out/profile.log" 2>&1
  rm -rf /tmp/p
  timeout "$(left)" python3 benchmarks/engine_gpu.py trace --out "$out/trace" --work /tmp/w \
    > "$out/trace.log" 2>&1
  python3 benchmarks/summarize_rows.py "$out"
  exit 0
fi
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_w8a8.py \
  tests/test_kernels_fused.py tests/test_kernels_gpu.py tests/test_paged_attention.py -k "not tuner" 2>&1 | tail -12 | tee "$out/pytest.txt"
checks="fp16,W4A16_AWQ,FP8 (,W8A8,W8A16_GPTQ"
[ "$part" = c ] && checks="fp16,FP8 (,W8A8,W8A16_GPTQ"  # part c: a short call, no W4 (no cuda_mma build)
timeout 140 python3 benchmarks/engine_gpu.py check --check-modes "$checks" \
  --out "$out/check" --work /tmp/w > "$out/check.log" 2>&1
timeout $(($(left) - 120)) python3 benchmarks/engine_gpu.py speed --no-hf --modes "$modes" \
  --batches "$batches" --out "$out/speed" --work /tmp/w > "$out/speed.log" 2>&1
rm -rf /tmp/w
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" python3 benchmarks/engine_profile.py bw profile --out "$out/profile" \
    --work /tmp/p > "$out/profile.log" 2>&1
fi
python3 benchmarks/summarize_rows.py "$out"
