"""Paged KV cache: a pool of fixed-size blocks per layer, a block allocator, quantized writes.

Pool tensors k[l] / v[l]: [num_blocks, block_size, H_kv, D] in the storage dtype (fp16, bf16,
fp32, int8 or float8_e4m3fn). Block 0 is reserved as a scratch block: padding rows of a CUDA-graph
batch write there and no sequence ever owns it. int8 and fp8 use one per-layer dequantization
scale for K and V (the checkpoint's kv_cache_scaling_factor): code = sat(round(x / scale)).
"""

from __future__ import annotations

import torch

from quantlab.engine.config import KV_STORAGE, ModelSpec
from quantlab.errors import InputError

FP8_MAX = 448.0


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for (the scheduler preempts or waits)."""


class BlockAllocator:
    """Free list of block ids 1 .. num_blocks-1 (0 is the scratch block)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def free(self) -> int:
        """Number of free blocks."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n block ids; OutOfBlocks when fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(n)
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        """Give blocks back (a finished or preempted sequence's)."""
        self._free.extend(reversed(blocks))


def kv_bytes_per_block(
    num_layers: int, block_size: int, kv_heads: int, head_dim: int, storage: str
) -> int:
    """Bytes one block takes over all layers, K and V."""
    item = torch.empty((), dtype=KV_STORAGE[storage]).element_size()
    return 2 * num_layers * block_size * kv_heads * head_dim * item


class PagedKVCache:
    """K/V pools of every layer plus the per-layer scales; see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        storage: str,
        scales: list[float] | None,
        device: torch.device,
    ) -> None:
        if num_blocks < 2:
            raise InputError(
                "The KV-cache budget holds no block beyond the scratch block; raise "
                "--kv-cache-mem-gb or lower --max-seq-len / --block-size."
            )
        self.storage = storage
        self.dtype = KV_STORAGE[storage]
        self.block_size = block_size
        self.quantized = storage in ("int8", "fp8")
        if self.quantized and (scales is None or len(scales) != num_layers):
            raise InputError(f"A {storage} KV cache needs one scale per layer ({num_layers}).")
        self.scales = list(scales) if scales is not None else [1.0] * num_layers
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def encode(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [..., D] (activation dtype) -> storage codes (the cache write's conversion)."""
        if self.storage == "int8":
            return torch.round(x.float() / self.scales[layer]).clamp(-128, 127).to(torch.int8)
        if self.storage == "fp8":
            return (x.float() / self.scales[layer]).clamp(-FP8_MAX, FP8_MAX).to(self.dtype)
        return x.to(self.dtype)

    def decode(self, codes: torch.Tensor, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Storage codes -> values in dtype (code * scale for int8/fp8)."""
        if self.quantized:
            return (codes.float() * self.scales[layer]).to(dtype)
        return codes.to(dtype)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [T, H_kv, D] at flat slots [T] (block * block_size + offset)."""
        for pool, x in ((self.k[layer], k), (self.v[layer], v)):
            codes = self.encode(x, layer)
            if self.storage == "fp8":  # index_copy_ has no float8 kernel on CPU: copy the bytes
                pool, codes = pool.view(torch.uint8), codes.view(torch.uint8)
            pool.view(-1, *pool.shape[2:]).index_copy_(0, slots, codes)

    def write_rope_fused(
        self,
        layer: int,
        slots: torch.Tensor,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        spec: ModelSpec,
    ) -> None:
        """Rotate q and k of qkv [T, (H + 2 H_kv) D] in place and write K, V at slots [T], in one
        Triton launch (CUDA); cos, sin [T, D]."""
        from quantlab.kernels.fused_ops import rope_kv_write_

        rope_kv_write_(qkv, cos, sin, spec.num_heads, spec.num_kv_heads, spec.head_dim, slots,
                       self.k[layer], self.v[layer], self.storage, self.scales[layer])  # fmt: skip

    def gather_batch(
        self, layer: int, blocks: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached K, V [B, length, H_kv, D] of B sequences, block lists
        blocks [B, nb] (gather for several sequences of one length at once)."""
        b = blocks.shape[0]
        out = []
        for pool in (self.k[layer], self.v[layer]):
            x = pool.index_select(0, blocks.reshape(-1)).view(b, -1, *pool.shape[2:])[:, :length]
            out.append(self.decode(x, layer, dtype))
        return out[0], out[1]

    def gather(
        self, layer: int, blocks: torch.Tensor, length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached K, V [length, H_kv, D] of a sequence with block list blocks."""
        k, v = self.gather_batch(layer, blocks[None], length, dtype)
        return k[0], v[0]
