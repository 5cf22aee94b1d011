"""quantlab.kernels: packed layouts, torch reference GEMMs and (later) Triton/CUDA kernels.

This package is the ground floor: it imports torch (and triton, lazily) and nothing of quantlab.
"""

from quantlab.kernels.packing import pack_int4_rows, unpack_int4_rows

__all__ = ["pack_int4_rows", "unpack_int4_rows"]
