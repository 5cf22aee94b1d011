# The README's commands: `make demo`, `make test` (and `make test-slow`, which CI also runs). Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.quantlab-setup
# The project's real text data (Jane Austen); recipes read it through this variable.
export QUANTLAB_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)

DEMO_RECIPES := recipes/smollm2_int8_wo.yaml recipes/smollm2_int4_g64_sym.yaml \
                recipes/smollm2_int4_g64_asym.yaml recipes/smollm2_fp8.yaml

.PHONY: setup demo test test-slow lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh "$(VENV)" "$(PYTHON)"
	touch $(STAMP)

DEMO_OUT := $(if $(QUANTLAB_OUT),$(QUANTLAB_OUT),out)
DEMO_PROMPT := It is a truth universally acknowledged, that a single man in possession of a good fortune

# run (calibrate + export + accuracy) -> check-export (loader rules, manifest) -> the FP8 run re-exported as ModelOpt HF for vLLM/SGLang/TensorRT-LLM and checked at tp 3 -> build (engine from the INT4 checkpoint) -> generate
# -> bench (static rows and an in-flight vs static trace with its step breakdown; on CPU the reference kernels run, so the speed means nothing)
# -> build --backend tensorrt (ONNX -> TensorRT-RTX engine for SM89, the W4A16 plugin kernel compiled ahead of time) -> report (where INT8 WO and INT4 lost accuracy: per linear, per layer, per model; HTML + JSON).
demo: setup
	$(BIN)/quantlab run $(DEMO_RECIPES) --set export.overwrite=true
	$(BIN)/quantlab check-export $(DEMO_OUT)/smollm2_int4_g64_sym
	$(BIN)/quantlab export $(DEMO_OUT)/smollm2_fp8 --format modelopt_hf --overwrite
	$(BIN)/quantlab check-export $(DEMO_OUT)/smollm2_fp8/modelopt_hf --tp 3
	$(BIN)/quantlab build $(DEMO_OUT)/smollm2_int4_g64_sym -o $(DEMO_OUT)/engine_int4_g64_sym \
	  --max-batch-size 2 --max-seq-len 256 --overwrite
	$(BIN)/quantlab generate $(DEMO_OUT)/engine_int4_g64_sym --max-output-len 32 \
	  --input-text "$(DEMO_PROMPT)" --input-text "Emma Woodhouse, handsome, clever, and rich,"
	$(BIN)/quantlab bench $(DEMO_OUT)/engine_int4_g64_sym --batch-size 1,2 --input-output-len 32,8 \
	  --trace 4,8,32,4,8
	$(BIN)/quantlab build $(DEMO_OUT)/smollm2_int4_g64_sym -o $(DEMO_OUT)/trt_int4_g64_sym \
	  --backend tensorrt --w4-gemm plugin --max-batch-size 2 --max-seq-len 256 --overwrite
	$(BIN)/quantlab report embedded:smollm2 $(DEMO_OUT)/smollm2_int8_wo $(DEMO_OUT)/smollm2_int4_g64_sym \
	  -o $(DEMO_OUT)/report --windows 4 --layer-windows 1 --overwrite

# Tools run as `python -m`: with --system-site-packages a tool the system already has (pytest,
# say) is not reinstalled into .venv, so .venv/bin may lack its script.
# PYTHONSAFEPATH keeps the checkout's folders off sys.path, so tests import the installed package.
lint: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	MYPY="$(abspath $(BIN))/python -m mypy" bash scripts/typecheck.sh

# The quick tier (everything but `slow`) on both cores: under 10 minutes from a fresh clone.
test: lint
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -m "not slow" -n 2 --dist loadgroup

# The accuracy-of-record runs on the real SmolLM2 model and the GGUF round trips (`slow`).
test-slow: setup
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -m slow -n 2 --dist loadgroup

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
