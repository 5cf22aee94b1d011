#!/usr/bin/env bash
# Run 8: the rows run 7 left unmeasured, one device call (<= 10 min) per part. Parts L, c and T ran
# on 2026-12-07 (docs/engine.md, "Run 8"); a, b, p and t ran in run 9 (H200, same day); h, w and q
# in run 10 (H100, same day).
# Part "a": our fp16 engine vs HF eager vs HF static cache + compile (engine_profile.py hf).
# Part "b": the Llama-3-8B shape (GQA 32/8, vocab 128256): fp16, W4A16_AWQ + INT8 KV, W8A16, FP8.
# Part "c": multi-block decode at 16k, bs 1 (fp16 and W4A16_AWQ + INT8 KV), then the FP8 and W8A8
#   decode-step profiles at bs 1 and 64.
# Part "t": the in-flight vs static trace with look-ahead (engine_gpu.py trace), then one
#   in-flight mixed step taken apart (engine_profile.py mixed, look-ahead off).
# Part "h": host cost per call of the eager step's ops (host_launch_gpu.py), the eager mixed
#   step with the kernels' ops through the dispatcher vs called directly, then the short trace.
# Part "w": SmoothQuant W8A8 with fp16 and with INT8 KV against fp16 at bs 1-64.
# Part "B": the W4 linears' bound launches: host cost, GPU check, mixed step on / off, the trace.
# Part "W": W8A16 against fp16 on the Llama-3-8B shape, tuner picks up to M = 64 recorded.
# Part "L": look-ahead decode checked on the GPU, then the speed table with it on and off
#   (W8A8 SmoothQuant included).
# Part "p": SmolLM2 W8A16 and FP8 perplexity through the GPU engine, then the real model's 128/128
#   speed: fp16 (the W8A16 checkpoint's float weights), W8A16, FP8 (engine_ppl_gpu.py). The five
#   parts .pplpackB1-5 go first, one call each on the same warm machine, carrying that part alone:
#   `mkdir -p /tmp/ppl && cp -r .pplpackBN /tmp/ppl/`; then part p, carrying .cuda_prebuilt.
# Part "q": SmolLM2 SmoothQuant W8A8 + INT8 KV perplexity on the GPU (parts .pplpackC1-3 first).
# Usage (device, repo root): bash benchmarks/engine_run8.sh "$OUT" a|b|c|t|T|h|B|W|w|L|p|q
# carry: [".gpuwheels", ".cuda_prebuilt"] (the second from benchmarks/prebuild_cuda.py)
set -u
out=${1:?OUT}; part=${2:-a}
start=$SECONDS
left() { echo $((580 - (SECONDS - start))); }
python3 -c "import pydantic" 2>/dev/null || python3 -m pip install -q --no-index --find-links .gpuwheels pydantic
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -d .cuda_prebuilt ] && export QUANTLAB_CUDA_CACHE=$PWD/.cuda_prebuilt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
case "$part" in
  a)
    timeout "$(left)" python3 benchmarks/engine_profile.py hf --out "$out/hf" --work /tmp/p \
      > "$out/hf.log" 2>&1
    ;;
  b)
    timeout "$(left)" python3 benchmarks/engine_gpu.py speed --no-hf --shape llama3-8b \
      --modes "fp16,W4A16_AWQ,W8A16 (,FP8 (" --batches 1,16,32 \
      --out "$out/speed" --work /tmp/w > "$out/speed.log" 2>&1
    ;;
  c)
    timeout 200 python3 benchmarks/engine_gpu.py speed --no-hf --modes "fp16,W4A16_AWQ" \
      --batches 1 --out "$out/speed" --work /tmp/w > "$out/speed.log" 2>&1
    timeout 220 python3 benchmarks/engine_gpu.py long --ctxs 16384 \
      --out "$out/long" --work /tmp/w > "$out/long.log" 2>&1
    rm -rf /tmp/w  # then the FP8 and W8A8 decode steps by kernel (their targets' profiles)
    timeout "$(left)" python3 benchmarks/engine_profile.py bw profile --out "$out/profile" \
      --work /tmp/p --profile-modes "FP8 (,W8A8 SQ per-channel" > "$out/profile.log" 2>&1
    ;;
  t)
    timeout 330 python3 benchmarks/engine_gpu.py trace --out "$out/trace" --work /tmp/w \
      > "$out/trace.log" 2>&1
    rm -rf /tmp/w
    timeout "$(left)" python3 benchmarks/engine_profile.py mixed --out "$out/mixed" --work /tmp/p \
      > "$out/mixed.log" 2>&1
    ;;
  T)  # part t's trace alone, short (in-flight then static, no breakdown): for a small budget
    timeout "$(left)" python3 benchmarks/engine_gpu.py trace --short-trace --out "$out/trace" \
      --work /tmp/w > "$out/trace.log" 2>&1
    ;;
  h)  # host cost of eager steps: the mixed step's rounds with the kernels' ops dispatched as
    # registered ops (the old path) and called directly (the new eager path), alternating in one
    # process on one engine; before it, each op's host cost per call (host_launch_gpu.py); then
    # the short trace
    timeout 120 python3 benchmarks/host_launch_gpu.py --out "$out/launch" > "$out/launch.log" 2>&1
    QUANTLAB_DISPATCH_AB=1 timeout 240 python3 benchmarks/engine_profile.py mixed \
      --out "$out/mixed" --work /tmp/p > "$out/mixed.log" 2>&1
    rm -rf /tmp/p
    timeout "$(left)" python3 benchmarks/engine_gpu.py trace --short-trace --out "$out/trace" \
      --work /tmp/w > "$out/trace.log" 2>&1
    ;;
  B)  # the W4 linears' bound launches (kernels.bind_w4a16): host cost per call against the
    # checked call (and equal outputs), the GPU check of the W4 modes, the mixed step with bound
    # launches on and off (alternating on one engine), then the short trace
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
      -k "bound or cutlass_dispatch" 2>&1 | tail -8 > "$out/pytest.txt"
    timeout 120 python3 benchmarks/host_launch_gpu.py --out "$out/launch" > "$out/launch.log" 2>&1
    timeout 120 python3 benchmarks/engine_gpu.py check --check-modes "W4A16" \
      --out "$out/check" --work /tmp/w > "$out/check.log" 2>&1
    rm -rf /tmp/w
    QUANTLAB_BIND_AB=1 timeout 150 python3 benchmarks/engine_profile.py mixed \
      --out "$out/mixed" --work /tmp/p > "$out/mixed.log" 2>&1
    rm -rf /tmp/p
    timeout "$(left)" python3 benchmarks/engine_gpu.py trace --short-trace --out "$out/trace" \
      --work /tmp/w > "$out/trace.log" 2>&1
    ;;
  W)  # W8A16 against fp16 on the Llama-3-8B shape with the tuner's picks up to M = 64 recorded
    # (run 9's 0.95x at bs 32)
    timeout "$(left)" python3 benchmarks/engine_gpu.py speed --no-hf --shape llama3-8b \
      --modes "fp16,W8A16 (" --batches 1,16,32 --out "$out/speed" --work /tmp/w \
      > "$out/speed.log" 2>&1
    ;;
  w)  # SmoothQuant W8A8 with its fp16 and its INT8 KV cache against fp16, bs 1-64
    timeout "$(left)" python3 benchmarks/engine_gpu.py speed --no-hf \
      --modes "fp16,W8A8 SQ per-channel" --batches 1,16,32,64 \
      --out "$out/speed" --work /tmp/w > "$out/speed.log" 2>&1
    ;;
  L)  # look-ahead decode (quantlab/engine/ahead.py): GPU correctness, then each mode's 128/128
    # speed with look-ahead on and off on the same engine (W8A8's first speed rows with it)
    timeout 150 python3 benchmarks/engine_gpu.py check --check-modes "fp16,W4A16_AWQ,FP8 (" \
      --out "$out/check" --work /tmp/w > "$out/check.log" 2>&1
    rm -rf /tmp/w
    timeout "$(left)" python3 benchmarks/engine_gpu.py speed --no-hf --lookahead-ab \
      --modes "fp16,W4A16_AWQ,W8A8 SQ per-channel,FP8 (,W8A16 (" --batches 1,16,32 \
      --out "$out/speed" --work /tmp/w > "$out/speed.log" 2>&1
    ;;
  q)  # SmolLM2 SmoothQuant W8A8 (searched alpha) + INT8 KV perplexity through the GPU engine,
    # after three transfer calls carrying .pplpackC1-3 (`mkdir -p /tmp/ppl && cp -r .pplpackCN
    # /tmp/ppl/`); made by `engine_ppl_gpu.py pack out/smollm2_int8_sq_int8kv --parts
    # .pplpackC1:58,.pplpackC2:58,.pplpackC3:58`
    parts=$(echo /tmp/ppl/.pplpackC{1..3} | tr ' ' ',')
    timeout "$(left)" python3 benchmarks/engine_ppl_gpu.py run --parts "$parts" --out "$out/ppl" \
      > "$out/ppl.log" 2>&1
    ;;
  p)
    parts=$(echo /tmp/ppl/.pplpackB{1..5} | tr ' ' ',')
    timeout "$(left)" python3 benchmarks/engine_ppl_gpu.py run --parts "$parts" --out "$out/ppl" \
      --bench 1,8,32,64 > "$out/ppl.log" 2>&1
    ;;
esac
rm -rf /tmp/w /tmp/p
python3 benchmarks/summarize_rows.py "$out"
