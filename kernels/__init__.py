"""quantlab.kernels: packed layouts, torch reference GEMMs, Triton kernels and the dispatch point.

This package is the ground floor: it imports torch (and triton, lazily, only when a Triton path
runs) and nothing of quantlab. Importing it registers the quantlab::linear_* custom ops.
"""

from quantlab.kernels.bound_w4 import bind_w4a16
from quantlab.kernels.ops import (
    KernelArgumentError,
    linear_fp8,
    linear_w4a16,
    linear_w8a8,
    linear_w8a16,
    linear_w8a16_group,
)
from quantlab.kernels.packing import (
    act_order_perm,
    from_mma_layout,
    is_mma_layout,
    pack_int4_asym,
    pack_int4_rows,
    to_mma_layout,
    unpack_int4_asym,
    unpack_int4_rows,
    w4_from_codes,
    w4_to_codes,
)

__all__ = [
    "KernelArgumentError",
    "act_order_perm",
    "bind_w4a16",
    "from_mma_layout",
    "is_mma_layout",
    "linear_fp8",
    "linear_w4a16",
    "linear_w8a8",
    "linear_w8a16",
    "linear_w8a16_group",
    "pack_int4_asym",
    "pack_int4_rows",
    "to_mma_layout",
    "unpack_int4_asym",
    "unpack_int4_rows",
    "w4_from_codes",
    "w4_to_codes",
]
