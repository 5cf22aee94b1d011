"""Host cost of filling a CUDA-graph decode step's inputs: torch element writes vs numpy.

The graph step copies, per sequence, the token, position, slot, context length and block list
into one pinned host buffer. This times that fill for 64 sequences both ways on the CPU (no GPU
needed): quantlab.engine.graphs uses the numpy form.
Usage: python3 benchmarks/host_fill_micro.py [--batch 64] [--blocks 5]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    """Print ms per fill for torch indexing and numpy indexing."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=5)
    args = ap.parse_args()
    n, nb, bs, p = args.batch, args.blocks, 64, 250
    host = torch.zeros((n, 4 + 64), dtype=torch.long)
    blocks = [list(range(i * nb, (i + 1) * nb)) for i in range(n)]
    toks = [list(range(300)) for _ in range(n)]

    def fill_torch() -> None:
        h = host[:n]
        h.zero_()
        for i in range(n):
            h[i, 0], h[i, 1], h[i, 2], h[i, 3] = (
                toks[i][p],
                p,
                blocks[i][p // bs] * bs + p % bs,
                p + 1,
            )
            h[i, 4 : 4 + nb] = torch.tensor(blocks[i], dtype=torch.long)

    def fill_numpy() -> None:
        h = host[:n].numpy()
        h.fill(0)
        for i in range(n):
            row = h[i]
            row[0], row[1], row[2], row[3] = toks[i][p], p, blocks[i][p // bs] * bs + p % bs, p + 1
            row[4 : 4 + nb] = blocks[i]

    for f in (fill_torch, fill_numpy):
        f()
        t0 = time.perf_counter()
        for _ in range(100):
            f()
        print(f"{f.__name__}: {(time.perf_counter() - t0) / 100 * 1e3:.3f} ms per step (bs {n})")


if __name__ == "__main__":
    main()
