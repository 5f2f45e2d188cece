"""Reads back by-buyer messages that Faust's consumer moved past without delivering.

Seen after a `kill -9` takeover: the last messages of a partition were never delivered, and
with no later message to reveal the hole the partition stayed behind for good. Every few
seconds each assigned partition's end is compared with what the state stage applied; a
quiet partition with a gap reads it back from Kafka (`StateStage.repair_tail`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from coupon_stream.connectors import engine
from coupon_stream.connectors.faults import KafkaError
from coupon_stream.connectors.kafka import PartitionReader
from coupon_stream.foundation.errors import NotHeld
from coupon_stream.pipeline.state_stage import StateStage

log = logging.getLogger(__name__)

TAIL_CHECK_SECONDS = 5.0


class TailRepair:
    def __init__(
        self,
        app: engine.App,
        stage: StateStage,
        reader: PartitionReader,
        topic: str,
        consuming: Callable[[], bool],
    ) -> None:
        self.app = app
        self.consuming = consuming
        self.stage = stage
        self.reader = reader
        self.topic = topic

    def register(self) -> None:
        engine.every(self.app, TAIL_CHECK_SECONDS, self.check)

    async def check(self) -> None:
        app = self.app
        if app.rebalancing or not self.consuming():
            return
        mine = {tp.partition: tp for tp in engine.assignment(app) if tp.topic == self.topic}
        if not mine:
            return
        try:  # from the broker: the consumer's own view stops with its fetches
            ends = await self.reader.end_offsets(self.topic, mine)
            for partition, end in ends.items():
                committed = engine.consumer_committed(app, mine[partition])
                await self.stage.repair_tail(partition, end, committed)
        except KafkaError as exc:
            log.warning("tail check skipped, Kafka did not answer: %r", exc)
        except NotHeld as exc:
            log.warning("tail check skipped: %s", exc)
        except Exception:  # a timer that raises stops the worker; this check can wait
            log.exception("tail check failed; trying again in %.0f s", TAIL_CHECK_SECONDS)
