"""This worker's claims on its by-buyer partitions: no write of an older owner lands after them.

A worker that froze past its session timeout (or lost the brokers) while its partitions
moved can wake up mid-checkpoint. Kafka refuses its offset commit, but its changelog records
and result rows would land after the new owner's. So an owner claims a partition before it
reads anything it will write from, and every store a checkpoint writes checks the claim:

- the changelogs: the partition's transactional producer (`ChangelogWriter.claim`); the
  broker fences the older producer and aborts its open transaction;
- the result table: the partition's epoch in the database (`ResultSink.claim`), checked in
  the same transaction as the rows;
- the offsets: Kafka's own generation check. `StateStage` commits the group's offset once
  after the claims, before it reads the state: a worker whose generation is gone is
  refused there, so it never begins a session it does not own.

docs/design.md, "Fencing", says why this order makes a stale write impossible.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from coupon_stream.connectors.kafka import ChangelogWriter
from coupon_stream.connectors.mysql import ResultSink
from coupon_stream.foundation.errors import NotHeld

log = logging.getLogger(__name__)


class Claims:
    """The partitions this worker has claimed, with the result table's epoch of each."""

    def __init__(self, changelogs: ChangelogWriter, sink: ResultSink) -> None:
        self.changelogs = changelogs
        self.sink = sink
        self.epochs: dict[int, int] = {}

    async def claim(self, partition: int) -> int:
        """Fence every older owner of `partition` out of both stores; this worker's epoch."""
        await self.changelogs.claim(partition)
        epoch = self.epochs[partition] = await self.sink.claim(partition)
        log.info("partition %d claimed: epoch %d", partition, epoch)
        return epoch

    def epochs_of(self, partitions: Iterable[int]) -> dict[int, int]:
        """The epochs to write `partitions`' rows with; NotHeld if one is not claimed."""
        try:
            return {p: self.epochs[p] for p in partitions}
        except KeyError as missing:
            raise NotHeld(int(missing.args[0]), "it is not claimed by this worker") from None

    async def release(self) -> None:
        """Forget every claim (a rebalance, or a fenced checkpoint): the next session claims."""
        self.epochs.clear()
        await self.changelogs.release()

    async def retire(self, partitions: range) -> None:
        """Claim and let go of every partition: an app that must never write again (rescale)."""
        await asyncio.gather(*(self.claim(p) for p in partitions))
        await self.release()
