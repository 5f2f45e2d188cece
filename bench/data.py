"""The bench's input: `coupon_stream.tools.dataset.generate` in chunks, encoded in worker processes.

A dataset of N orders is the union of chunks of at most `size` orders, chunk k being
`generate(size, seed=seed + k, buyers=N // 4, skew=skew)`. Every chunk draws from the same
N // 4 buyers with the same ranks (zipf) or the same hot buyer (hot), so the union has the
distribution of one `generate(N, skew=skew)`, while memory stays bounded (one generate of
1M orders holds ~6 GB of dicts) and two processes can generate while the parent sends.
Order ids stay unique: they carry the chunk's seed.

This module imports only the dataset code, so that spawned processes start quickly.
"""

from __future__ import annotations

import gc

from coupon_stream.tools.dataset import Skew, generate, jsonl

CHUNK_ORDERS = 250_000


def chunk_sizes(orders: int, size: int = CHUNK_ORDERS) -> list[int]:
    return [min(size, orders - start) for start in range(0, orders, size)]


def encoded_chunk(
    orders: int, seed: int, buyers: int, skew: Skew
) -> tuple[list[bytes], list[bytes]]:
    """One chunk's order and refund message values (JSON), in the order they are sent."""
    gc.disable()  # millions of dicts that all live until the end: collections only cost
    try:
        data = generate(orders, seed=seed, buyers=buyers, skew=skew)
        return list(jsonl(data.orders)), list(jsonl(data.refunds))
    finally:
        gc.enable()
