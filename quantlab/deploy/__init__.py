"""The TensorRT half of the build stage: ONNX with explicit quantization, a TensorRT-RTX (or
TensorRT) engine, quantlab's W4A16 GEMM as a plugin, numerics checked in onnxruntime."""
