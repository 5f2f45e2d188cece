"""Send JSONL files (or raw message values) to the input topics; done when all are acked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from coupon_stream.connectors import clients
from coupon_stream.connectors.clients import AIOKafkaProducer
from coupon_stream.foundation.settings import Settings

WINDOW = 20_000  # sends in flight before we wait for acknowledgements


def read_lines(path: Path) -> list[bytes]:
    with path.open("rb") as f:
        return [line.rstrip(b"\r\n") for line in f if line.strip()]


def bulk_producer(settings: Settings) -> AIOKafkaProducer:
    """A producer for loading input fast and in order (the demo, the tests, the bench)."""
    return clients.producer(
        settings,
        acks="all",
        enable_idempotence=True,
        linger_ms=10,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )


async def send_all(
    settings: Settings,
    batches: Iterable[tuple[str, list[bytes]]],
    *,
    progress: bool = True,
    partition: int | None = None,
) -> int:
    """Send every value to its topic with no key; raises if any send fails."""
    batches = list(batches)
    total = sum(len(values) for _, values in batches)
    producer = bulk_producer(settings)
    await producer.start()
    sent = 0
    try:
        with tqdm(total=total, unit="msg", disable=not progress, desc="produce") as bar:
            for topic, values in batches:
                pending: list[asyncio.Future[Any]] = []
                for value in values:
                    pending.append(await producer.send(topic, value=value, partition=partition))
                    if len(pending) >= WINDOW:
                        await asyncio.gather(*pending)
                        bar.update(len(pending))
                        sent += len(pending)
                        pending.clear()
                await asyncio.gather(*pending)
                bar.update(len(pending))
                sent += len(pending)
    finally:
        await producer.stop()
    return sent
