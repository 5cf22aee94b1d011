"""quantlab: a post-training quantization workbench for causal language models."""

__version__ = "0.1.0"
