"""quantlab's own engine: `quantlab build` turns an exported checkpoint into an engine folder that
runs on quantlab.kernels with a paged (optionally int8/fp8) KV cache, in-flight batching and CUDA
graphs. The engine imports the kernels and the core; nothing in the core imports it.
"""
